#!/usr/bin/env python3
"""Whole-variant GPU benchmark: each variant assembled, run at full size, measured from its own log, in one call.

Throughput mode (default): ITERATIONS steps of the record recipe's batch on this machine's GPUs, then the export,
the read-back and the scoring, each variant under its own timeout. Per variant: ms/step (from the logged
train_time between step 10 and the last logged step), tokens/s, peak memory, artifact and total bytes, the final
score and its evaluation time, and projections to 8 GPUs (linear scaling: steps in 600 s, evaluation of FineWeb's
validation split in the variant's vocabulary: 62,021,632 tokens at sp1024, 40,540,160 at sp8192).

Quality mode (`--seconds S`): every variant trains for the same S seconds of wall-clock on the same data and is
scored the same way, so the val_bpb column compares them at equal time (proxy data is not FineWeb: say so).

`--gpus 0,1,2,3` runs the variants side by side, one per GPU (CUDA_VISIBLE_DEVICES), each starting as soon as a
GPU is free: on a 4-GPU machine four 5-minute quality runs cost the wall-clock of one. Each run still has a whole
GPU of its own; the host's CPUs are shared (say so beside the figures).

  python bench/variants.py --data-root DATA --variants baseline,kill-mamba2 --steps 60 --timeout 240
  python bench/variants.py --data-root DATA --seconds 300 --timeout 560

DATA is a folder laid out like `builder data sample --out DATA` (datasets/fineweb10B_sp<V>/ and
tokenizers/fineweb_<V>_bpe.model for every vocabulary the variants use). Results go to $OUT (or --out) as
variants.json and variants.md; each run's log is kept beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.assemble import build_files  # noqa: E402
from builder.variants import get_variant, load_variants  # noqa: E402
from validator.logs import parse_log  # noqa: E402

# FineWeb's validation split in tokens per vocabulary, as the records' logs show it
FINEWEB_VAL_TOKENS = {1024: 62_021_632, 4096: 45_508_608, 8192: 40_540_160}
PEAK_RE = re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB", re.M)
KNOB_RE = re.compile(r"^  (train_batch_tokens|train_seq_len): (\d+)$", re.M)


def data_env(root: Path, vocab: int) -> dict[str, str]:
    data = root / "datasets" / f"fineweb10B_sp{vocab}"
    tokenizer = root / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not data.is_dir() or not tokenizer.is_file():
        raise SystemExit(f"{root}: no sp{vocab} data; make it with `builder data sample --vocab {vocab} --out {root}`")
    return {"DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer)}


def train_tokens(root: Path, vocab: int) -> int:
    """Tokens in the train shards of DATA's sp<vocab> dataset (from the shard headers)."""
    from templates.data import find_shards, shard_token_count

    folder = root / "datasets" / f"fineweb10B_sp{vocab}"
    return sum(shard_token_count(f) for f in find_shards(str(folder), "train"))


def check_enough_data(root: Path, vocabs: set[int], seconds: float, tokens_per_s: float) -> None:
    """Quality mode compares models, not memorisation: each dataset must hold what the fastest variant reads in
    `seconds` (at `tokens_per_s`), or the run stops before it starts."""
    need = int(seconds * tokens_per_s)
    for vocab in sorted(vocabs):
        have = train_tokens(root, vocab)
        if have < need:
            raise SystemExit(
                f"{root}: sp{vocab} has {have:,} train tokens, and a {seconds:.0f} s run at {tokens_per_s:,.0f} "
                f"tokens/s reads {need:,}: the fast variants would repeat the data and memorise it. Make more with "
                f"`builder data text --input 'DIR/**/*.py' ...` (quote the globs), or lower --min-tokens-per-s"
            )


