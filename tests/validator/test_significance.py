"""Significance: the maintainers' two published p-values reproduced; the README rule and the frontier choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from validator.significance import assess, choose_previous, load_frontier, margin_bpb, one_sided_p

CASES = json.loads((Path(__file__).parent / "data" / "significance_cases.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["new"][:8] for c in CASES])
def test_published_p_values(case):
    p, test = one_sided_p(case["new_bpb"], case["previous_bpb"])
    assert test == "one-sided Welch t-test"
    assert round(p, 3) == case["published_p"]


def test_readme_rule_uses_the_margin():
    prev = {"pr": 1, "date": "2026-01-01", "seed_bpb": [1.10, 1.1002, 1.0998]}
    margin = margin_bpb(val_loss=2.0, val_bpb=1.2)
    assert margin == pytest.approx(0.005 * 1.2 / 2.0)
    small = assess([1.0990, 1.0991, 1.0989], prev, margin)  # 0.001 better: significant, below the margin
    assert small.passes_practice and not small.passes_readme
    big = assess([1.0900, 1.0901, 1.0899], prev, margin)
    assert big.passes_practice and big.passes_readme


def test_tokenizer_margin_table():
    assert margin_bpb(tokenizer="sp1024") == pytest.approx(0.00296, abs=1e-5)
    assert margin_bpb(tokenizer="sp8192") == pytest.approx(0.00194, abs=1e-5)
    assert margin_bpb(tokenizer="sp8192_caseops") == pytest.approx(0.00228, abs=1e-5)


def test_single_previous_figure_uses_one_sample_test():
    p, test = one_sided_p([1.0, 1.001, 0.999], [1.1])
    assert test.startswith("one-sided one-sample") and p < 0.01
    assert one_sided_p([1.0], [1.1, 1.2])[0] is None


def test_frontier_choice():
    rows = load_frontier()
    assert choose_previous(rows, "2026-04-20", "x")["pr"] == 1736
    assert choose_previous(rows, "2026-04-10", "x")["pr"] == 1514
    assert choose_previous(rows, "2026-03-01", "x") is None
    assert choose_previous(rows, "2026-05-01", "x", wanted="#1493")["github_id"] == "bigbag"
    with pytest.raises(ValueError, match="not in the frontier table"):
        choose_previous(rows, "2026-05-01", "x", wanted="99999")


def test_bad_frontier_file_is_named(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text('{"rows": 3}')
    with pytest.raises(ValueError, match="f.json"):
        load_frontier(bad)


def test_t_tests_agree_with_scipy_stats():
    """one_sided_p computes Welch's and the one-sample t-test itself (scipy.stats takes most of a second to import)."""
    import random

    from scipy import stats

    from validator.significance import one_sided_p

    rng = random.Random(0)
    for _ in range(50):
        new = [1.1 + rng.gauss(0, 0.002) for _ in range(rng.randint(2, 5))]
        prev = [1.1 + rng.gauss(0, 0.002) for _ in range(rng.randint(1, 5))]
        shift = rng.choice([0.0, 0.001, 0.005])
        p, test = one_sided_p(new, prev, shift)
        if len(prev) >= 2:
            want = stats.ttest_ind(new, [x - shift for x in prev], equal_var=False, alternative="less").pvalue
            assert test == "one-sided Welch t-test"
        else:
            want = stats.ttest_1samp(new, popmean=prev[0] - shift, alternative="less").pvalue
        assert p == pytest.approx(float(want), rel=1e-9, abs=1e-12)
