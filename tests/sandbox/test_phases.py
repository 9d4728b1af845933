"""Phase spans from timestamped output lines, and the watchdog's kill decision."""

from __future__ import annotations

from validator.sandbox.phases import overrun, phase_spans
from validator.sandbox.request import Limits


def test_spans_take_first_begin_and_last_end_and_ignore_other_lines():
    lines = [
        (0.5, "setup"),
        (1.0, "phase:train begin"),
        (2.0, "step:1/2 train_loss:1.0"),
        (5.0, "phase:train end"),
        (6.0, "phase:eval begin"),
        (7.0, "phase:eval end"),
        (8.0, "phase:eval begin"),
        (9.5, "phase:eval end"),
        (9.6, "print('phase:train begin') inside a source line is not a marker"),
    ]
    spans = phase_spans(lines)
    assert spans["train"].seconds == 4.0
    assert spans["eval"].begin == 6.0 and spans["eval"].end == 9.5
    assert spans["eval"].open_since is None


def test_a_phase_still_running_is_killed_only_after_limit_plus_grace():
    limits = Limits(train_s=10, eval_s=5, setup_s=100, grace_s=2)
    spans = phase_spans([(1.0, "phase:train begin")])
    assert spans["train"].open_since == 1.0
    assert overrun(spans, 12.9, limits) is None
    assert "train phase" in overrun(spans, 13.1, limits)


def test_a_finished_phase_never_triggers_and_the_total_limit_does():
    limits = Limits(train_s=10, eval_s=5, setup_s=3, grace_s=0)
    spans = phase_spans([(0.0, "phase:train begin"), (1.0, "phase:train end")])
    assert overrun(spans, 17.9, limits) is None
    assert "whole run" in overrun(spans, 18.1, limits)


def test_a_second_eval_reopens_the_phase():
    limits = Limits(train_s=10, eval_s=5, setup_s=100, grace_s=0)
    spans = phase_spans([(0.0, "phase:eval begin"), (1.0, "phase:eval end"), (2.0, "phase:eval begin")])
    assert spans["eval"].open_since == 2.0
    assert "eval phase" in overrun(spans, 5.5, limits)


def test_validation_inside_training_pauses_its_clock():
    limits = Limits(train_s=10, eval_s=5, setup_s=100, grace_s=1)
    lines = [(0.0, "phase:train begin"), (4.0, "phase:val begin"), (10.0, "phase:val end")]
    spans = phase_spans(lines)
    assert spans["train"].paused_s == 6.0
    assert overrun(spans, 16.5, limits) is None  # 16.5 s since the start, 10.5 s of it training
    assert "train phase" in overrun(spans, 17.5, limits)
    # a validation still running pauses the clock too, and the whole-run limit still counts everything
    spans = phase_spans([(0.0, "phase:train begin"), (5.0, "phase:val begin")])
    assert spans["train"].paused_since == 5.0 and overrun(spans, 100.0, limits) is None
    assert "whole run" in overrun(spans, 116.0, limits)
    done = phase_spans(lines + [(13.0, "phase:val begin"), (14.0, "phase:val end"), (15.0, "phase:train end")])
    assert done["train"].seconds == 15.0 - 7.0
    # a validation outside the phase does not count against it
    assert (
        phase_spans([(0.0, "phase:val begin"), (2.0, "phase:val end"), (3.0, "phase:train begin")])["train"].paused_s
        == 0.0
    )


def test_validation_pauses_the_clock_only_up_to_the_budget():
    limits = Limits(train_s=10, eval_s=600, setup_s=100, grace_s=1)
    assert limits.pause_budget_s == 5.0  # half the train limit
    assert Limits(train_s=600, eval_s=60).pause_budget_s == 60.0  # never more than one eval limit
    lines = [(0.0, "phase:train begin"), (1.0, "phase:val begin"), (31.0, "phase:val end"), (32.0, "phase:train end")]
    spans = phase_spans(lines, limits.pause_budget_s)
    assert spans["train"].paused_s == 30.0 and spans["train"].seconds == 32.0 - 5.0
    # a "validation" still running stops the clock only for the budget: training inside it is killed
    spans = phase_spans(lines[:3], limits.pause_budget_s)
    assert overrun(spans, 15.9, limits) is None  # 15.9 - 5 = 10.9 s of training
    assert "train phase" in overrun(spans, 16.1, limits)
