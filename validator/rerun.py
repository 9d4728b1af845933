"""`validator rerun`: run a submission again in the sandbox, once per seed, and compare with what it claims.

Full mode runs the script's own command (training and evaluation); `--eval-only` scores an existing artifact
without training (EVAL_ONLY=1 ARTIFACT=...). In both modes the script is asked for its per-token losses
(TOKEN_LOSSES=...), and where it writes them the validator recomputes val_bpb itself with its own canonical byte
table after checking that the scored tokens are the validation stream. Reported per seed: reproduced vs claimed
val_bpb, artifact bytes re-measured from the file plus code bytes, phase times measured outside the script, audit
findings and the exit status. Exit status: 0 passed, 1 a finding of severity error, 2 the rerun could not run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from validator import bytetable
from validator.checks import run_checks
from validator.checks.context import load_context
from validator.findings import Finding, Severity, error, note, warning
from validator.logs import parse_log
from validator.output import OutputError, check_writable, write_output
from validator.report import Report, Section, build_report
from validator.sandbox import Launch, Limits, SandboxError, SandboxRequest, run_sandboxed
from validator.sandbox.audit import audit_findings
from validator.sandbox.verdict import run_findings
from validator.schema import CAP_BYTES, env_name_problem

DEFAULT_TOLERANCE_BPB = 0.0025  # the gap at which maintainers said "cannot reproduce" (May 2026 repro pass)
TOKEN_LOSSES_NAME = "token_losses.npz"
TOKEN_LOSSES_ENV = "TOKEN_LOSSES"
EVAL_ARTIFACT_NAME = "artifact_under_review.ptz"
SCRIPT_BPB_RTOL = 1e-6


class RerunError(Exception):
    """Bad input to the rerun: one line naming the file or option to fix (exit status 2)."""


@dataclass
class SeedReport:
    seed: int
    exit_code: int | None = None
    killed: str | None = None
    wall_s: float | None = None
    train_s_measured: float | None = None
    eval_s_measured: float | None = None
    train_time_ms_log: float | None = None
    eval_time_ms_log: float | None = None
    claimed_bpb: float | None = None
    script_bpb: float | None = None  # what the script printed
    recomputed_bpb: float | None = None  # the validator's own, from per-token losses
    reproduced_bpb: float | None = None  # the figure compared with the claim
    bpb_gap: float | None = None  # reproduced - claimed
    scored_tokens: int | None = None
    scored_bytes: int | None = None
    bytes_artifact: int | None = None
    bytes_code: int | None = None
    bytes_total: int | None = None
    bytes_total_claimed: int | None = None
    artifact_sha256: str | None = None
    network_isolation: str = ""
    session: str = ""
    output_log: str = ""
    findings: list[Finding] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- inputs


def resolve_data(data: Path, dataset: str | None) -> Path:
    """The folder holding fineweb_val_*.bin: DIR itself, or DIR/datasets/<name>/ (one, or the one named)."""
    if not data.is_dir():
        raise RerunError(f"{data}: data folder not found; pass --data with the shards (or the folder above datasets/)")
    if any(data.glob("fineweb_val_*.bin")):
        return data
    candidates = sorted(p for p in (data / "datasets").glob("*") if any(p.glob("fineweb_val_*.bin")))
    if dataset:
        chosen = [p for p in candidates if p.name == dataset]
        if not chosen:
            raise RerunError(f"{data}/datasets/{dataset}: no fineweb_val_*.bin shards; check --dataset")
        return chosen[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise RerunError(f"{data}: no fineweb_val_*.bin shards here or under datasets/*/; make them with builder data")
    names = ", ".join(p.name for p in candidates)
    raise RerunError(f"{data}: several datasets ({names}); choose one with --dataset")


def resolve_tokenizer(tokenizer: Path | None, data: Path, data_dir: Path) -> Path:
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise RerunError(f"{tokenizer}: tokenizer model not found; pass the .model file that made the shards")
        return tokenizer
    models = sorted((data / "tokenizers").glob("*.model"))
    vocab = "".join(ch for ch in data_dir.name.rsplit("_sp", 1)[-1] if ch.isdigit())
    matching = [m for m in models if vocab and f"_{vocab}_" in m.name] or models
    if len(matching) == 1:
        return matching[0]
    raise RerunError(f"{data}: cannot tell which tokenizer made {data_dir.name}; pass --tokenizer FILE.model")


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RerunError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Claims:
    """What the folder claims, per seed: val_bpb, total bytes, and the artifact's sha256 where a log gives it."""

    bpb: dict[int, float] = field(default_factory=dict)
    bytes_total: dict[int, int] = field(default_factory=dict)
    artifact_sha: dict[str, int] = field(default_factory=dict)  # sha256 -> seed
    seeds: list[int] = field(default_factory=list)


