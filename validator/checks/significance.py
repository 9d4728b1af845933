"""Record claims: is the win over the previous frontier row significant (README rule and maintainers' practice)?"""

from __future__ import annotations

import math

from validator.checks.context import Context
from validator.checks.fingerprints import tokenizer_of
from validator.findings import Finding, error, note, warning
from validator.numbers import fmean
from validator.significance import PRACTICE_P, README_P, assess, choose_previous, load_frontier, margin_bpb


def check(ctx: Context) -> list[Finding]:
    if not ctx.is_record:
        return []
    scores = ctx.seed_scores()
    if not scores:
        return []
    if not all(math.isfinite(v) for v in scores.values()):
        return [warning("SIGNIFICANCE_UNTESTED", "a seed's val_bpb is not finite (see SCORE_NOT_FINITE): no t-test")]
    rows = load_frontier(ctx.options.frontier_file)
    date = ctx.submission.date if ctx.submission and ctx.submission.date else ctx.folder.name[:10]
    previous = choose_previous(rows, date, ctx.folder.name, ctx.options.previous)
    if previous is None:
        return [note("SIGNIFICANCE_NO_PREVIOUS", f"no frontier row before {date}; pass --previous to compare")]
    if ctx.submission is not None and ctx.submission.raw.get("submission_type") == "record_support":
        return [note("SIGNIFICANCE_NOT_CLAIMED", "submission_type record_support: supports an earlier record")]
    runs = ctx.scored_runs
    losses = [r.log.score.val_loss for r in runs if r.log.score]
    bpbs = [r.log.score.val_bpb for r in runs if r.log.score]
    tok = next((t for r in runs if (t := tokenizer_of(r))), None)
    margin = margin_bpb(fmean(losses), fmean(bpbs), tok)
    result = assess(list(scores.values()), previous, margin)
    ctx.figures["significance"] = result.to_dict()
    out: list[Finding] = []
    fmt = lambda p: "n/a" if p is None else f"{p:.3f}"  # noqa: E731
    summary = (
        f"vs {result.previous} (mean {result.mean_previous:.5f}): delta {result.delta_bpb:+.5f} bpb, "
        f"{result.test} p={fmt(result.p_practice)}; "
        f"README rule (margin {result.margin_bpb:.5f} bpb) p={fmt(result.p_readme)}"
    )
    if result.p_practice is None:
        out.append(warning("SIGNIFICANCE_UNTESTED", f"{len(scores)} seed(s): no t-test possible; {summary}"))
    elif result.delta_bpb <= 0:
        out.append(error("NOT_A_RECORD", f"no improvement on the frontier: {summary}"))
    elif not result.passes_practice:
        out.append(error("SIGNIFICANCE_PRACTICE_FAIL", f"p >= {PRACTICE_P} (maintainers' cutoff): {summary}"))
    elif not result.passes_readme:
        out.append(
            warning("SIGNIFICANCE_README_FAIL", f"misses the README rule (>= 0.005 nats at p < {README_P}): {summary}")
        )
    else:
        out.append(note("SIGNIFICANCE", summary))
    return out