def measure(log_text: str, vocab: int = 1024, nproc: int = 1, share: bool = False) -> dict:
    """The figures of one run, from its log (None where the run did not get that far). The 8-GPU projections scale
    linearly from the run's `nproc` GPUs: a run of the whole batch is 8 / nproc times slower than 8 GPUs, a run of
    the per-GPU share (`share`) takes as long per step as 8 GPUs would."""
    parsed = parse_log(log_text)
    knobs = {k: int(v) for k, v in KNOB_RE.findall(log_text)}
    steps = [(s, t) for s, _, t in parsed.steps]
    timed = [(s, t) for s, t in steps if s >= 10]
    ms_per_step = None
    if len(timed) >= 2:
        (s0, t0), (s1, t1) = timed[0], timed[-1]
        ms_per_step = (t1 - t0) / (s1 - s0)
    elif steps:
        ms_per_step = steps[-1][1] / steps[-1][0]
    peak = PEAK_RE.search(log_text)
    final = parsed.scores[-1] if parsed.scores else None
    summary = parsed.result_json or {}
    tokens = knobs.get("train_batch_tokens")
    out = {
        "steps": summary.get("steps", steps[-1][0] if steps else 0),
        "ms_per_step": ms_per_step,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / ms_per_step * 1000 if tokens and ms_per_step else None,
        "peak_alloc_mib": int(peak.group(1)) if peak else None,
        "peak_reserved_mib": int(peak.group(2)) if peak else None,
        "bytes_model": parsed.bytes_model,
        "bytes_total": parsed.bytes_total,
        "val_bpb": summary.get("val_bpb", final.val_bpb if final else None),
        "pre_quant_val_bpb": summary.get("pre_quant_val_bpb"),
        "train_loss_last": parsed.steps[-1][1] if parsed.steps else None,
        "eval_ms": summary.get("eval_time_ms", final.eval_time_ms if final else None),
        "val_tokens": parsed.val_tokens,
    }
    if ms_per_step:
        out["steps_in_600s_8gpu"] = int(600_000 / (ms_per_step * (1.0 if share else nproc / 8)))
    if out["eval_ms"] is not None and parsed.val_tokens:
        split = FINEWEB_VAL_TOKENS.get(vocab, FINEWEB_VAL_TOKENS[1024])
        out["eval_s_8gpu_fineweb"] = out["eval_ms"] / 1000 * split / parsed.val_tokens * nproc / 8
    return out


def record_accum(fixed: int, nproc: int) -> int:
    """Micro-steps that keep the record's micro-batch per GPU on `nproc` GPUs; 0 where the recipe fixes none.

    A recipe that fixes GRAD_ACCUM_STEPS=g states its count on 8 GPUs (its micro-batch is sized for one GPU's
    memory); the script does not scale a fixed count with the rank count, so on fewer GPUs it becomes
    g x 8 / nproc. Recipes that leave it at 0 get the script's own 8 / nproc.
    """
    return fixed * 8 // nproc if fixed else 0


def record_batch_on(nproc: int, defaults: dict[str, str]) -> dict[str, str]:
    """The record's whole batch on `nproc` GPUs at the record's micro-batch per GPU (see record_accum)."""
    accum = record_accum(int(defaults.get("GRAD_ACCUM_STEPS", "0") or 0), nproc)
    return {"GRAD_ACCUM_STEPS": str(accum)} if accum else {}


def record_share_on(nproc: int, defaults: dict[str, str]) -> dict[str, str]:
    """What `nproc` of the record's 8 GPUs do in one step: nproc / 8 of its batch, each at the record's per-rank
    micro-steps (the recipe's fixed count, else one), so that the optimiser runs as often per token as in the record."""
    batch = int(defaults.get("TRAIN_BATCH_TOKENS", "524288")) * nproc // 8
    accum = int(defaults.get("GRAD_ACCUM_STEPS", "0") or 0) or 1
    return {"TRAIN_BATCH_TOKENS": str(batch), "GRAD_ACCUM_STEPS": str(accum)}


def record_vocab(spec) -> int:
    """The vocabulary size of a variant's record recipe (its data and tokenizer)."""
    return int(spec.defaults_as_strings("record").get("VOCAB_SIZE", 1024))


