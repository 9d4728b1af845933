"""The fifteen failure modes of Parameter Golf submissions, each in a folder crafted here, and a clean folder."""

from __future__ import annotations

import pytest

from validator.checks import run_checks
from validator.checks.context import CheckOptions, load_context
from validator.findings import Severity
from validator.report import build_report


def check(path, **opts):
    ctx = load_context(path, CheckOptions(**opts))
    return build_report(ctx, run_checks(ctx))


def codes(report, severity=None):
    return {f.code for f in report.findings if severity is None or f.severity == severity}


def test_clean_folder_passes(make_submission):
    report = check(make_submission())
    assert report.verdict == "pass", report.to_markdown()
    assert not codes(report, Severity.ERROR)
    assert not codes(report, Severity.WARNING), report.to_markdown()
    assert report.exit_code == 0
    sig = report.figures["significance"]
    assert sig["passes_practice"] and sig["passes_readme"]


def test_1_artifact_over_cap_claimed_under(make_submission):
    folder = make_submission(log_kwargs={"model_bytes": 16_054_000}, json_overrides={"bytes_total": 15_999_370})
    report = check(folder)
    assert "SIZE_OVER_CAP" in codes(report, Severity.ERROR)
    assert "BYTES_TOTAL_MISMATCH" in codes(report, Severity.WARNING)


def test_2_virtual_wrapper_code_count(make_submission):
    body = "# padding that a minifier removes\n" * 4200
    script = '"""Record script with a large body."""\n\nimport os\n\n' + body + "print(os.getpid())\n"
    raw = len(script.encode())
    lines = [f"Code size (uncompressed): {raw} bytes", "Code size (compressed): 31999 bytes"]
    folder = make_submission(
        script=script, log_kwargs={"model_bytes": 15_900_000, "code_lines": lines, "total_bytes": 15_931_999}
    )
    report = check(folder)
    assert "CODE_BYTES_VIRTUAL_WRAPPER" in codes(report, Severity.WARNING)
    assert "SIZE_OVER_CAP" not in codes(report)
    assert report.figures["size"]["seed 42"]["totals"]["raw"] > 16_000_000
    summary = next(f.message for f in report.findings if f.code == "SIZE_CONVENTIONS")
    assert summary.endswith("under the cap with: wrapped")


HELPER_SCRIPT = "import os\nimport helpers\n\nprint(helpers.X, os.getpid())\n"
HELPER_MODULE = "X = 1\n" + "# pad\n" * 20_000  # 120,006 bytes of helper code


def test_2b_helper_modules_count_toward_the_cap(make_submission):
    """A 56-byte script + a 120 KB local module + a 15,950,000-byte model is over the cap (#1412, #1514)."""
    folder = make_submission(script=HELPER_SCRIPT, log_kwargs={"model_bytes": 15_950_000})
    (folder / "helpers.py").write_text(HELPER_MODULE)
    report = check(folder)
    assert report.verdict == "fail", report.to_markdown()
    over = [f for f in report.findings if f.code == "SIZE_OVER_CAP"]
    assert over and all(f.severity == Severity.ERROR for f in over)
    assert "CODE_BYTES_VIRTUAL_WRAPPER" not in codes(report)
    message = over[0].message
    assert "\n" not in message and "helpers.py" in message and "fold them into the script" in message
    totals = report.figures["size"]["seed 42"]["totals"]
    assert totals["with_modules"] == 15_950_000 + len(HELPER_SCRIPT) + len(HELPER_MODULE)
    assert totals["wrapped"] > 16_000_000
    summary = next(f.message for f in report.findings if f.code == "SIZE_CONVENTIONS")
    assert summary.endswith("under the cap with: none")


def test_2c_helper_modules_under_the_cap_pass(make_submission):
    folder = make_submission(script=HELPER_SCRIPT, log_kwargs={"model_bytes": 15_800_000})
    (folder / "helpers.py").write_text(HELPER_MODULE)
    report = check(folder)
    assert "SIZE_OVER_CAP" not in codes(report), report.to_markdown()
    assert "LOCAL_MODULES" in codes(report)


@pytest.mark.parametrize(
    "inflated, flagged",
    [
        (1.167, True),  # "+1 leading space" byte table: 16.7 % more bytes, lower bpb
        (1.04, True),  # byte-fallback pieces counted as 3 bytes: ~4 %
        (1.015, True),  # just past the 1 % tolerance
        (1.005, False),  # within it: float rounding of logged figures, not a byte-table bug
    ],
)
def test_3_bpb_denominator_bug(make_submission, inflated, flagged):
    kwargs = {
        s: {"loss": b * inflated * 0.6931471805599453 / (62_021_632 / 151_080_891)}
        for s, b in {42: 1.05, 1337: 1.0502, 2024: 1.0499}.items()
    }
    folder = make_submission(seeds={42: 1.05, 1337: 1.0502, 2024: 1.0499}, per_seed_kwargs=kwargs)
    report = check(folder)
    assert ("BPB_DENOMINATOR" in codes(report, Severity.ERROR)) is flagged
    assert flagged or "BPB_DENOMINATOR" not in codes(report)


