"""Artifact size per seed: code + compressed model <= 16,000,000 bytes, code counted three ways.

ssm-golf counts the committed file (plus every local module it imports) as the honest code size; a record that
fits only when its script is counted as a virtual minify + lzma + base85 wrapper (local modules still counted)
gets a warning with the figures; a total over the cap under every convention is an error.
"""

from __future__ import annotations

from validator.checks import source
from validator.checks.context import Context
from validator.findings import Finding, error, note, warning

CAP_BYTES = 16_000_000  # decimal bytes (validator.schema.CAP_BYTES, without importing pydantic)


def _round(n: int) -> bool:
    return n > 0 and n % 10_000 == 0


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    # the wrapped figure (a minifier run) matters only where the honest count does not fit
    cb = source.code_bytes(ctx, wrap=False)
    honest = (cb.with_modules if cb else None) or (len(ctx.script_bytes) if ctx.script_bytes is not None else 0)
    runs = ctx.scored_runs or ctx.runs
    if cb is None or any(r.log.bytes_model is not None and r.log.bytes_model + honest > CAP_BYTES for r in runs):
        cb = source.code_bytes(ctx)
    committed = len(ctx.script_bytes) if ctx.script_bytes is not None else None
    table: dict[str, dict] = {}
    for run in ctx.scored_runs or ctx.runs:
        log = run.log
        label = f"seed {run.seed}" if run.seed is not None else run.rel
        if log.bytes_total is not None and log.bytes_total > CAP_BYTES:
            out.append(
                error(
                    "SIZE_OVER_CAP",
                    f"{label}: the log's own total {log.bytes_total:,} > {CAP_BYTES:,}",
                    run.rel,
                    log.total_line,
                )
            )
        if log.bytes_model is None:
            if log.bytes_total is None:
                out.append(warning("SIZE_UNKNOWN", f"{label}: no model or total size line", run.rel))
            continue
        if log.bytes_total is not None and log.bytes_code is not None:
            if log.bytes_total != log.bytes_model + log.bytes_code:
                out.append(
                    note(
                        "TOTAL_NOT_SUM",
                        f"{label}: total {log.bytes_total:,} != model {log.bytes_model:,} + code {log.bytes_code:,}",
                        run.rel,
                        log.total_line,
                    )
                )
        # every convention judged against the cap counts the local modules: the wrapper packs only the script
        extra = cb.with_modules - cb.raw if cb else 0
        codes = {
            "raw": cb.raw if cb else (committed if committed is not None else log.code_bytes_raw),
            "wrapped": (cb.wrapped + extra if cb.wrapped is not None else None) if cb else log.code_bytes_compressed,
            "with_modules": cb.with_modules if cb else None,
        }
        totals = {k: log.bytes_model + v for k, v in codes.items() if v is not None}
        table[label] = {"model": log.bytes_model, "code": codes, "totals": totals, "log_total": log.bytes_total}
        honest_key = "with_modules" if "with_modules" in totals else "raw"
        if honest_key not in totals:
            continue
        passing = [k for k, t in totals.items() if t <= CAP_BYTES]
        figures = ", ".join(f"{k} {t:,}" for k, t in totals.items())
        if totals[honest_key] <= CAP_BYTES:
            continue
        log_over = log.bytes_total is not None and log.bytes_total > CAP_BYTES  # already an error above
        if "wrapped" in passing:
            out.append(
                warning(
                    "CODE_BYTES_VIRTUAL_WRAPPER",
                    f"{label}: fits only with code counted as a minified lzma+base85 wrapper ({figures}); "
                    "commit the wrapper itself to count it honestly",
                    run.rel,
                )
            )
        elif extra and totals.get("raw", 0) <= CAP_BYTES and not log_over:
            modules = ", ".join(cb.local_modules) if cb else ""
            out.append(
                error(
                    "SIZE_OVER_CAP",
                    f"{label}: over {CAP_BYTES:,} once the local modules it imports ({modules}: +{extra:,} bytes) "
                    f"are counted ({figures}); all code counts: fold them into the script or shrink the model",
                    run.rel,
                )
            )
        elif not log_over:
            out.append(
                error("SIZE_OVER_CAP", f"{label}: over {CAP_BYTES:,} under every convention ({figures})", run.rel)
            )
    if table:
        ctx.figures["size"] = table
        conventions = ("raw", "wrapped", "with_modules")
        # the raw script alone is no convention to pass by where it imports local modules
        judged = [c for c in conventions if not (c == "raw" and cb is not None and cb.with_modules > cb.raw)]
        passing = [c for c in judged if all(c in r["totals"] and r["totals"][c] <= CAP_BYTES for r in table.values())]
        worst = {
            c: max(r["totals"][c] for r in table.values() if c in r["totals"])
            for c in conventions
            if any(c in r["totals"] for r in table.values())
        }
        figures = ", ".join(f"{c} {worst[c]:,}" for c in worst)
        out.append(
            note(
                "SIZE_CONVENTIONS",
                f"largest total per code convention: {figures}; under the cap with: {', '.join(passing) or 'none'}",
            )
        )
    for problem in getattr(cb, "problems", None) or []:
        out.append(note("CODE_BYTES_PROBLEM", str(problem), ctx.script))
    if cb is not None and getattr(cb, "local_modules", None):
        out.append(note("LOCAL_MODULES", f"counted local modules: {', '.join(cb.local_modules)}", ctx.script))
    sub = ctx.submission
    if sub is not None:
        claimed = [("bytes_total", sub.bytes_total)] + [
            (f"seed_results[{s}].artifact_bytes", c.artifact_bytes) for s, c in sorted(sub.seed_results.items())
        ]
        for key, value in claimed:
            if value is None:
                continue
            if value == 0:
                out.append(error("SIZE_ZERO", f"{key} is 0", sub.file))
            elif _round(value):
                out.append(
                    warning("ROUND_BYTES", f"{key} is a round number ({value:,}); report the measured bytes", sub.file)
                )
            elif value > CAP_BYTES:
                out.append(error("SIZE_OVER_CAP", f"{key} {value:,} > {CAP_BYTES:,}", sub.file))
    return out
