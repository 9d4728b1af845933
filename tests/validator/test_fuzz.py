"""Hostile input never crashes the validator and never makes it read outside the folder."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.validator.conftest import write_submission
from validator.checks import INTERNAL_ERROR, run_checks
from validator.checks.context import load_context
from validator.logs import parse_log
from validator.loose import read_submission
from validator.report import build_report

FRAGMENTS = [
    "seed:",
    "  seed: ",
    "step:",
    "/20000 train_loss:",
    " train_time:",
    "ms",
    "stopping_early: wallclock_cap train_time:",
    "Code size: ",
    " bytes",
    "Total submission size int8+zlib: ",
    "Serialized model int6+brotli: ",
    "final_int8_zlib_roundtrip_exact val_loss:",
    " val_bpb:",
    "quantized_ttt_phased",
    "eval_time:",
    "GPTQ:collected 67 Hessians in ",
    "s",
    "Hyperparameters:",
    "result_json ",
    "{",
    "}",
    "=" * 100,
    "import os",
    "nan",
    "-1e309",
    "1.5",
    "99999999999999999999999",
    "\n",
    " ",
    "\x00",
    "\ud800",
]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
KEYS = ["author", "val_bpb", "seeds", "seed_results", "bytes_total", "code_bytes", "track", "date", "val_loss"]


@SETTINGS
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=12), max_size=80).map("".join))
def test_parse_log_never_raises(text):
    log = parse_log(text)
    _ = (log.score, log.eval_time_ms, log.config, log.complete)


@SETTINGS
@given(st.text(max_size=300))
def test_read_submission_never_raises_on_text(text):
    sub, findings = read_submission(text)
    assert sub is not None or findings


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=9))
def test_read_submission_never_raises_on_shapes(data):
    read_submission(json.dumps(data))


def _check(folder: Path):
    ctx = load_context(folder)
    report = build_report(ctx, run_checks(ctx))
    assert INTERNAL_ERROR not in {f.code for f in report.findings}, report.to_markdown()
    report.to_json()
    report.to_markdown()
    return report


@SETTINGS
@given(
    log=st.binary(max_size=2000),
    meta=st.binary(max_size=500)
    | st.dictionaries(st.sampled_from(KEYS), json_values, max_size=9).map(lambda d: json.dumps(d).encode()),
    script=st.binary(max_size=500),
)
def test_binary_junk_folder_is_checked_without_crash(log, meta, script):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "records" / "track_10min_16mb" / "2026-05-01_Junk"
        folder.mkdir(parents=True)
        (folder / "train_seed1.log").write_bytes(b"val_loss " + log)
        (folder / "submission.json").write_bytes(meta)
        (folder / "train_gpt.py").write_bytes(script)
        (folder / "README.md").write_bytes(log[:100])
        _check(folder)


# values a log can print and the checks must take in stride: zero, negative, huge, not finite
EXTREME_FLOATS = [0.0, -1.0, 1e-300, 0.49, 1e12 + 1, 1e15, 1e300, float("inf"), float("-inf"), float("nan")]
EXTREME_INTS = [0, -1, 1, 15_999_999, 16_000_001, 2**31, 2**63, 10**30]
ext_floats = st.sampled_from(EXTREME_FLOATS) | st.floats(allow_nan=True, allow_infinity=True)
ext_ints = st.sampled_from(EXTREME_INTS) | st.integers(min_value=-(10**20), max_value=10**20)
HPARAM_KEYS = ["max_wallclock_seconds", "val_doc_fraction", "force_stop_step", "vocab_size", "seed", "slot_enabled"]
TEXT_FRAGMENTS = [f for f in FRAGMENTS if f != "\ud800"]  # a lone surrogate cannot be written as UTF-8
hparam_values = (
    st.sampled_from(TEXT_FRAGMENTS)
    | ext_floats.map(str)
    | ext_ints.map(str)
    | st.lists(st.sampled_from(TEXT_FRAGMENTS), max_size=4).map("".join)
)


@st.composite
def parseable_folders(draw: st.DrawFn) -> dict:
    """write_submission's knobs: logs in the real formats (so runs are scored) with extreme or malformed values."""
    seeds = draw(st.dictionaries(st.integers(0, 2**32), ext_floats, min_size=1, max_size=3))
    log_kwargs = {
        "model_bytes": draw(ext_ints),
        "train_ms": draw(ext_floats),
        "eval_ms": draw(ext_floats),
        "stopped": draw(st.booleans()),
        "hessian_s": draw(st.none() | ext_floats),
        "val_tokens": draw(ext_ints),
        "train_shards": draw(ext_ints),
        "loss": draw(st.none() | ext_floats),
        "hparams": draw(st.dictionaries(st.sampled_from(HPARAM_KEYS), hparam_values, max_size=3)),
    }
    if draw(st.booleans()):
        log_kwargs["total_bytes"] = draw(ext_ints)
    numbers = ext_floats | ext_ints
    overrides = draw(st.dictionaries(st.sampled_from(["val_bpb", "bytes_total", "val_loss"]), numbers, max_size=2))
    return {"seeds": seeds, "log_kwargs": log_kwargs, "json_overrides": overrides}


