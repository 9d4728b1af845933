"""Were the logs written by the committed script? Embedded source, the log's code size, one script for all seeds."""

from __future__ import annotations

import re

from validator.checks.context import Context
from validator.findings import Finding, error, note, warning

MINOR_LINES = 3  # a difference of at most this many lines that binds only unread names is a warning


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _scripts(ctx: Context) -> dict[str, list[str]]:
    """The folder's top-level Python files (the committed script first), normalised, by name."""
    out: dict[str, list[str]] = {}
    names = [ctx.script] if ctx.script else []
    names += [f for f in ctx.folder.top_level() if f.endswith(".py") and f != ctx.script]
    for name in names[:20]:
        data = ctx.script_bytes if name == ctx.script else ctx.folder.read_bytes(name)
        if data is not None:
            out[name] = _normalise(data.decode("utf-8", errors="replace"))
    return out


def _closest(embedded: list[str], scripts: dict[str, list[str]]) -> str:
    """The script the embedded source was taken from: an identical one, else the one sharing most lines."""
    for name, lines in scripts.items():
        if lines == embedded:
            return name
    emb = set(embedded)
    return max(scripts, key=lambda n: len(emb & set(scripts[n])) - abs(len(scripts[n]) - len(embedded)) * 0.01)


def _changed(a: list[str], b: list[str]) -> tuple[list[str], list[str], int]:
    """Lines only in the committed script, lines only in the log, and the first differing line (1-based, log)."""
    import difflib

    removed: list[str] = []
    added: list[str] = []
    first = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        first = first or j1 + 1
        removed += a[i1:i2]
        added += b[j1:j2]
    return removed, added, first


_ASSIGNED = re.compile(r"^\s*(?:self\.)?([A-Za-z_]\w*)\s*(?::[^=]+)?=(?!=)")


def _harmless(removed: list[str], added: list[str], a: list[str], b: list[str]) -> str | None:
    """Why a difference cannot change what ran, or None: whitespace or comments only, or at most
    MINOR_LINES lines that only bind names nothing else in either source reads."""

    def meaningful(lines: list[str]) -> list[str]:
        return [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]

    if sorted(meaningful(removed)) == sorted(meaningful(added)):
        return "whitespace or comments only"
    changed = meaningful(removed) + meaningful(added)
    if len(changed) > MINOR_LINES:
        return None
    names = []
    for line in changed:
        m = _ASSIGNED.match(line)
        if not m:
            return None
        names.append(m.group(1))
    rest = "\n".join(x for x in a + b if x.strip() not in changed)
    if any(re.search(rf"\b{re.escape(n)}\b", rest) for n in names):
        return None
    return f"only binds {', '.join(sorted(set(names)))}, which nothing reads"


def _embedded(ctx: Context, run, scripts: dict[str, list[str]]) -> list[Finding]:
    log = run.log
    if not scripts:
        return [note("EMBEDDED_SOURCE_NO_SCRIPT", "the log embeds a script but none is committed", run.rel)]
    b = _normalise(log.embedded_source or "")
    name = _closest(b, scripts)
    a = scripts[name]
    if a == b:
        return []
    removed, added, first = _changed(a, b)
    diff = "; ".join([*(f"-{x.strip()[:80]}" for x in removed[:3]), *(f"+{x.strip()[:80]}" for x in added[:3])])
    more = " ..." if len(removed) + len(added) > 6 else ""
    why = _harmless(removed, added, a, b)
    if why is not None:
        return [
            warning(
                "EMBEDDED_SOURCE_DIFFERS",
                f"the source embedded in the log differs from {name} in a way that cannot change the run ({why}): "
                f"{diff}{more}",
                run.rel,
                first,
            )
        ]
    # a log that does not back the claim (another experiment, a supplementary subfolder) is context, not evidence
    make = error if any(r.rel == run.rel for r in ctx.scored_runs) else warning
    return [
        make(
            "EMBEDDED_SOURCE_DIFFERS",
            f"the source embedded in the log differs from {name} from line {first} ({len(b)} vs {len(a)} lines, "
            f"{len(removed)} removed, {len(added)} added: {diff}{more}): stale log or edited script",
            run.rel,
            first,
        )
    ]


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    committed = len(ctx.script_bytes) if ctx.script_bytes is not None else None
    scripts: dict[str, list[str]] | None = None
    for run in ctx.runs:
        log = run.log
        if log.embedded_source is not None:
            if scripts is None:
                scripts = _scripts(ctx)
            out.extend(_embedded(ctx, run, scripts))
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
