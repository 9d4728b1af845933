"""bench/variants.py at tiny settings on the CPU: every variant it runs is assembled, trained, exported and scored,
and the figures it reports are read from the run's own log."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

TINY = [
    "MODEL_DIM=64", "NUM_LAYERS=2", "NUM_LOOPS=1", "NUM_HEADS=4", "NUM_KV_HEADS=2", "MLP_MULT=2",
    "TRAIN_SEQ_LEN=64", "TRAIN_BATCH_TOKENS=2048", "GRAD_ACCUM_STEPS=1", "WARMUP_STEPS=1", "VAL_TOKENS=4096",
    "EMA_START_STEP=4",
]  # fmt: skip


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "variants.py"
    spec = importlib.util.spec_from_file_location("bench_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_mode_on_two_variants(tmp_path, sample_data):
    data, _ = sample_data
    bench = _bench()
    args = ["--data-root", str(data.parent.parent), "--variants", "baseline,kill-mamba2", "--steps", "12"]
    args += ["--timeout", "240", "--out", str(tmp_path)] + [a for kv in TINY for a in ("--env", kv)]
    assert bench.main(args) == 0
    rows = json.loads((tmp_path / "variants.json").read_text())
    assert [r["variant"] for r in rows] == ["baseline", "kill-mamba2"]
    for r in rows:
        assert r["exit"] == 0 and r["steps"] == 12 and r["tokens_per_step"] == 2048
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["steps_in_600s_8gpu"] > 0
        assert 0 < r["bytes_model"] < r["bytes_total"] and 0 < r["val_bpb"] < 10 and r["eval_ms"] >= 0
        assert (tmp_path / r["variant"] / "log.txt").read_text().count("result_json") == 1
    assert "| kill-mamba2 | 0 | 12 |" in (tmp_path / "variants.md").read_text()
    # kill-mamba2 averages its weights (EMA 0.999 from step 4 here): the score before quantisation is the averaged
    # model's, so the ternary artifact's score is close to it (once 1.2 bpb apart on a GPU: the averaged model was
    # scored only after the export, and the average leaned on its first step's weights)
    km2 = rows[1]
    log = (tmp_path / "kill-mamba2" / "log.txt").read_text()
    assert "ema:applied decay=0.999 updates=9" in log.split("step:12/12 val_loss")[0]
    assert abs(km2["val_bpb"] - km2["pre_quant_val_bpb"]) < 0.05


def test_evaluation_is_projected_on_finewebs_split_in_the_variants_vocabulary():
    bench = _bench()
    log = (
        "val_tokens: 1000000\n"
        "final_int8_zlib_roundtrip val_loss:2.0000 val_bpb:1.2000 eval_time:8000ms\n"
        "final_int8_zlib_roundtrip_exact val_loss:2.00000000 val_bpb:1.20000000\n"
        'result_json {"eval_time_ms": 8000.0, "val_bpb": 1.2}\n'
    )
    sp1024, sp8192 = bench.measure(log, 1024), bench.measure(log, 8192)
    assert sp1024["val_tokens"] == 1_000_000 and sp1024["eval_ms"] == 8000
    assert sp1024["eval_s_8gpu_fineweb"] == 8.0 * 62_021_632 / 1_000_000 / 8
    assert sp8192["eval_s_8gpu_fineweb"] == 8.0 * 40_540_160 / 1_000_000 / 8


def test_share_mode_runs_one_gpus_part_of_the_record_step(sample_data):
    """--share: one GPU runs what one of the record's 8 does in a step (kill-mamba2: 65,536 tokens as 2 micro-steps
    of 32,768; the baseline: 65,536 tokens in one), and a step of it projects to one step of the 8 GPUs."""
    from builder.variants import get_variant

    data, _ = sample_data
    bench = _bench()
    args = argparse.Namespace(data_root=data.parent.parent, seconds=0, steps=5, nproc=1, env=[], share=True)
    km2 = bench.run_env("kill-mamba2", get_variant("kill-mamba2"), args)
    base = bench.run_env("baseline", get_variant("baseline"), args)
    assert (km2["TRAIN_BATCH_TOKENS"], km2["GRAD_ACCUM_STEPS"]) == ("65536", "2")
    assert (base["TRAIN_BATCH_TOKENS"], base["GRAD_ACCUM_STEPS"]) == ("65536", "1")
    log = "  train_batch_tokens: 65536\n" + "".join(
        f"step:{s}/40 train_loss:3.0 train_time:{s * 100}ms step_avg:100.00ms\n" for s in (10, 20, 30)
    )
    assert bench.measure(log, share=True)["steps_in_600s_8gpu"] == 6000  # 100 ms a step on each of the 8
    assert bench.measure(log)["steps_in_600s_8gpu"] == 48000  # the whole batch on one GPU: 8 times that
    assert bench.measure(log, nproc=2)["steps_in_600s_8gpu"] == 24000


def test_measure_reads_a_log_that_stopped_early():
    log = "  train_batch_tokens: 1000\nstep:10/99 train_loss:3.0 train_time:500ms step_avg:50.00ms\n"
    log += "step:20/99 train_loss:2.5 train_time:1500ms step_avg:75.00ms\n"
    figures = _bench().measure(log)
    assert figures["ms_per_step"] == 100.0 and figures["tokens_per_s"] == 10_000
    assert figures["bytes_model"] is None and figures["val_bpb"] is None


def test_side_by_side_gives_each_run_its_own_gpu_and_keeps_the_order(monkeypatch, tmp_path):
    import threading
    import time

    bench = _bench()
    busy: set[str] = set()
    lock = threading.Lock()
    clashes = []

    def fake_run(name, args, out, gpu=None):
        with lock:
            if gpu in busy:
                clashes.append((name, gpu))
            busy.add(gpu)
        time.sleep(0.05 if name != "b" else 0.2)
        with lock:
            busy.discard(gpu)
        return {"variant": name, "gpu": gpu, "exit": 0}

    monkeypatch.setattr(bench, "run_variant", fake_run)
    args = argparse.Namespace(out=tmp_path)
    rows = bench.run_side_by_side(["a", "b", "c", "d", "e"], ["0", "1"], args)
    assert [r["variant"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert clashes == [] and {r["gpu"] for r in rows} == {"0", "1"}
    # "b" holds its GPU the longest, so the other GPU takes the runs that start meanwhile
    assert rows[1]["gpu"] != rows[2]["gpu"]


def test_a_fixed_accumulation_count_keeps_the_records_micro_batch_on_fewer_gpus():
    bench = _bench()
    assert bench.record_batch_on(1, {"GRAD_ACCUM_STEPS": "2"}) == {"GRAD_ACCUM_STEPS": "16"}
    assert bench.record_batch_on(4, {"GRAD_ACCUM_STEPS": "2"}) == {"GRAD_ACCUM_STEPS": "4"}
    assert bench.record_batch_on(1, {"GRAD_ACCUM_STEPS": "0"}) == {} == bench.record_batch_on(2, {})


def test_quality_mode_refuses_data_the_fast_variants_would_memorise(tmp_path, sample_data, capsys):
    data, _ = sample_data
    bench = _bench()
    root = data.parent.parent
    have = bench.train_tokens(root, 1024)
    assert have > 0
    args = ["--data-root", str(root), "--variants", "baseline", "--seconds", "300", "--out", str(tmp_path)]
    try:
        bench.main(args)
        raise AssertionError("a 300 s quality run on the sample data must be refused")
    except SystemExit as exc:
        message = str(exc)
    assert f"{have:,} train tokens" in message and "quote the globs" in message
    assert not (tmp_path / "variants.json").exists()  # refused before anything ran
    bench.check_enough_data(root, {1024}, 300, have / 300)  # exactly enough passes


def test_quality_mode_trains_for_the_given_wall_clock(tmp_path, sample_data):
    """6 s, not 3: the script stops before a step that its average step time says would end past the cap, and on
    a 2-core machine loaded by other jobs a 3 s run stopped after its first step."""
    data, _ = sample_data
    bench = _bench()
    args = ["--data-root", str(data.parent.parent), "--variants", "baseline", "--seconds", "6", "--timeout", "240"]
    args += ["--min-tokens-per-s", "0", "--out", str(tmp_path)] + [a for kv in TINY for a in ("--env", kv)]
    assert bench.main(args) == 0
    (row,) = json.loads((tmp_path / "variants.json").read_text())
    log = (tmp_path / "baseline" / "log.txt").read_text()
    assert row["exit"] == 0 and row["steps"] > 1 and "stopping_early: wallclock_cap" in log
    assert 0 < row["val_bpb"] < 10
    # the over-fitting diagnostics: passes over the train split, last train loss, the score before quantisation
    have = bench.train_tokens(data.parent.parent, 1024)
    assert row["train_passes"] == round(row["steps"] * row["tokens_per_step"] / have, 2) > 0
    assert 0 < row["train_loss_last"] < 10 and 0 < row["pre_quant_val_bpb"] < 10
    assert f"{row['pre_quant_val_bpb']:.4f} -> {row['val_bpb']:.4f}" in (tmp_path / "variants.md").read_text()


def test_an_override_can_name_its_variant(sample_data):
    """`--env kill-mamba2:COMPILE_SCOPE=blocks` reaches kill-mamba2's run only; a plain K=V reaches every run."""
    from builder.variants import get_variant

    data, _ = sample_data
    bench = _bench()
    args = argparse.Namespace(
        data_root=data.parent.parent, seconds=0, steps=5, nproc=1, share=False,
        env=["kill-mamba2:COMPILE_SCOPE=blocks", "EMA_DECAY=0", "baseline:VAL_TOKENS=1=2"],
    )  # fmt: skip
    km2 = bench.run_env("kill-mamba2", get_variant("kill-mamba2"), args, gpu="1")
    base = bench.run_env("baseline", get_variant("baseline"), args)
    assert km2["COMPILE_SCOPE"] == "blocks" and km2["EMA_DECAY"] == "0" and km2["CUDA_VISIBLE_DEVICES"] == "1"
    assert base.get("COMPILE_SCOPE") != "blocks" and base["EMA_DECAY"] == "0" and base["VAL_TOKENS"] == "1=2"
    assert km2["GRAD_ACCUM_STEPS"] == "16" and km2["ITERATIONS"] == "5"  # the record's micro-batch on one GPU