@SETTINGS
@given(knobs=parseable_folders())
def test_scored_logs_with_extreme_values_are_findings_not_crashes(knobs):
    """Malformed but parseable: every run is scored, so every check sees the values (a crash is INTERNAL_ERROR)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_submission(Path(tmp), **knobs)
        report = _check(folder)
        assert report.exit_code in (0, 1)


@pytest.mark.parametrize(
    "seeds, loss",
    [
        ({42: 0.0, 1337: 1.05, 2024: 1.05}, 1.0),  # bpb_ratio divided by a zero score
        ({42: 5e-324, 1337: 1.05, 2024: 1.05}, 1.0),  # ... and by 1 + rel == 0 for a denormal one
        ({42: 2.3e77, 1337: 0.0, 2024: 1.05}, 1.0),  # the t-test squared 1e77 (OverflowError)
        ({42: float("inf"), 1337: 1.05, 2024: 1.05}, 1.0),  # the report formatted a None delta
        ({42: 0.0, 1337: 0.0}, 8.98846567431158e307),  # fmean of the val_losses overflowed in fsum
    ],
)
def test_absurd_scores_are_findings(make_submission, seeds, loss):
    report = _check(make_submission(seeds=seeds, log_kwargs={"loss": loss}))
    assert report.exit_code == 1
    assert {"SCORE_NOT_FINITE", "SUSPICIOUS_LOW_BPB", "BPB_DENOMINATOR"} & {f.code for f in report.findings}


def test_huge_log_is_read_capped(tmp_path, monkeypatch):
    import validator.folder as vf

    monkeypatch.setattr(vf, "READ_CAP_BYTES", 256 * 1024)
    folder = tmp_path / "2026-05-01_Huge"
    folder.mkdir()
    line = b"step:1/20000 train_loss:5.0 train_time:10ms step_avg:10ms\n"
    tail = b"final_int8_zlib_roundtrip_exact val_loss:2.0 val_bpb:1.2\n"
    tail += b"Total submission size int8+zlib: 15000000 bytes\n"
    (folder / "train_seed1.log").write_bytes(line * 40_000 + tail)
    report = _check(folder)
    assert "FILE_LARGE" in {f.code for f in report.findings}
    assert report.seeds[0]["val_bpb"] == 1.2  # the tail was read


def test_no_read_outside_the_folder(tmp_path, make_submission):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("secret.log", "secret.json", "secret.py"):
        (outside / name).write_text("val_loss 1 final_int8_zlib_roundtrip_exact val_loss:1 val_bpb:0.1\n")
    folder = make_submission()
    (folder / "train_gpt.py").unlink()
    os.symlink(outside / "secret.py", folder / "train_gpt.py")
    os.symlink(outside / "secret.log", folder / "train_seed9.log")
    os.symlink(outside, folder / "logs")
    os.close(os.open(os.path.join(os.fsencode(folder), b"train_seed\xff.log"), os.O_CREAT | os.O_WRONLY, 0o644))
    opened: list[str] = []
    recording = [True]

    def hook(event, args):
        if recording[0] and event == "open" and args and isinstance(args[0], (str, bytes)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        report = _check(folder)
    finally:
        recording[0] = False
    planted = {"secret.log", "secret.json", "secret.py"}  # not just "secret": the stdlib has secrets.py
    assert not [p for p in opened if str(outside) in p or os.path.basename(p) in planted]
    found = {f.code for f in report.findings}
    assert {"SYMLINK_OUTSIDE_FOLDER", "NAME_NOT_UTF8", "MISSING_SCRIPT"} <= found
    assert report.exit_code == 1