def read_claims(folder: Path) -> Claims:
    ctx = load_context(folder)
    claims = Claims()
    for run in ctx.runs:  # logs first; submission.json's per-seed figures take precedence below
        if run.seed is None:
            continue
        if run.log.score is not None:
            claims.bpb[run.seed] = run.log.score.val_bpb
        if run.log.bytes_total is not None:
            claims.bytes_total[run.seed] = run.log.bytes_total
        sha = (run.log.result_json or {}).get("artifact_sha256")
        if isinstance(sha, str):
            claims.artifact_sha[sha] = run.seed
    if ctx.submission is not None:
        for seed, claim in ctx.submission.seed_results.items():
            if claim.val_bpb is not None:
                claims.bpb[seed] = float(claim.val_bpb)
            if claim.artifact_bytes is not None:
                claims.bytes_total[seed] = claim.artifact_bytes
        claims.seeds = list(ctx.submission.seeds)
    if not claims.seeds:
        claims.seeds = sorted(set(claims.bpb))
    return claims


def find_artifact(folder: Path, given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise RerunError(f"{given}: artifact not found; pass the .ptz the run wrote with --artifact")
        return given
    found = sorted(folder.glob("*.ptz"))
    if len(found) == 1:
        return found[0]
    what = "no" if not found else "several"
    raise RerunError(f"{folder}: {what} *.ptz artifact files; pass the one to score with --artifact FILE")


# ---------------------------------------------------------------------------------------------------- one seed


def script_reads_token_losses(script: Path) -> bool:
    """Whether the script's source reads TOKEN_LOSSES (ours do; upstream's records never write per-token losses)."""
    try:
        return TOKEN_LOSSES_ENV.encode() in script.read_bytes()
    except OSError:
        return False


def _check_token_losses(
    report: SeedReport,
    npz: Path,
    table: bytetable.ByteTable,
    stream: np.ndarray,
    required: bool,
    script_name: str = "train_gpt.py",
    reads_env: bool = False,
) -> None:
    """`required`: eval-only mode; `reads_env`: the script's source reads TOKEN_LOSSES, so it must write them."""
    where = f"seed {report.seed}"
    if not npz.is_file():
        if required:
            msg = "no per-token losses were written (TOKEN_LOSSES); the score cannot be recomputed independently"
            report.findings.append(error("RERUN_TOKEN_LOSSES_MISSING", msg, where))
        elif reads_env:
            msg = (
                f"{script_name} reads TOKEN_LOSSES but wrote no per-token losses to {TOKEN_LOSSES_NAME}: the run "
                "removed its own scoring hook, so its val_bpb cannot be recomputed; restore the TOKEN_LOSSES save"
            )
            report.findings.append(error("RERUN_TOKEN_LOSSES_MISSING", msg, where))
        else:
            msg = (
                f"{script_name} wrote no per-token losses (TOKEN_LOSSES): score not independently verified; the "
                "reproduced val_bpb is the script's own accounting (its byte counting unchecked); add the TOKEN_LOSSES "
                "save of the ssm-golf template to have it recomputed"
            )
            report.findings.append(warning("RERUN_SCORE_NOT_RECOMPUTED", msg, where))
        return
    try:
        with np.load(npz, allow_pickle=False) as z:
            tokens, losses = np.asarray(z["tokens"]), np.asarray(z["losses"])
        if tokens.size > stream.size or not np.array_equal(tokens.astype(np.int64), stream[: tokens.size]):
            msg = "the scored tokens are not the start of the validation stream read from the shards"
            report.findings.append(error("RERUN_TOKEN_STREAM_MISMATCH", msg, where))
            return
        result = bytetable.score(table, tokens, losses)
    except (KeyError, ValueError, OSError) as exc:
        report.findings.append(error("RERUN_TOKEN_LOSSES_INVALID", f"{npz.name}: {exc}", where))
        return
    report.recomputed_bpb = result.val_bpb
    report.scored_tokens, report.scored_bytes = result.tokens, result.bytes
    if result.tokens + 1 < stream.size - 4096:
        msg = f"{result.tokens} of {stream.size - 1} validation targets scored (VAL_TOKENS or a cut to whole sequences)"
        report.findings.append(note("RERUN_PARTIAL_VALIDATION", msg, where))
    if report.script_bpb is not None and abs(report.script_bpb - result.val_bpb) > SCRIPT_BPB_RTOL * result.val_bpb:
        msg = (
            f"the script printed val_bpb {report.script_bpb:.8f} but its own per-token losses give "
            f"{result.val_bpb:.8f} with the canonical byte table: its byte accounting differs; the validator's "
            "figure is used"
        )
        report.findings.append(error("RERUN_BPB_TABLE_MISMATCH", msg, where))


def _measure_bytes(report: SeedReport, work: Path, code_bytes: int, result_json: dict | None, artifact: Path | None):
    where = f"seed {report.seed}"
    if artifact is None:
        name = (result_json or {}).get("artifact")
        candidates = [work / name] if isinstance(name, str) and Path(name).name == name else []
        candidates += sorted(work.glob("final_model*.ptz"))
        artifact = next((p for p in candidates if p.is_file()), None)
    if artifact is None:
        report.findings.append(error("RERUN_NO_ARTIFACT", "the run wrote no artifact file to measure", where))
        return
    report.bytes_artifact = artifact.stat().st_size
    report.bytes_code = code_bytes
    report.bytes_total = report.bytes_artifact + code_bytes
    report.artifact_sha256 = sha256_of(artifact)
    if report.bytes_total > CAP_BYTES:
        msg = f"artifact {report.bytes_artifact:,} + code {code_bytes:,} = {report.bytes_total:,} bytes > {CAP_BYTES:,}"
        report.findings.append(error("RERUN_SIZE_OVER_CAP", msg, where))
    said = (result_json or {}).get("bytes_total")
    if isinstance(said, int) and said != report.bytes_total:
        msg = f"the script reported bytes_total {said:,}; the files measure {report.bytes_total:,}"
        report.findings.append(error("RERUN_BYTES_MISREPORTED", msg, where))
    claimed = report.bytes_total_claimed
    if claimed is not None and claimed != report.bytes_total:
        msg = f"submission claims {claimed:,} total bytes for this seed; the rerun measures {report.bytes_total:,}"
        report.findings.append(warning("RERUN_BYTES_DIFFER_FROM_CLAIM", msg, where))


def _compare_bpb(report: SeedReport, tolerance: float) -> None:
    where = f"seed {report.seed}"
    report.reproduced_bpb = report.recomputed_bpb if report.recomputed_bpb is not None else report.script_bpb
    if report.reproduced_bpb is None:
        report.findings.append(error("RERUN_NO_SCORE", "the run printed no score line", where))
        return
    if report.claimed_bpb is None:
        report.findings.append(note("RERUN_NO_CLAIM", "nothing claimed for this seed; reproduced figure only", where))
        return
    report.bpb_gap = report.reproduced_bpb - report.claimed_bpb
    text = f"reproduced val_bpb {report.reproduced_bpb:.5f} vs claimed {report.claimed_bpb:.5f}"
    if report.bpb_gap > tolerance:
        report.findings.append(error("RERUN_BPB_NOT_REPRODUCED", f"{text}: worse by more than {tolerance}", where))
    elif report.bpb_gap < -tolerance:
        msg = f"{text}: better by more than {tolerance} (not the claimed run?)"
        report.findings.append(warning("RERUN_BPB_BETTER_THAN_CLAIMED", msg, where))


def recorded_env(folder: Path, seed: int) -> dict[str, str]:
    """The overrides submission.json records in `env` (`builder run --env`); names it may not set are skipped."""
    try:
        data = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    given = data.get("env") if isinstance(data, dict) else None
    if not isinstance(given, dict):
        return {}
    env = {k: v for k, v in given.items() if isinstance(v, str) and env_name_problem(k) is None}
    skipped = sorted(set(given) - set(env))
    shown = " ".join(f"{k}={v}" for k, v in env.items()) or "none"
    tail = f"; skipped (not a hyperparameter override): {', '.join(skipped)}" if skipped else ""
    print(f"== seed {seed}: environment from submission.json: {shown}{tail}", file=sys.stderr, flush=True)
    return env


def rerun_seed(
    args: argparse.Namespace,
    seed: int,
    session: Path,
    data_dir: Path,
    tokenizer: Path,
    claims: Claims,
    table: bytetable.ByteTable,
    stream: np.ndarray,
    artifact: Path | None,
) -> SeedReport:
    report = SeedReport(seed=seed, session=str(session))
    report.claimed_bpb = claims.bpb.get(seed)
    report.bytes_total_claimed = claims.bytes_total.get(seed)
    env = {**recorded_env(args.folder, seed), **parse_env(args.env)}  # --env on the command line wins
    env.update(SEED=str(seed), RUN_ID=f"train_seed{seed}")
    env[TOKEN_LOSSES_ENV] = TOKEN_LOSSES_NAME
    inputs = {}
    if artifact is not None:
        env.update(EVAL_ONLY="1", ARTIFACT=EVAL_ARTIFACT_NAME)
        inputs[EVAL_ARTIFACT_NAME] = artifact
    limits = Limits(args.train_limit, args.eval_limit, args.setup_allowance, args.grace)
    request = SandboxRequest(
        submission=args.folder,
        session_dir=session,
        env=env,
        script=args.script,
        data_dir=data_dir,
        tokenizer=tokenizer,
        inputs=inputs,
        backend=args.backend,
        launch=Launch(
            nproc=args.nproc,
            launcher=args.launcher,
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_backend=args.rdzv_backend,
            rdzv_id=args.rdzv_id,
        ),
        limits=limits,
        gpus={"auto": None, "yes": True, "no": False}[args.gpus],
        allow_network=args.allow_network,
        netns=not args.no_netns,
        extra_read_roots=tuple(args.allow_read),
        image=args.image,
        echo=args.echo,
    )
    result = run_sandboxed(request)
    out_log = session / f"rerun_seed{seed}.log"
    out_log.write_text("".join(f"{t:10.3f} {line}\n" for t, line in result.lines), encoding="utf-8")
    report.output_log = str(out_log)
    report.exit_code, report.killed, report.wall_s = result.returncode, result.killed, round(result.wall_s, 3)
    report.network_isolation = result.network_isolation
    for phase, attr in (("train", "train_s_measured"), ("eval", "eval_s_measured")):
        span = result.phases.get(phase)
        if span is not None and span.seconds is not None:
            setattr(report, attr, round(span.seconds, 3))
    parsed = parse_log(result.text, path=out_log.name)
    result_json = parsed.result_json or {}
    report.train_time_ms_log = result_json.get("train_time_ms", parsed.train_time_ms)
    report.eval_time_ms_log = result_json.get("eval_time_ms")
    if parsed.score is not None:
        report.script_bpb = parsed.score.val_bpb
    if isinstance(result_json.get("val_bpb"), float):
        report.script_bpb = result_json["val_bpb"]
    where = f"seed {seed}"
    expected = ("eval",) if artifact is not None else ("train", "eval")
    report.findings += run_findings(result, limits, expected, where)
    report.findings += audit_findings(
        result.audit_events,
        where,
        extra_programs=tuple(args.allow_exec),
        injected=True,  # both backends put the hook into every Python process of the run
        log_problem=result.audit_log_problem,
    )
    code_bytes = (args.folder / args.script).stat().st_size
    run_artifact = result.work_dir / EVAL_ARTIFACT_NAME if artifact is not None else None
    _measure_bytes(report, result.work_dir, code_bytes, parsed.result_json, run_artifact)
    if result.returncode == 0:
        _check_token_losses(
            report,
            result.work_dir / TOKEN_LOSSES_NAME,
            table,
            stream,
            required=artifact is not None,
            script_name=args.script,
            reads_env=script_reads_token_losses(args.folder / args.script),
        )
    _compare_bpb(report, args.tolerance)
    return report


# ---------------------------------------------------------------------------------------------------- report


def rerun_table(reports: list[SeedReport]) -> str:
    """The per-seed Markdown table of the rerun section."""

    def fmt(v: object, spec: str = "") -> str:
        return "-" if v is None else format(v, spec)

    rows = [
        "| seed | claimed bpb | reproduced bpb | gap | bytes total | train s | eval s | exit | isolation |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        exit_text = f"killed: {r.killed}" if r.killed else fmt(r.exit_code)
        rows.append(
            f"| {r.seed} | {fmt(r.claimed_bpb, '.5f')} | {fmt(r.reproduced_bpb, '.5f')} | {fmt(r.bpb_gap, '+.5f')} "
            f"| {fmt(r.bytes_total, ',')} | {fmt(r.train_s_measured, '.1f')} | {fmt(r.eval_s_measured, '.1f')} "
            f"| {exit_text.replace('|', '/')} | {r.network_isolation} |"
        )
    return "\n".join(rows)


def rerun_section(args: argparse.Namespace, mode: str, reports: list[SeedReport]) -> Section:
    """The rerun's block of a validator report: Markdown table and the per-seed data for the JSON."""
    seeds = []
    unverified = [r.seed for r in reports if r.reproduced_bpb is not None and r.recomputed_bpb is None]
    for r in reports:
        d = asdict(r)
        d["findings"] = [f.to_dict() for f in r.findings]
        seeds.append(d)
    data = {
        "folder": str(args.folder),
        "mode": mode,
        "backend": args.backend,
        "nproc": args.nproc,
        "tolerance_bpb": args.tolerance,
        "limits_s": {"train": args.train_limit, "eval": args.eval_limit, "setup": args.setup_allowance},
        "seeds": seeds,
        "passed": not any(f.severity == Severity.ERROR for r in reports for f in r.findings),
        "score_verified": bool(reports) and not unverified,
    }
    intro = (
        f"{mode} rerun, {args.backend} backend, {args.nproc} process(es) per node; val_bpb recomputed by the "
        f"validator where per-token losses were written; tolerance {args.tolerance} bpb."
    )
    if unverified:
        intro += (
            f"\n\n**Score not independently verified** (seed {', '.join(str(s) for s in unverified)}): no per-token "
            "losses, so the reproduced val_bpb is the script's own accounting, not the validator's recomputation."
        )
    return Section(title=f"Sandboxed rerun ({mode})", markdown=intro + "\n\n" + rerun_table(reports), data=data)


def build_rerun_report(args: argparse.Namespace, mode: str, reports: list[SeedReport]) -> Report:
    """The static validator's report, extended with the rerun section (static findings too with --static)."""
    findings = [f for r in reports for f in r.findings]
    if args.static:
        ctx = load_context(args.folder)
        report = build_report(ctx, run_checks(ctx) + findings)
    else:
        report = Report(target=args.folder.resolve().name, findings=findings)
    report.sections.append(rerun_section(args, mode, reports))
    return report


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="the submission folder (train_gpt.py, submission.json, logs)")
    parser.add_argument("--data", type=Path, required=True, help="shard folder, or the folder above datasets/")
    parser.add_argument("--dataset", help="which datasets/<name> when --data holds several")
    parser.add_argument("--tokenizer", type=Path, help="sentencepiece .model (default: the one under DATA/tokenizers)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the seeds the submission claims, else 1337")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--backend", choices=("local", "docker"), default="local")
    parser.add_argument("--eval-only", action="store_true", help="score an existing artifact without training")
    parser.add_argument("--artifact", type=Path, help="the .ptz to score with --eval-only (default: the folder's)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_BPB, help="bpb gap allowed (0.0025)")
    parser.add_argument("--train-limit", type=float, default=600.0, help="seconds of the train phase (600)")
    parser.add_argument("--eval-limit", type=float, default=600.0, help="seconds of the eval phase (600)")
    parser.add_argument("--setup-allowance", type=float, default=600.0, help="seconds outside the two phases (600)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds a phase may overrun before the kill (30)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    parser.add_argument("--allow-exec", action="append", default=[], metavar="NAME", help="a program it may start")
    parser.add_argument("--allow-read", action="append", default=[], type=Path, metavar="PATH", help="a readable root")
    parser.add_argument("--allow-network", action="store_true", help="no network block (multi-node only)")
    parser.add_argument("--no-netns", action="store_true", help="local: no network namespace, the audit hook only")
    parser.add_argument("--script", default="train_gpt.py")
    parser.add_argument("--launcher", choices=("auto", "torchrun", "python"), default="auto")
    parser.add_argument("--gpus", choices=("auto", "yes", "no"), default="auto")
    parser.add_argument("--image", default="ssm-golf:latest", help="docker backend image")
    parser.add_argument("--nnodes", type=int, default=1, help="torchrun --nnodes")
    parser.add_argument("--node-rank", type=int, default=0, help="torchrun --node-rank")
    parser.add_argument("--rdzv-endpoint", help="torchrun --rdzv-endpoint HOST:PORT (needed when --nnodes > 1)")
    parser.add_argument("--rdzv-backend", default="c10d", help="torchrun --rdzv-backend")
    parser.add_argument("--rdzv-id", help="torchrun --rdzv-id")
    parser.add_argument("--workdir", type=Path, help="where the sessions go (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="write the JSON report here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown summary here")
    parser.add_argument("--echo", action="store_true", help="print the script's output as it runs")
    parser.add_argument("--static", action="store_true", help="run the static checks too, in the same report")


def run(args: argparse.Namespace) -> int:
    try:
        check_writable(args.json, "JSON report")
        check_writable(args.markdown, "Markdown report")
        return _run(args)
    except (RerunError, SandboxError, OutputError) as exc:
        print(f"validator rerun: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    folder: Path = args.folder
    if not (folder / args.script).is_file():
        raise RerunError(f"{folder / args.script}: no such script; pass a submission folder")
    data_dir = resolve_data(args.data, args.dataset)
    tokenizer = resolve_tokenizer(args.tokenizer, args.data, data_dir)
    claims = read_claims(folder)
    table = bytetable.byte_table(tokenizer)
    try:
        stream = bytetable.val_stream(data_dir)
    except ValueError as exc:
        raise RerunError(str(exc)) from exc
    artifact = find_artifact(folder, args.artifact) if args.eval_only else None
    if args.eval_only:
        sha = sha256_of(artifact)
        seeds = args.seeds or ([claims.artifact_sha[sha]] if sha in claims.artifact_sha else claims.seeds[:1] or [1337])
    else:
        seeds = args.seeds or claims.seeds or [1337]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ssm-golf-rerun-"))
    mode = "eval-only" if args.eval_only else "full"
    reports = []
    for seed in seeds:
        session = workdir / f"{mode}_seed{seed}"
        print(f"== rerun {folder.name} seed {seed} ({mode}, {args.backend}) in {session}", file=sys.stderr, flush=True)
        reports.append(rerun_seed(args, seed, session, data_dir, tokenizer, claims, table, stream, artifact))
    report = build_rerun_report(args, mode, reports)
    if args.json:
        write_output(args.json, report.to_json() + "\n", "JSON report")
    markdown = report.to_markdown()
    if args.markdown:
        write_output(args.markdown, markdown, "Markdown report")
    print(markdown)
    return report.exit_code
