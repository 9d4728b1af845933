"""Phase timing from the arrival times of the child's output lines (`phase:<name> begin|end` markers).

A `phase:val` span inside another phase pauses that phase's clock: upstream's training time leaves out the
validation passes made during training, and so does the limit here (the whole-run limit still counts everything),
but only up to the pause budget (Limits.pause_budget_s): validation beyond it counts as time of the phase, so a
script cannot train inside "validation".
"""

from __future__ import annotations

import re

from validator.sandbox.request import Limits, PhaseSpan

PAUSE_PHASE = "val"
PHASE_RE = re.compile(r"(?:^|\s)phase:(?P<phase>[a-z_]+) (?P<edge>begin|end)\s*$")


def phase_spans(lines: list[tuple[float, str]], pause_budget_s: float = float("inf")) -> dict[str, PhaseSpan]:
    """First begin and last end of every phase named in the output; `pause_budget_s`: see Limits.pause_budget_s."""
    begins: dict[str, float] = {}
    ends: dict[str, float] = {}
    running: dict[str, float | None] = {}
    for t, text in lines:
        m = PHASE_RE.search(text)
        if not m:
            continue
        phase = m.group("phase")
        if m.group("edge") == "begin":
            begins.setdefault(phase, t)
            running[phase] = t
        else:
            ends[phase] = t
            running[phase] = None
    pauses = _intervals(lines, PAUSE_PHASE)
    out = {}
    for p in sorted(set(begins) | set(ends)):
        begin, end, open_since = begins.get(p), ends.get(p), running.get(p)
        paused, paused_since = 0.0, None
        if p != PAUSE_PHASE and begin is not None:
            stop = end if end is not None and open_since is None else float("inf")
            for b, e in pauses:
                if b < begin or b >= stop:
                    continue
                if e is None:
                    paused_since = b
                else:
                    paused += min(e, stop) - b
        out[p] = PhaseSpan(begin, end, open_since, paused, paused_since, pause_budget_s)
    return out


def _intervals(lines: list[tuple[float, str]], phase: str) -> list[tuple[float, float | None]]:
    """Every (begin, end or None) span of one phase, in order."""
    spans: list[tuple[float, float | None]] = []
    for t, text in lines:
        m = PHASE_RE.search(text)
        if not m or m.group("phase") != phase:
            continue
        if m.group("edge") == "begin":
            spans.append((t, None))
        elif spans and spans[-1][1] is None:
            spans[-1] = (spans[-1][0], t)
    return spans


def overrun(spans: dict[str, PhaseSpan], now: float, limits: Limits) -> str | None:
    """Why the run must be killed at time `now` (seconds since launch), or None while it is inside its limits."""
    if now > limits.total_s:
        return f"whole run past {limits.total_s:.0f} s (train {limits.train_s:.0f} + eval {limits.eval_s:.0f} + setup)"
    for phase, span in spans.items():
        limit = limits.phase_limit(phase)
        if limit is None or span.open_since is None or span.begin is None:
            continue
        if span.elapsed(now) > limit + limits.grace_s:
            return f"{phase} phase past its limit of {limit:.0f} s (+{limits.grace_s:.0f} s grace)"
    return None
