"""submission.json against the logs: the claimed score is the mean of the per-seed score lines, bytes agree."""

from __future__ import annotations

import math

from validator.checks.context import Context
from validator.findings import Finding, error, note, warning
from validator.loose import decimals
from validator.numbers import fmean

EXACT_TOL = 1e-6
LOW_BPB = 1.0  # below this a neural stack's claim is a red flag (n-gram caches, leaks, denominator bugs)


def agreement(claimed: float, measured: float, roundings: int = 1) -> str:
    """'exact' within 1e-6, 'rounded' when the claim is the measured figure rounded as written (`roundings` times:
    a mean of rounded figures, rounded again, may be off by two half-units), else 'mismatch'."""
    diff = abs(claimed - measured)
    if diff <= EXACT_TOL:
        return "exact"
    d = decimals(claimed)
    if d is not None and d < 8 and diff <= roundings * 0.5 * 10.0**-d + 1e-12:
        return "rounded"
    return "mismatch"


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    for run in ctx.runs:
        log = run.log
        if log.score is None:
            out.append(warning("LOG_NO_SCORE", "no final score line (truncated or partial log?)", run.rel))
        elif not log.complete:
            out.append(warning("LOG_INCOMPLETE", "score present but no 'Total submission size' line", run.rel))
        if log.score is not None:
            s = log.score
            if not math.isfinite(s.val_bpb):
                out.append(error("SCORE_NOT_FINITE", f"{s.tag} val_bpb is {s.val_bpb}", run.rel, s.line))
            elif s.val_bpb < LOW_BPB:
                out.append(
                    warning(
                        "SUSPICIOUS_LOW_BPB",
                        f"{s.tag} val_bpb {s.val_bpb:.5f} < {LOW_BPB}: typical of unnormalised caches or leaks",
                        run.rel,
                        s.line,
                    )
                )
    tags = sorted({r.log.score.tag for r in ctx.scored_runs if r.log.score})
    if tags:
        out.append(note("SCORE_TAG", f"score of record read from {', '.join(tags)} lines"))
    if len(tags) > 1:
        out.append(warning("SCORE_TAGS_DIFFER", f"seed logs end in different score tags: {', '.join(tags)}"))
    sub = ctx.submission
    if sub is None:
        return out
    out.extend(_score_agreement(ctx))
    out.extend(_bytes_agreement(ctx))
    return out