def run_env(name: str, spec, args: argparse.Namespace, gpu: str | None = None) -> dict[str, str]:
    """The environment of one variant's run: the data, the mode's length, the record's batch on this machine, then
    the --env overrides (NAME:K=V ones for that variant only) and its GPU."""
    defaults = spec.defaults_as_strings("record")
    env = dict(os.environ, PYTHONUNBUFFERED="1", RUN_ID=name)
    env.update(data_env(args.data_root, record_vocab(spec)))
    env.update(VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="10")
    if args.seconds > 0:
        env.update(MAX_WALLCLOCK_SECONDS=str(args.seconds), ITERATIONS="1000000")
    else:
        env.update(MAX_WALLCLOCK_SECONDS="0", ITERATIONS=str(args.steps))
    env.update(record_share_on(args.nproc, defaults) if args.share else record_batch_on(args.nproc, defaults))
    for pair in args.env:
        key, _, value = pair.partition("=")
        only, _, key = key.rpartition(":")  # NAME:KEY=VALUE overrides for that variant only
        if not only or only == name:
            env[key] = value
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def write_script(spec, folder: Path) -> Path:
    """The variant's assembled record train_gpt.py in `folder` (made if missing); its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_gpt.py"
    path.write_text(build_files(spec, "2026-11-27", "-", "-", "record")["train_gpt.py"])
    return path


def run_variant(name: str, args: argparse.Namespace, out: Path, gpu: str | None = None) -> dict:
    spec = get_variant(name)
    folder = write_script(spec, out / name).parent
    env = run_env(name, spec, args, gpu)
    launch = [sys.executable, "train_gpt.py"]
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        launch.append("train_gpt.py")
    started = time.monotonic()
    try:
        done = subprocess.run(launch, cwd=folder, env=env, capture_output=True, text=True, timeout=args.timeout)
        text, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = "timeout"
    (folder / "log.txt").write_text(text)
    result = {"variant": name, "exit": status, "wall_s": round(time.monotonic() - started, 1)}
    if gpu is not None:
        result["gpu"] = gpu
    vocab = record_vocab(spec)
    result.update(measure(text, vocab, args.nproc, args.share))
    if args.seconds > 0 and result["tokens_per_step"]:
        # how often the run went over its train split: above a few passes the val_bpb measures memorisation
        have = train_tokens(args.data_root, vocab)
        result["train_passes"] = round(result["steps"] * result["tokens_per_step"] / have, 2) if have else None
    return result


def run_side_by_side(names: list[str], gpus: list[str], args: argparse.Namespace) -> list[dict]:
    """Each variant on the next free GPU; rows come back in the order of `names`."""
    free: queue.Queue[str] = queue.Queue()
    for gpu in gpus:
        free.put(gpu)

    def one(name: str) -> dict:
        gpu = free.get()
        try:
            row = run_variant(name, args, args.out, gpu)
        finally:
            free.put(gpu)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        return list(pool.map(one, names))


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    def fmt(v: object, spec: str = "") -> str:
        return "-" if v is None else format(v, spec)

    mode = f"{args.seconds} s of training each" if args.seconds > 0 else f"{args.steps} steps each"
    lines = [
        f"Variants, {mode}, {args.nproc} process(es); {datetime.date.today().isoformat()}",
        "",
        "| variant | exit | steps | ms/step | tokens/s | peak alloc / reserved MiB | model bytes | total bytes "
        "| val_bpb pre-quant -> artifact | eval s | last train loss | passes over train | steps in 600 s, 8 GPUs "
        "| eval s, FineWeb val split, 8 GPUs |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = f"{fmt(r['peak_alloc_mib'], ',')} / {fmt(r['peak_reserved_mib'], ',')}"
        eval_s = None if r["eval_ms"] is None else r["eval_ms"] / 1000
        cells = [
            r["variant"], r["exit"], r["steps"], fmt(r["ms_per_step"], ".1f"), fmt(r["tokens_per_s"], ",.0f"), peak,
            fmt(r["bytes_model"], ","), fmt(r["bytes_total"], ","),
            f"{fmt(r.get('pre_quant_val_bpb'), '.4f')} -> {fmt(r['val_bpb'], '.4f')}", fmt(eval_s, ".1f"),
            fmt(r.get("train_loss_last"), ".3f"), fmt(r.get("train_passes")), fmt(r.get("steps_in_600s_8gpu"), ","),
            fmt(r.get("eval_s_8gpu_fineweb"), ".1f"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(load_variants()), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=0.0, help="quality mode: this much training each")
    parser.add_argument("--timeout", type=float, default=300.0, help="per variant, seconds")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument(
        "--share", action="store_true",
        help="run each GPU's share of the record's step (batch x nproc / 8) instead of the whole batch",
    )  # fmt: skip
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids: one variant per GPU, side by side")
    parser.add_argument(
        "--min-tokens-per-s", type=float, default=1.6e6,
        help="quality mode: train tokens needed per second of --seconds (the fastest variant's pace; 0: no check)",
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=[], metavar="[NAME:]K=V",
        help="an override for every variant, or with NAME: for that variant only",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_variants_out")))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if gpus and args.nproc > 1:
        raise SystemExit("--gpus runs one single-process variant per GPU; leave out --nproc")
    if args.seconds > 0 and args.min_tokens_per_s > 0:
        vocabs = {record_vocab(get_variant(n)) for n in names}
        check_enough_data(args.data_root, vocabs, args.seconds, args.min_tokens_per_s * args.nproc)
    if gpus:
        rows = run_side_by_side(names, gpus, args)
    else:
        rows = []
        for name in names:
            rows.append(run_variant(name, args, args.out))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "variants.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows, args)
    (args.out / "variants.md").write_text(table)
    print(table)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