def test_4_unnormalised_ngram_cache(make_submission):
    seeds = {42: 0.4501, 1337: 0.4503, 2024: 0.4499}
    folder = make_submission(seeds=seeds, log_kwargs={"hparams": {"ngram_cache_enabled": "True"}})
    report = check(folder)
    assert "NGRAM_CACHE_ENABLED" in codes(report, Severity.ERROR)
    assert "SUSPICIOUS_LOW_BPB" in codes(report, Severity.WARNING)


def test_4b_flag_off_is_not_an_error(make_submission):
    folder = make_submission(log_kwargs={"hparams": {"ngram_cache_enabled": "False", "slot_enabled": "0"}})
    report = check(folder)
    assert not codes(report) & {"NGRAM_CACHE_ENABLED", "SLOT_ENABLED"}


def test_5_eval_token_leakage_slot_and_prequant_ttt(make_submission):
    folder = make_submission(log_kwargs={"hparams": {"slot_enabled": "True", "prequant_ttt_enabled": "1"}})
    report = check(folder)
    assert {"SLOT_ENABLED", "PREQUANT_TTT_ENABLED"} <= codes(report, Severity.ERROR)


def test_6_train_val_overlap(make_submission):
    hp = {"train_files": "./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin"}
    folder = make_submission(log_kwargs={"hparams": hp, "val_tokens": 12_400_000})
    report = check(folder)
    assert "VAL_IN_TRAINING" in codes(report, Severity.ERROR)
    assert "VAL_TOKENS_UNCANONICAL" in codes(report, Severity.WARNING)


def test_7_cross_document_leak_at_bos(make_submission):
    script = '''"""Token-shift mixing without a BOS mask, while attention isolates documents."""

import torch


def attend(q, k, v, cu_seqlens):
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)


def smear(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return x + gate * prev


def main():
    x = torch.zeros(1, 4, 8)
    cu = torch.tensor([0, 2, 4])
    return attend(smear(x, 0.5), x, x, cu)


if __name__ == "__main__":
    main()
'''
    report = check(make_submission(script=script))
    assert "BOS_LEAK_TOKEN_SHIFT" in codes(report, Severity.ERROR), report.to_markdown()


def test_8_training_data_after_cap(make_submission):
    folder = make_submission(log_kwargs={"train_ms": 599_500.0, "hessian_s": 4.7})
    report = check(folder)
    assert "TRAIN_DATA_AFTER_CAP" in codes(report, Severity.ERROR)


def test_8b_gptq_inside_budget_passes(make_submission):
    folder = make_submission(log_kwargs={"train_ms": 588_000.0, "hessian_s": 3.5})
    assert "TRAIN_DATA_AFTER_CAP" not in codes(check(folder))


def test_8c_gptq_past_its_own_reserve(make_submission):
    """A run that keeps 60 s of its cap for GPTQ on self-generated tokens and then takes 90.5 s (ssm-golf's
    mamba3-hybrid did on an H200 before its generator was mended) ran 30.5 s past the cap."""

    def gptq_lines(total: float) -> list[str]:
        return ["gptq:reserving 60s, effective=540000ms", "gptq:generated 16 seqs of 1024 tokens in 86.4s",
                f"gptq:quantization complete in {total}s", "Code size: 60000 bytes"]  # fmt: skip

    over = check(make_submission(log_kwargs={"train_ms": 540_100.0, "code_lines": gptq_lines(90.5)}))
    assert "GPTQ_OVER_RESERVE" in codes(over, Severity.WARNING), over.to_markdown()
    assert "30.5 s past the cap" in over.to_markdown()
    within = check(make_submission(log_kwargs={"train_ms": 540_100.0, "code_lines": gptq_lines(12.0)}))
    assert "GPTQ_OVER_RESERVE" not in codes(within)


def test_9_train_overrun_with_force_stop_step(make_submission):
    hp = {"force_stop_step": "13000"}
    folder = make_submission(log_kwargs={"train_ms": 601_153.0, "stopped": False, "hparams": hp})
    report = check(folder)
    assert "TRAIN_TIME_OVER_LIMIT" in codes(report, Severity.ERROR)
    assert "FORCE_STOP_STEP" in codes(report, Severity.WARNING)


