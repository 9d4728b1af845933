"""`builder plan`: parameter groups on the meta device, estimated bytes, code bytes, the margin and the exit status."""

from __future__ import annotations

import re

from builder.cli import main


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
