"""`builder plan`: parameter groups on the meta device, estimated bytes, code bytes, the margin and the exit status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builder.assemble import build_files
from builder.cli import main
from builder.variants import get_variant

SUMMARY = re.compile(r"^model ([\d,]+) \((.*)\) \+ code ([\d,]+) = ([\d,]+) bytes; margin (-?[\d,]+)$", re.M)


def _summary(out: str) -> tuple[int, str, int, int, int]:
    """(model, basis, code, total, margin) from plan's summary line."""
    m = SUMMARY.search(out)
    assert m, out
    num = lambda i: int(m.group(i).replace(",", ""))  # noqa: E731
    return num(1), m.group(2), num(3), num(4), num(5)


def _group_bytes(out: str) -> int:
    """The sum of the per-quantiser 'est. bytes' column."""
    rows = re.findall(r"^\w+\s+\d+\s+[\d,]+\s+[\d.]+\s+([\d,]+)  ", out, re.M)
    assert rows, out
    return sum(int(r.replace(",", "")) for r in rows)


def test_baseline_fits_with_its_groups(capsys):
    assert main(["plan", "--variant", "baseline"]) == 0
    out = capsys.readouterr().out
    assert "17,059,912 parameters" in out
    assert re.search(r"^int8\s+55\s+17,039,360", out, re.M)  # the int8 group: every large matrix
    margin = int(re.search(r"margin (-?[\d,]+)", out).group(1).replace(",", ""))
    assert 0 < margin < 200_000  # the naive baseline is known to fit with little room


def test_a_model_that_cannot_fit_exits_1_saying_by_how_much(capsys):
    assert main(["plan", "--variant", "baseline", "--env", "MODEL_DIM=768"]) == 1
    assert re.search(r"does not fit: [\d,]+ bytes over the 16,000,000-byte cap", capsys.readouterr().out)


def test_ternary_variant_groups_and_bad_input(capsys):
    assert main(["plan", "--variant", "kill-mamba2"]) == 0
    out = capsys.readouterr().out
    assert "61,657,752 parameters" in out and re.search(r"^ternary2\s+63\s", out, re.M)
    assert main(["plan", "--variant", "baseline", "--env", "LAYER_PATTERN=nope"]) == 2
    assert "unknown mixer 'nope'" in capsys.readouterr().err


def test_fit_reports_the_largest_value_that_fits(capsys):
    assert main(["plan", "--variant", "baseline", "--fit", "MODEL_DIM=448:576:64"]) == 0
    out = capsys.readouterr().out
    assert "largest MODEL_DIM that fits: 512" in out  # 576 is over, 512 is the baseline itself
    assert main(["plan", "--variant", "baseline", "--fit", "MODEL_DIM=640:704:64"]) == 1
    assert "no value of MODEL_DIM in 640..704 fits" in capsys.readouterr().out
    assert main(["plan", "--variant", "baseline", "--fit", "MODEL_DIM=7"]) == 2


def test_total_counts_the_assembled_script(capsys):
    """The plan's total is model + code, and code is the byte length of the train_gpt.py `builder` would write."""
    assert main(["plan", "--variant", "baseline"]) == 0
    model, basis, code, total, margin = _summary(capsys.readouterr().out)
    script = build_files(get_variant("baseline"), "2000-01-01", "-", "-", "record")["train_gpt.py"]
    assert code == len(script.encode("utf-8")) > 10_000
    assert basis == "estimated"
    assert abs(total - (model + code)) <= 1  # each figure is rounded on its own
    assert margin == 16_000_000 - total


def test_measured_replaces_the_estimate_and_scales_the_groups(capsys, tmp_path: Path):
    from tests.validator.conftest import make_log

    assert main(["plan", "--variant", "baseline"]) == 0
    estimate, *_ = _summary(capsys.readouterr().out)
    measured = 14_321_987
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_seed1337.log").write_text(make_log(1337, 1.2, code_bytes=50_000, model_bytes=measured))
    assert main(["plan", "--variant", "baseline", "--measured", str(run)]) == 0
    out = capsys.readouterr().out
    model, basis, code, total, _ = _summary(out)
    assert model == measured and total == measured + code
    assert f"x{measured / estimate:.3f}" in basis
    assert _group_bytes(out) == pytest.approx(measured, abs=5)  # every group scaled by measured / estimate
