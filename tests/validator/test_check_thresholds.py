"""Each static check at the edge of its rule: a case just over every cut-off, so a loosened threshold or a broken
pattern fails a test (the audit's mutation run found these unpinned)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.validator.test_failure_modes import check, codes
from validator.findings import Severity

# --- banned eval-time tricks echoed as on (validator/checks/legal_flags.py) ---


@pytest.mark.parametrize(
    "key, code",
    [
        ("etlb_enabled", "ETLB_ENABLED"),  # eval-time logit bias fitted on val, #1399
        ("two_pass_enabled", "TWO_PASS_ENABLED"),  # two-pass re-scoring, #869
        ("rescore_enabled", "TWO_PASS_ENABLED"),
        ("ppm_enabled", "BYTE_MIXTURE_ENABLED"),  # byte-level mixture, #1872
        ("byte_mix_enabled", "BYTE_MIXTURE_ENABLED"),
        ("gptq_calib_val", "VAL_CALIBRATION_ENABLED"),  # calibration on val tokens, #593
        ("awq_on_val_enabled", "VAL_CALIBRATION_ENABLED"),
        ("val_calib_enabled", "VAL_CALIBRATION_ENABLED"),
    ],
)
def test_banned_trick_flag_on_is_an_error(make_submission: Callable[..., Path], key: str, code: str) -> None:
    report = check(make_submission(log_kwargs={"hparams": {key: "True"}}))
    assert code in codes(report, Severity.ERROR), report.to_markdown()
    off = check(make_submission(log_kwargs={"hparams": {key: "False"}}))
    assert code not in codes(off)


def test_temperature_fit_on_val_line(make_submission: Callable[..., Path]) -> None:
    lines = ["Code size: 0 bytes", "optimal_T: 0.9512 (grid search on val_tokens)"]
    report = check(make_submission(log_kwargs={"code_lines": lines}))
    assert "TEMPERATURE_FIT_ON_VAL" in codes(report, Severity.WARNING), report.to_markdown()


# --- time limits (validator/checks/timing.py) ---


def test_eval_just_over_the_limit(make_submission: Callable[..., Path]) -> None:
    """#1129 (~610 s) and #1420 (615 s) overran the eval limit by seconds, not minutes."""
    report = check(make_submission(log_kwargs={"eval_ms": 610_000.0}))
    assert "EVAL_TIME_OVER_LIMIT" in codes(report, Severity.ERROR)
    inside = check(make_submission(log_kwargs={"eval_ms": 599_000.0}))
    assert "EVAL_TIME_OVER_LIMIT" not in codes(inside)


def test_train_stopped_early_but_over_by_more_than_a_step(make_submission: Callable[..., Path]) -> None:
    """#1908's 601,153 ms was called out; upstream accepted stop-check overshoots up to 600,137 ms."""
    report = check(make_submission(log_kwargs={"train_ms": 601_153.0, "stopped": True}))
    assert "TRAIN_TIME_OVER_LIMIT" in codes(report, Severity.ERROR)
    accepted = check(make_submission(log_kwargs={"train_ms": 600_137.0, "stopped": True}))
    assert "TRAIN_TIME_OVER_LIMIT" not in codes(accepted)
    assert "TRAIN_TIME_STEP_OVERSHOOT" in codes(accepted, Severity.NOTE)


def test_wallclock_override_just_above_600(make_submission: Callable[..., Path]) -> None:
    report = check(make_submission(log_kwargs={"hparams": {"max_wallclock_seconds": "700"}}))
    assert "WALLCLOCK_OVERRIDE" in codes(report, Severity.ERROR)
    assert "WALLCLOCK_OVERRIDE" not in codes(check(make_submission()))


# --- data fingerprints (validator/checks/fingerprints.py) ---


def test_half_the_val_split_is_an_error(make_submission: Callable[..., Path]) -> None:
    report = check(make_submission(log_kwargs={"hparams": {"val_doc_fraction": "0.5"}}))
    assert "VAL_SUBSET" in codes(report, Severity.ERROR)
    full = check(make_submission(log_kwargs={"hparams": {"val_doc_fraction": "1.0"}}))
    assert "VAL_SUBSET" not in codes(full)


