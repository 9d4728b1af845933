"""bench/timing.py and bench/scan.py's goal table without a GPU: the timers are injected, the row logic is real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import scan  # noqa: E402
from bench.timing import measure, measured_line  # noqa: E402


def _case(**extra) -> dict:
    return {"name": "ours lti_scan toeplitz (16 head decays)", "fwd": lambda: None, "fwd_bwd": lambda: None, **extra}


def test_eager_and_graphed_times_scaled_with_bandwidth() -> None:
    row = measure(
        _case(scale=2, bytes_min=4e6, bytes_min_fwd_bwd=8e6),
        graphs=True,
        eager=lambda fn: 0.5,
        graphed=lambda fn: 0.25,
    )
    assert row["fwd_ms"] == 1.0 and row["fwd_bwd_ms"] == 1.0
    assert row["fwd_graph_ms"] == 0.5 and row["fwd_bwd_graph_ms"] == 0.5
    assert row["fwd_GBps"] == pytest.approx(4.0) and row["fwd_bwd_GBps"] == pytest.approx(8.0)


def test_without_graphs_no_graph_keys() -> None:
    row = measure(_case(), eager=lambda fn: 0.5, graphed=lambda fn: pytest.fail("graphed timer called"))
    assert "fwd_graph_ms" not in row and row["fwd_ms"] == 0.5


def test_capture_failure_is_none_and_said(capsys: pytest.CaptureFixture) -> None:
    def no_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    row = measure(_case(), graphs=True, eager=lambda fn: 0.5, graphed=no_capture)
    assert row["fwd_bwd_graph_ms"] is None and row["fwd_bwd_ms"] == 0.5
    assert "no CUDA graph (RuntimeError: operation not permitted" in capsys.readouterr().out


def test_slow_reference_timed_by_wall_clock_never_graphed() -> None:
    row = measure(
        _case(slow=True, scale=16),
        graphs=True,
        eager=lambda fn: pytest.fail("eager timer called"),
        graphed=lambda fn: pytest.fail("graphed timer called"),
        wall=lambda fn: 3.0,
    )
    assert row["fwd_ms"] == 48.0 and "fwd_graph_ms" not in row


def test_failing_eager_leaves_none(capsys: pytest.CaptureFixture) -> None:
    def broken(fn):
        raise ValueError("too many registers")

    row = measure(_case(bytes_min=1e6), eager=broken)
    assert row["fwd_ms"] is None and "fwd_GBps" not in row
    assert "FAILED ValueError: too many registers" in capsys.readouterr().out


def test_goals_judged_eager_and_graphed_each_against_sdpa_timed_alike() -> None:
    rows = [
        {"name": "ours lti_scan toeplitz (16 head decays)", "fwd_bwd_ms": 0.9, "fwd_bwd_graph_ms": 0.29},
        {"name": "ours ssd_scan (H16 P64 N64, D)", "fwd_bwd_ms": 0.9, "fwd_bwd_graph_ms": 0.8},
        {"name": scan.SDPA_NAME, "fwd_bwd_ms": 1.0, "fwd_bwd_graph_ms": 0.85},
    ]
    scan.judge(rows)
    lti, ssd = rows[0], rows[1]
    assert lti["goal_met"] is False and lti["goal_met_graph"] is True
    assert ssd["goal_met"] is True and ssd["goal_met_graph"] is True
    rows[2]["fwd_bwd_graph_ms"] = 0.7  # graphed SSD now slower than graphed attention: goal missed
    scan.judge(rows)
    assert rows[1]["goal_met_graph"] is False
    table = scan.markdown(rows, graphs=True).splitlines()
    assert table[0].endswith("| graphed fwd / fwd+bwd ms | met, graphed |")
    assert table[2].startswith("| ours lti_scan toeplitz") and table[2].endswith("| - / 0.290 | yes |")
    assert "graphed" not in scan.markdown(rows)


def test_lru_complex_case_runs_and_reaches_every_input() -> None:
    import torch

    from bench import scan_recurrence

    case = scan_recurrence.complex_case("cpu", shape=(2, 37, 6))
    h_re, h_im = case["fwd"]()
    assert h_re.shape == h_im.shape == (2, 37, 6) and torch.isfinite(h_re).all()
    case["fwd_bwd"]()  # autograd.grad raises if an input is not reached
    run, inputs, cot = case["grad_of"]
    grads = torch.autograd.grad(run(), inputs, cot)
    assert [tuple(g.shape) for g in grads] == [(6,), (6,), (2, 37, 6), (2, 37, 6)]
    assert all(g.abs().sum() > 0 for g in grads)


def test_measured_line_is_what_the_runners_grep() -> None:
    row = measure(_case(), graphs=True, eager=lambda fn: 0.5, graphed=lambda fn: 0.25)
    name = "ours lti_scan toeplitz (16 head decays)"
    assert measured_line(row) == f"measured {name}: 0.5 / 0.5 ms"
    assert measured_line(row, graphs=True) == f"measured {name}: 0.5 / 0.5 ms, graphed 0.25 / 0.25"


def test_tuning_argument_takes_known_kinds_and_options_only():
    """--tuning sets SSD_TUNING for a GPU run: a typo in a kind or an option must stop the run, not time the
    defaults under the tuned label."""
    import argparse

    assert scan.tuning_arg('{"fwd": {"num_warps": 8}, "state": {"fp32": true}}') == {
        "fwd": {"num_warps": 8},
        "state": {"fp32": True},
    }
    assert scan.tuning_arg('{"bwd": {"red": "ptr", "num_warps": 8, "num_stages": 2}}') == {
        "bwd": {"red": "ptr", "num_warps": 8, "num_stages": 2}
    }
    for bad, message in [
        ("{fwd", "not JSON"),
        ('["fwd"]', "want"),
        ('{"fwd": 8}', "want"),
        ('{"ffwd": {"num_warps": 8}}', "unknown kind 'ffwd'"),  # the forward's old name, from when there were two
        ('{"fout": {"num_warps": 8}}', "unknown kind 'fout'"),  # the two-kernel forward is gone
        ('{"fwd": {"bp": 32}}', r"unknown fwd option\(s\) \['bp'\]"),  # and the forward's split of P
        ('{"fwd": {"num_warp": 8}}', r"unknown fwd option\(s\) \['num_warp'\]"),
        ('{"fused": {"red": "ptr"}}', "unknown kind 'fused'"),  # the backward is "bwd": one form
        ('{"carry": {"bp": 32}}', "unknown kind 'carry'"),  # the split backward is gone
        ('{"bwd": {"on": 0}}', r"unknown bwd option\(s\) \['on'\]"),  # and its switch
        ('{"rows": {"in_place": 1}}', "unknown kind 'rows'"),  # x and z are read in place always: no switch
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            scan.tuning_arg(bad)


def test_tuning_options_are_what_the_kernels_read_and_the_sweep_sets():
    """TUNING_OPTIONS lists each kind that templates/scan/ssd.py looks up; the sweep and the check's forms stay
    inside it."""
    source = (Path(__file__).resolve().parents[2] / "templates" / "scan" / "ssd.py").read_text()
    for kind in scan.TUNING_OPTIONS:
        assert f'"{kind}"' in source, kind
    for kind, forms in scan.SSD_SWEEP.items():
        for form in forms:
            scan.tuning_arg(json.dumps({kind: form}))
    for form in scan.CHECK_BWD_FORMS:
        scan.tuning_arg(json.dumps(form))


def test_tuned_restores_the_tuning_when_the_run_raises():
    scan.ssd_mod.SSD_TUNING.clear()
    scan.ssd_mod.SSD_TUNING["fwd"] = {"num_warps": 4}

    def boom():
        assert scan.ssd_mod.SSD_TUNING == {"fwd": {"num_warps": 8}}
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError):
        scan.tuned({"fwd": {"num_warps": 8}}, boom)
    assert scan.ssd_mod.SSD_TUNING == {"fwd": {"num_warps": 4}}
    scan.ssd_mod.SSD_TUNING.clear()
