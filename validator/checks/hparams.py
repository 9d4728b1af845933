"""The hyperparameter echo is identical across seed logs (mixed configurations are not one submission)."""

from __future__ import annotations

from validator.checks.context import Context
from validator.findings import Finding, error, note

MAX_LISTED = 8


def check(ctx: Context) -> list[Finding]:
    runs = [r for r in ctx.scored_runs if r.log.config]
    silent = [r.rel for r in ctx.scored_runs if not r.log.config]
    out: list[Finding] = []
    if silent and runs:
        out.append(note("HPARAMS_NOT_ECHOED", f"no hyperparameter echo in {', '.join(silent)}"))
    if len(runs) < 2:
        return out
    ref = runs[0]
    for other in runs[1:]:
        a, b = ref.log.config, other.log.config
        diffs = []
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{key}: {a.get(key, '(absent)')!s} vs {b.get(key, '(absent)')!s}")
        if diffs:
            listed = "; ".join(d[:80] for d in diffs[:MAX_LISTED]) + (" ..." if len(diffs) > MAX_LISTED else "")
            out.append(
                error(
                    "HPARAMS_DIFFER",
                    f"{other.rel} differs from {ref.rel} in {len(diffs)} setting(s): {listed}",
                    other.rel,
                )
            )
    return out
