"""Phase timing from the arrival times of the child's output lines (`phase:<name> begin|end` markers)."""

from __future__ import annotations

import re

from validator.sandbox.request import Limits, PhaseSpan

PHASE_RE = re.compile(r"(?:^|\s)phase:(?P<phase>[a-z_]+) (?P<edge>begin|end)\s*$")


def phase_spans(lines: list[tuple[float, str]]) -> dict[str, PhaseSpan]:
    """First begin and last end of every phase named in the output."""
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
    names = sorted(set(begins) | set(ends))
    return {p: PhaseSpan(begins.get(p), ends.get(p), running.get(p)) for p in names}


def overrun(spans: dict[str, PhaseSpan], now: float, limits: Limits) -> str | None:
    """Why the run must be killed at time `now` (seconds since launch), or None while it is inside its limits."""
    if now > limits.total_s:
        return f"whole run past {limits.total_s:.0f} s (train {limits.train_s:.0f} + eval {limits.eval_s:.0f} + setup)"
    for phase, span in spans.items():
        limit = limits.phase_limit(phase)
        if limit is None or span.open_since is None or span.begin is None:
            continue
        if now - span.begin > limit + limits.grace_s:
            return f"{phase} phase past its limit of {limit:.0f} s (+{limits.grace_s:.0f} s grace)"
    return None