def test_9b_one_step_overshoot_is_a_note(make_submission):
    folder = make_submission(log_kwargs={"train_ms": 600_028.0})
    report = check(folder)
    assert "TRAIN_TIME_STEP_OVERSHOOT" in codes(report, Severity.NOTE)
    assert report.verdict == "pass"


def test_9c_raised_wallclock(make_submission):
    folder = make_submission(log_kwargs={"hparams": {"max_wallclock_seconds": "900"}})
    assert "WALLCLOCK_OVERRIDE" in codes(check(folder), Severity.ERROR)


def test_10_eval_overrun(make_submission):
    folder = make_submission(log_kwargs={"eval_ms": 688_000.0})
    assert "EVAL_TIME_OVER_LIMIT" in codes(check(folder), Severity.ERROR)


def test_11_stale_evidence(make_submission):
    old = '"""An older version of the script."""\n\nimport os\n\nprint(os.getcwd())\n'
    folder = make_submission(
        log_kwargs={"embedded_source": old, "code_bytes": len(old)}, json_overrides={"val_bpb": 1.04}
    )
    report = check(folder)
    assert {"EMBEDDED_SOURCE_DIFFERS", "JSON_VAL_BPB_MISMATCH"} <= codes(report, Severity.ERROR)
    assert "LOG_CODE_SIZE_STALE" in codes(report, Severity.WARNING)


def test_11b_embedded_source_equal_passes(make_submission):
    script = '"""Same script in the log and in the folder."""\n\nprint("hi")\n'
    folder = make_submission(script=script, log_kwargs={"embedded_source": script})
    report = check(folder)
    assert not codes(report) & {"EMBEDDED_SOURCE_DIFFERS", "LOG_CODE_SIZE_STALE"}
    assert report.verdict == "pass"


def test_12_insufficient_evidence(make_submission):
    folder = make_submission(skip=("submission.json", "logs"))
    report = check(folder)
    assert {"MISSING_SUBMISSION_JSON", "MISSING_LOGS"} <= codes(report, Severity.ERROR)
    one = make_submission(seeds={42: 1.05})
    assert "FEW_SEEDS" in codes(check(one), Severity.WARNING)


def test_13_misfiled_track(make_submission):
    folder = make_submission(json_overrides={"track": "non-record-unlimited-compute-16mb"})
    assert "TRACK_MISFILED" in codes(check(folder), Severity.ERROR)


FRONTIER_0427 = "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611"


def test_14_significance(make_submission):
    seeds = {42: 1.0600, 1337: 1.0625, 2024: 1.0605}  # mean 1.0610 vs frontier 1.06108: no real win
    report = check(make_submission(seeds=seeds), previous=FRONTIER_0427)
    assert "SIGNIFICANCE_PRACTICE_FAIL" in codes(report, Severity.ERROR)
    close = {42: 1.0595, 1337: 1.0590, 2024: 1.0592}  # significant, but short of 0.005 nats
    report = check(make_submission(seeds=close), previous=FRONTIER_0427)
    assert "SIGNIFICANCE_README_FAIL" in codes(report, Severity.WARNING)


def test_15_attribution(make_submission):
    readme = "# Record\n\nBuilds on the depth recurrence of PR #1493 @dexhunter.\n"
    assert "ATTRIBUTION_MISMATCH" in codes(check(make_submission(readme=readme)), Severity.WARNING)
    good = "# Record\n\nBuilds on PR #1493 @bigbag.\n"
    assert "ATTRIBUTION_MISMATCH" not in codes(check(make_submission(readme=good)))


def test_mixed_configs_across_seeds(make_submission):
    folder = make_submission(per_seed_kwargs={2024: {"hparams": {"model_dim": "640"}}})
    assert "HPARAMS_DIFFER" in codes(check(folder), Severity.ERROR)


def test_seeds_in_json_differ_from_logs(make_submission):
    folder = make_submission(json_overrides={"seeds": [42, 1337, 7]})
    assert "SEEDS_JSON_LOGS_MISMATCH" in codes(check(folder), Severity.ERROR)


def test_round_and_zero_bytes(make_submission):
    report = check(make_submission(json_overrides={"bytes_total": 15_900_000}))
    assert "ROUND_BYTES" in codes(report, Severity.WARNING)
    report = check(make_submission(json_overrides={"bytes_total": 0}))
    assert "SIZE_ZERO" in codes(report, Severity.ERROR)


def test_model_only_bytes(make_submission):
    report = check(make_submission(json_overrides={"bytes_total": 15_500_000}))
    assert "BYTES_TOTAL_MODEL_ONLY" in codes(report, Severity.ERROR)