# each variant's tiny shape (as in tests/variants/test_compile_fullgraph.py), on top of the shared TINY settings
TINY_BY_VARIANT = {
    "kill-mamba2": ["NUM_LOOPS=2", "SSM_HEAD_DIM=16", "SSM_STATE=8"],
    "ttsm": ["NUM_LAYERS=3", "SSM_STATE=8", "BIGRAM_BUCKETS=31", "TRIGRAM_BUCKETS=64", "BIGRAM_DIM=4", "TRIGRAM_DIM=4"],
    "lru": [],
    "hybrid-3to1": ["NUM_LAYERS=4", "NUM_HEADS=2", "NUM_KV_HEADS=1", "S6_DT_RANK=4"],
    "mamba3-hybrid": [
        "NUM_LAYERS=3", "NUM_HEADS=2", "NUM_KV_HEADS=1", "MAMBA3_HEADDIM=16", "MAMBA3_D_STATE=16",
        "MAMBA3_CHUNK_SIZE=16", "ORTHO_INIT=0", "GPTQ_CALIB_SEQS=2", "GPTQ_CALIB_LEN=64", "TTT_EPOCHS=1",
        "EMA_START_STEP=0",
    ],
}  # fmt: skip


def test_every_ssm_variant_script_trains_exports_and_scores_on_the_cpu(tmp_path):
    """Each assembled SSM variant's own train_gpt.py (not its modules one by one) at a tiny shape: its record
    recipe's stages run end to end (ternary export, GPTQ on self-generated tokens, stateful and TTT scoring), and
    its log carries every figure bench/variants reads. sp1024 and sp8192 sample data, as the recipes ask."""
    import sentencepiece as spm

    from builder.data.sample import make_sample

    root = tmp_path / "data"
    for vocab in (1024, 8192):
        make_sample(root, docs=200, val_docs=20, seed=0, vocab_size=vocab)
    # a sample corpus holds fewer than 8,192 pieces' worth of text: the sp8192 variants take the tokenizer's size
    pieces = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / "fineweb_8192_bpe.model")).get_piece_size()
    sp8192 = [f"{name}:VOCAB_SIZE={pieces}" for name in ("lru", "mamba3-hybrid")]
    bench = _bench()
    common = ["TRAIN_SEQ_LEN=64", "TRAIN_BATCH_TOKENS=512", "EVAL_SEQ_LEN=64", "EVAL_BATCH_SEQS=4", "VAL_TOKENS=1024"]
    overrides = [kv for kv in TINY + common if not kv.startswith(("NUM_LAYERS", "NUM_LOOPS", "NUM_HEADS"))]
    overrides += [f"{name}:{kv}" for name, kvs in TINY_BY_VARIANT.items() for kv in kvs] + sp8192
    args = ["--data-root", str(root), "--variants", ",".join(TINY_BY_VARIANT), "--steps", "3", "--timeout", "400"]
    args += ["--out", str(tmp_path / "out")] + [a for kv in overrides for a in ("--env", kv)]
    status = bench.main(args)
    rows = json.loads((tmp_path / "out" / "variants.json").read_text())
    failed = {
        r["variant"]: (tmp_path / "out" / r["variant"] / "log.txt").read_text()[-1500:] for r in rows if r["exit"]
    }
    assert status == 0 and not failed, failed
    for r in rows:
        assert r["steps"] == 3 and 0 < r["bytes_model"] < r["bytes_total"] and 0 < r["val_bpb"] < 20, r
    logs = {r["variant"]: (tmp_path / "out" / r["variant"] / "log.txt").read_text() for r in rows}
    assert "gptq:quantization complete in" in logs["mamba3-hybrid"]
    assert "ema:applied decay=0.997 updates=3" in logs["mamba3-hybrid"].split("step:3/3 val_loss")[0]
    assert "final_ternary_brotli_roundtrip_exact" in logs["kill-mamba2"]
