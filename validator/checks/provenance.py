"""Were the logs written by the committed script? Embedded source, the log's code size, one script for all seeds."""

from __future__ import annotations

import difflib

from validator.checks.context import Context
from validator.findings import Finding, error, note, warning


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    script_text = ctx.script_bytes.decode("utf-8", errors="replace") if ctx.script_bytes is not None else None
    committed = len(ctx.script_bytes) if ctx.script_bytes is not None else None
    for run in ctx.runs:
        log = run.log
        if log.embedded_source is not None:
            if script_text is None:
                out.append(note("EMBEDDED_SOURCE_NO_SCRIPT", "the log embeds a script but none is committed", run.rel))
            else:
                a, b = _normalise(script_text), _normalise(log.embedded_source)
                if a != b:
                    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    ratio = (
                        difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() if len(a) + len(b) < 20000 else 0
                    )
                    out.append(
                        error(
                            "EMBEDDED_SOURCE_DIFFERS",
                            f"the source embedded in the log differs from {ctx.script} from line {first + 1} "
                            f"({len(b)} vs {len(a)} lines, similarity {ratio:.2f}): stale log or edited script",
                            run.rel,
                            first + 1,
                        )
                    )
        if committed is not None and log.code_bytes_raw is not None and log.code_bytes_raw != committed:
            out.append(
                warning(
                    "LOG_CODE_SIZE_STALE",
                    f"log's code size {log.code_bytes_raw:,} != committed {ctx.script} {committed:,} bytes: "
                    "the log was written by another version of the script",
                    run.rel,
                    log.code_line,
                )
            )
    sizes = {r.rel: r.log.code_bytes_raw for r in ctx.scored_runs if r.log.code_bytes_raw is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {v:,}" for k, v in sorted(sizes.items()))
        out.append(warning("CODE_SIZE_DIFFERS_ACROSS_SEEDS", f"seed logs ran scripts of different sizes ({listed})"))
    return out
