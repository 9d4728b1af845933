"""Seeds: the seeds submission.json claims are exactly the seeds the logs ran, once each, enough for a record."""

from __future__ import annotations

from collections import Counter

from validator.checks.context import Context
from validator.findings import Finding, error, note, warning

MIN_RECORD_SEEDS = 3


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    for run in ctx.runs:
        if run.seed is None:
            out.append(warning("LOG_SEED_UNKNOWN", "no seed line and no seed in the file name", run.rel))
        elif run.seed_from_name is not None and run.log.seed is not None and run.seed_from_name != run.log.seed:
            out.append(
                error(
                    "SEED_NAME_MISMATCH",
                    f"file name says seed {run.seed_from_name} but the log ran seed {run.log.seed}",
                    run.rel,
                    run.log.seed_line,
                )
            )
    scored = [r for r in ctx.scored_runs if r.seed is not None]
    counts = Counter(r.seed for r in scored)
    for seed, n in sorted(counts.items()):
        if n > 1:
            names = ", ".join(r.rel for r in scored if r.seed == seed)
            out.append(warning("DUPLICATE_SEED", f"seed {seed} has {n} scored logs ({names}); say which one counts"))
    log_seeds = sorted(counts)
    sub = ctx.submission
    if sub is not None and sub.seeds:
        claimed = sorted(set(sub.seeds))
        if claimed != log_seeds:
            missing = sorted(set(claimed) - set(log_seeds))
            extra = sorted(set(log_seeds) - set(claimed))
            parts = []
            if missing:
                parts.append(f"claimed without a scored log: {missing}")
            if extra:
                parts.append(f"logs not claimed: {extra}")
            out.append(
                error(
                    "SEEDS_JSON_LOGS_MISMATCH",
                    f"seeds in submission.json {claimed} != logs {log_seeds}; " + "; ".join(parts),
                    sub.file,
                )
            )
    if ctx.is_record and 0 < len(log_seeds) < MIN_RECORD_SEEDS:
        out.append(
            warning(
                "FEW_SEEDS",
                f"{len(log_seeds)} seed(s) for a record claim; significance needs {MIN_RECORD_SEEDS}+ runs",
            )
        )
    elif 0 < len(log_seeds) < MIN_RECORD_SEEDS:
        out.append(note("FEW_SEEDS", f"{len(log_seeds)} seed(s)"))
    return out
