"""The BPB denominator, checked from the log alone: val_bpb * ln 2 / val_loss is tokens per byte of the scored text.

For the canonical FineWeb val split that ratio is fixed per tokenizer (e.g. 40,540,160 / 151,080,891 for SP8192).
A "+1 leading space" byte table inflates the bytes by ~17 %, a missing standalone space piece by ~20 %, byte-fallback
counted as 3 bytes by ~4 %: each moves the ratio far beyond the 1 % allowed here.
"""

from __future__ import annotations

import math

from validator.checks.context import Context
from validator.checks.fingerprints import CANONICAL, tokenizer_of
from validator.findings import Finding, error, warning

REL_TOL = 0.01


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    for run in ctx.scored_runs:
        s = run.log.score
        tok = tokenizer_of(run)
        if s is None or tok is None or not (s.val_loss > 0 and math.isfinite(s.val_bpb)):
            continue
        canon = CANONICAL[tok]
        expected = canon["val_tokens"][0] / canon["val_bytes"]
        measured = s.val_bpb * math.log(2) / s.val_loss
        rel = measured / expected - 1.0
        if abs(rel) <= REL_TOL:
            continue
        inflation = expected / measured if measured else math.inf  # val_bpb 0: infinitely many bytes
        implied_bytes = canon["val_tokens"][0] / measured if measured else math.inf
        msg = (
            f"{s.tag}: val_bpb/val_loss implies {implied_bytes:,.0f} scored bytes for {tok}, canonical "
            f"{canon['val_bytes']:,} ({inflation - 1.0:+.1%} bytes); "
            "check the byte tables (build_sentencepiece_luts)"
        )
        if rel < 0:  # more bytes than canonical: BPB deflated in the submitter's favour
            out.append(error("BPB_DENOMINATOR", msg, run.rel, s.line))
        else:
            out.append(warning("BPB_DENOMINATOR", msg, run.rel, s.line))
    return out