def _score_agreement(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    sub = ctx.submission
    assert sub is not None
    f = sub.file
    by_seed: dict[int, list[float]] = {}
    backing = [r for r in ctx.runs if ctx.claimed_rels is None or r.rel in ctx.claimed_rels]
    for run in backing:  # any log of the seed may back its claim (reruns, eval-only logs in subfolders)
        if run.seed is not None and run.log.score is not None:
            by_seed.setdefault(run.seed, []).append(run.log.score.val_bpb)
    claims = [c.val_bpb for c in sub.seed_results.values() if c.val_bpb is not None]
    own = bool(claims) and len(claims) == len(sub.seed_results) and set(sub.seed_results) <= set(by_seed)
    # with per-seed claims (each compared with its logs below), the headline must be their mean
    mean = fmean(claims) if own else ctx.mean_score()
    source = "its seed_results" if own else "the logs' score lines"
    if sub.val_bpb is not None and mean is not None:
        verdict = agreement(sub.val_bpb, mean, roundings=2)
        per_seed = sorted(claims if own else [r.log.score.val_bpb for r in ctx.scored_runs if r.log.score])
        if verdict == "rounded":
            msg = f"val_bpb {sub.val_bpb} is the mean of {source} {mean:.8f} rounded"
            out.append(note("JSON_VAL_BPB_ROUNDED", msg, f))
        elif verdict == "mismatch":
            if len(per_seed) > 1 and any(agreement(sub.val_bpb, v) != "mismatch" for v in per_seed):
                out.append(
                    warning(
                        "JSON_VAL_BPB_NOT_MEAN",
                        f"val_bpb {sub.val_bpb} is one seed's score, not the mean {mean:.8f} of {len(per_seed)} seeds",
                        f,
                    )
                )
            else:
                out.append(
                    error(
                        "JSON_VAL_BPB_MISMATCH",
                        f"val_bpb {sub.val_bpb} != mean of {source} {mean:.8f}; fix the claim or the logs",
                        f,
                    )
                )
    for seed, claim in sorted(sub.seed_results.items()):
        if claim.val_bpb is None or seed not in by_seed:
            continue
        verdicts = {agreement(claim.val_bpb, v): v for v in by_seed[seed]}
        logged = ", ".join(f"{v:.8f}" for v in by_seed[seed])
        if "exact" in verdicts:
            continue
        if "rounded" in verdicts:
            rounded = verdicts["rounded"]
            out.append(note("SEED_BPB_ROUNDED", f"seed {seed}: {claim.val_bpb} is {rounded:.8f} rounded", f))
        else:
            out.append(
                error("SEED_BPB_MISMATCH", f"seed {seed}: submission.json says {claim.val_bpb}, its log {logged}", f)
            )
    losses = [r.log.score.val_loss for r in ctx.scored_runs if r.log.score]
    mean_loss = fmean(losses) if losses else None
    if sub.val_loss is not None and mean_loss is not None and math.isfinite(mean_loss):
        if agreement(sub.val_loss, mean_loss) == "mismatch":
            out.append(
                warning(
                    "JSON_VAL_LOSS_MISMATCH",
                    f"val_loss {sub.val_loss} != mean of the logs' val_loss {mean_loss:.8f}",
                    f,
                )
            )
    return out


def _bytes_agreement(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    sub = ctx.submission
    assert sub is not None
    f = sub.file
    totals = {r.seed: r.log.bytes_total for r in ctx.runs if r.log.bytes_total is not None}
    models = {r.seed: r.log.bytes_model for r in ctx.runs if r.log.bytes_model is not None}
    if sub.bytes_total is not None and totals:
        largest = max(totals.values())
        if sub.bytes_total in models.values() and sub.bytes_total != largest:
            out.append(
                error(
                    "BYTES_TOTAL_MODEL_ONLY", f"bytes_total {sub.bytes_total:,} is the model alone; add code bytes", f
                )
            )
        elif sub.bytes_total != largest:
            out.append(
                warning(
                    "BYTES_TOTAL_MISMATCH",
                    f"bytes_total {sub.bytes_total:,} != largest log total {largest:,} (the cap applies per seed)",
                    f,
                )
            )
    for seed, claim in sorted(sub.seed_results.items()):
        if claim.artifact_bytes is None or seed not in totals:
            continue
        if claim.artifact_bytes == models.get(seed) and claim.artifact_bytes != totals[seed]:
            out.append(
                error(
                    "BYTES_TOTAL_MODEL_ONLY",
                    f"seed {seed}: artifact_bytes {claim.artifact_bytes:,} is the model alone; "
                    f"log total {totals[seed]:,}",
                    f,
                )
            )
        elif claim.artifact_bytes != totals[seed]:
            out.append(
                warning(
                    "SEED_BYTES_MISMATCH",
                    f"seed {seed}: artifact_bytes {claim.artifact_bytes:,} != log total {totals[seed]:,}",
                    f,
                )
            )
    code_figures = {
        v for r in ctx.runs for v in (r.log.code_bytes_raw, r.log.code_bytes_compressed, r.log.bytes_code) if v
    }
    if sub.bytes_code is not None and code_figures and sub.bytes_code not in code_figures:
        out.append(
            warning(
                "BYTES_CODE_MISMATCH",
                f"bytes_code {sub.bytes_code:,} matches no code size in the logs ({sorted(code_figures)})",
                f,
            )
        )
    return out
