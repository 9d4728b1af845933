"""Real upstream folders (../shared/fixtures/upstream-records): each verdict and the finding that decides it."""

from __future__ import annotations

import pytest

from validator.checks import run_checks
from validator.checks.context import CheckOptions, load_context
from validator.report import build_report

# folder -> (track, expected verdict, codes that must be present)
EXPECTED = {
    "2026-03-19_SlidingWindowEval": ("10min_16mb", "pass", {"TRAIN_TIME_STEP_OVERSHOOT", "FEW_SEEDS"}),
    "2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT": (
        "10min_16mb",
        "fail",
        {"TRAIN_DATA_AFTER_CAP", "HPARAMS_KEYS_DIFFER", "CODE_SIZE_DIFFERS_ACROSS_SEEDS", "SEED_BPB_ROUNDED"},
    ),
    "2026-04-15_Mamba3Hybrid_SP8192_GPTQ_TTT": (
        "non_record_16mb",
        "pass",
        {"EVAL_TIME_ZERO", "GPTQ_CALIBRATION_AFTER_CAP"},
    ),
    "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611": (
        "10min_16mb",
        "fail",
        {"TRAIN_DATA_AFTER_CAP", "CODE_BYTES_VIRTUAL_WRAPPER"},
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_upstream_fixture_verdicts(shared_dir, name):
    folder = shared_dir / "fixtures" / "upstream-records" / name
    if not folder.is_dir():
        pytest.skip(f"{name} is not among the shared fixtures")
    track, verdict, must = EXPECTED[name]
    ctx = load_context(folder, CheckOptions(allow_missing_code=True, track=track))
    report = build_report(ctx, run_checks(ctx))
    found = {f.code for f in report.findings}
    assert report.verdict == verdict, report.to_markdown()
    assert must <= found, sorted(found)
    assert "VALIDATOR_INTERNAL_ERROR" not in found
    assert not {"BPB_DENOMINATOR", "JSON_VAL_BPB_MISMATCH", "SEEDS_JSON_LOGS_MISMATCH"} & found
