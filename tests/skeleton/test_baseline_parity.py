"""The baseline rebuilt on the generic stack trains like the module set it replaced.

Reference curve: the validation losses the previous baseline script (commit b8f88f7,
submissions/2026-11-23_Baseline_9x512_Int8Zlib/train_gpt.py) printed on this test's sample data and settings,
seed 7, on the CPU. The schedule is step-based (no wall-clock cap), so the curve does not depend on the machine.
"""

from __future__ import annotations

import re
import subprocess
import sys

from builder.assemble import build_files
from builder.variants import get_variant

PREVIOUS = {10: 4.8218, 20: 4.0239, 30: 3.7498}
SETTINGS = dict(
    MODEL_DIM=64, NUM_LAYERS=4, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=2048,
    GRAD_ACCUM_STEPS=1, ITERATIONS=30, WARMDOWN_ITERS=10, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=2,
    VAL_LOSS_EVERY=10, TRAIN_LOG_EVERY=10, VAL_TOKENS=8192, SEED=7,
)  # fmt: skip


def test_loss_curve_matches_the_previous_baseline(tmp_path, sample_data):
    data, tokenizer = sample_data
    script = tmp_path / "train_gpt.py"
    script.write_text(build_files(get_variant("baseline"), "2026-11-27", "a", "b")["train_gpt.py"])
    env = {k: str(v) for k, v in SETTINGS.items()} | {"DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    curve = {int(m[1]): float(m[2]) for m in re.finditer(r"^step:(\d+)/30 val_loss:([0-9.]+)", done.stdout, re.M)}
    assert curve.keys() == PREVIOUS.keys()
    for step, loss in PREVIOUS.items():
        assert abs(curve[step] - loss) / loss < 0.005, (step, curve[step], loss)


def test_packed_script_runs_and_counts_its_packed_bytes(tmp_path, sample_data):
    data, tokenizer = sample_data
    files = build_files(get_variant("baseline"), "2026-11-27", "a", "b", pack=True)
    (tmp_path / "train_gpt.py").write_text(files["train_gpt.py"])
    env = dict(SETTINGS, ITERATIONS=2, VAL_LOSS_EVERY=0, VAL_TOKENS=2048, DATA_PATH=data, TOKENIZER_PATH=tokenizer)
    env = {"PATH": "/usr/bin:/bin", **{k: str(v) for k, v in env.items()}}
    done = subprocess.run(
        [sys.executable, "train_gpt.py"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Code size: {len(files['train_gpt.py'].encode())} bytes" in done.stdout
    assert re.search(r"^final_int8_zlib_roundtrip_exact val_loss:\d", done.stdout, re.M)
