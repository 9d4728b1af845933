"""The bridge to `validator.source` (static analysis of the script): legality, LUT canonicality, code bytes.

The package is imported lazily and only an ImportError of that package itself is tolerated, so that a folder is
still checked (with a note) where the source analysis is not installed.
"""

from __future__ import annotations

from types import ModuleType

from validator.checks.context import Context
from validator.findings import Finding, Severity, error, note

_MISSING = object()


def _import(name: str) -> ModuleType | None:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if (exc.name or "").startswith("validator.source"):
            return None
        raise


def code_bytes(ctx: Context, wrap: bool = True):
    """`validator.source.codebytes.code_bytes(folder, script)` once per folder, or None (no script or no package).
    wrap=False: without the wrapped figure (no minifier run) unless a run with it is already cached."""
    key = "_code_bytes" if wrap else "_code_bytes_unwrapped"
    for cached in (ctx.figures.get("_code_bytes", _MISSING), ctx.figures.get(key, _MISSING)):
        if cached is not _MISSING:
            return cached
    result = None
    mod = _import("validator.source.codebytes") if ctx.script and not ctx.options.skip_source else None
    if mod is not None and ctx.script is not None:
        unsafe = getattr(_import("validator.source.reading"), "UnsafePath", ())
        try:
            result = mod.code_bytes(ctx.folder.root, ctx.folder.root / ctx.script, wrap=wrap)
        except unsafe as exc:  # the script vanished or became unsafe between listing and reading
            ctx.figures["_code_bytes_problem"] = str(exc)
    ctx.figures[key] = result
    return result


def check(ctx: Context) -> list[Finding]:
    if ctx.script is None:
        return []
    if ctx.options.skip_source:
        return [note("SOURCE_AUDIT_SKIPPED", "--skip-source: the script's legality rules were not run", ctx.script)]
    mod = _import("validator.source.audit")
    if mod is None:
        return [
            note("SOURCE_AUDIT_UNAVAILABLE", "validator.source is not installed; legality rules not run", ctx.script)
        ]
    findings = list(mod.audit_source(ctx.folder.root, ctx.folder.root / ctx.script, env=env_from_logs(ctx) or None))
    return [_escalated(f) for f in findings] if ctx.is_record else findings


def env_from_logs(ctx: Context) -> dict[str, str]:
    """Switches every scored log echoes as on (`smear_gate_enabled: True` -> SMEAR_GATE_ENABLED=1), for judging
    which code ran. Only switches that are on: a log (written by the submitter) can make code live, never dead."""
    common: dict[str, str] | None = None
    for run in ctx.scored_runs:
        on = {k.upper(): "1" for k, v in run.log.config.items() if v.strip().lower() == "true" and k.isidentifier()}
        common = on if common is None else {k: v for k, v in common.items() if k in on}
    return common or {}


# What the audit could not read, decode or parse: for a record claim, what cannot be audited cannot be accepted.
UNAUDITED_CODES = frozenset({"WRAPPER_UNDECODABLE", "SOURCE_UNPARSED", "SOURCE_TOO_LARGE"})


def _escalated(finding: Finding) -> Finding:
    if finding.code not in UNAUDITED_CODES or finding.severity is Severity.ERROR:
        return finding
    return error(
        finding.code,
        f"{finding.message} (a record claim cannot be accepted unaudited)",
        finding.file,
        finding.line,
    )