CASEOPS = {
    "tokenizer_path": "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
    "train_files": "./data/datasets/fineweb10B_sp8192_caseops/fineweb_train_*.bin",
    "val_files": "./data/datasets/fineweb10B_sp8192_caseops/fineweb_val_*.bin",
    "vocab_size": "8192",
}
SIDECAR = {"val_bytes_files": "./data/datasets/fineweb10B_sp8192_caseops/fineweb_val_bytes_*.bin"}


def _caseops(make_submission: Callable[..., Path], hparams: dict[str, str], shards: int = 80):
    return check(
        make_submission(log_kwargs={"hparams": hparams, "val_tokens": 47_851_520, "train_shards": shards}),
        skip_source=True,
    )


def test_caseops_byte_sidecar(make_submission: Callable[..., Path]) -> None:
    assert "BYTE_SIDECAR_MISSING" in codes(_caseops(make_submission, CASEOPS), Severity.WARNING)
    assert "BYTE_SIDECAR_MISSING" not in codes(_caseops(make_submission, {**CASEOPS, **SIDECAR}))


def test_caseops_train_shards(make_submission: Callable[..., Path]) -> None:
    report = _caseops(make_submission, {**CASEOPS, **SIDECAR}, shards=64)
    assert "TRAIN_SHARDS_UNCANONICAL" in codes(report, Severity.WARNING)
    assert "TRAIN_SHARDS_UNCANONICAL" not in codes(_caseops(make_submission, {**CASEOPS, **SIDECAR}))


# --- seeds (validator/checks/seeds.py) ---


def test_two_scored_logs_for_one_seed(make_submission: Callable[..., Path]) -> None:
    folder = make_submission()
    (folder / "train_seed42_rerun.log").write_text((folder / "train_seed42.log").read_text())
    report = check(folder, skip_source=True)
    dup = [f for f in report.findings if f.code == "DUPLICATE_SEED"]
    assert dup and dup[0].severity == Severity.WARNING and "seed 42" in dup[0].message


# --- significance against the frontier (validator/checks/significance.py, validator/significance.py) ---

PREVIOUS = [1.0510, 1.0520, 1.0500]  # a frontier row of three seeds, mean 1.0510, sd 0.001


def _against_previous(make_submission: Callable[..., Path], tmp_path: Path, seeds: list[float]):
    frontier = tmp_path / "frontier.json"
    row = {"date": "2026-04-01", "pr": 9001, "folder": "2026-04-01_Prev", "seed_bpb": PREVIOUS}
    frontier.write_text(json.dumps({"rows": [row]}))
    folder = make_submission(seeds=dict(zip((42, 1337, 2024), seeds, strict=True)))
    report = check(folder, frontier_file=frontier, skip_source=True)
    return report, report.figures["significance"]


def test_practice_cutoff_p_about_0_3(make_submission: Callable[..., Path], tmp_path: Path) -> None:
    """Better on average but p ~ 0.29: not significant at the maintainers' p < 0.25."""
    report, sig = _against_previous(make_submission, tmp_path, [1.0505, 1.0515, 1.0495])
    assert 0.25 < sig["p_practice"] < 0.35
    assert "SIGNIFICANCE_PRACTICE_FAIL" in codes(report, Severity.ERROR)


def test_readme_cutoff_p_between_0_01_and_0_05(make_submission: Callable[..., Path], tmp_path: Path) -> None:
    """0.005 bpb better (over the 0.00296 bpb margin) at p ~ 0.03 against the margin: misses the README's p < 0.01."""
    report, sig = _against_previous(make_submission, tmp_path, [x - 0.005 for x in PREVIOUS])
    assert sig["passes_practice"] and 0.01 < sig["p_readme"] < 0.05
    assert "SIGNIFICANCE_README_FAIL" in codes(report, Severity.WARNING)
    report, sig = _against_previous(make_submission, tmp_path, [x - 0.008 for x in PREVIOUS])
    assert sig["p_readme"] < 0.01 and sig["passes_readme"]
    assert not codes(report) & {"SIGNIFICANCE_README_FAIL", "SIGNIFICANCE_PRACTICE_FAIL"}
