"""`audit_source`: the static legality audit of a submission's source, as findings with stable codes.

The script is read (capped, inside the folder), its self-extracting wrappers decoded (nested up to a depth),
local modules it pulls in read the same way, and every resulting source run through the taxonomy rules
(validator.source.rules) and the byte-table check (validator.source.luts). A rule hit in live code is an error
(a warning for suggestive patterns); in code that is dead with the default settings, a note naming the flag.

Finding codes (stable): SOURCE_UNREADABLE, SOURCE_TOO_LARGE, SOURCE_NOT_UTF8, SOURCE_UNPARSED, SOURCE_UNSAFE_PATH,
OBFUSCATED_WRAPPER, WRAPPER_UNDECODABLE, LOCAL_MODULES, LOCAL_IMPORT_FALLBACK, the rule codes
(NGRAM_HASH_KEYED_ON_TARGET, NGRAM_GOLD_BLEND, SLOT_DELTA_ON_SCORED_TARGETS, SLOT_DELTA_AT_EVAL,
TTT_TRAIN_THEN_SCORE, TTT_UPDATE_BEFORE_SCORE, TTT_SCORE_FIRST, CALIBRATION_ON_VAL, TEMPERATURE_FIT_ON_VAL,
VAL_IN_TRAINING_DATA, BOS_LEAK_TOKEN_SHIFT, BOS_LEAK_CONV, TWO_PASS_RESCORE, TWO_PASS_SUSPECT) and the byte-table
codes (LUT_LEADING_SPACE_PLUS_ONE, LUT_SPACE_MARKER_COUNTED, LUT_BYTE_FALLBACK_NOT_ONE, LUT_BOUNDARY_SET,
LUT_NO_SPACE_PIECE, LUT_SPACE_PIECE_UNCHECKED, LUT_NOT_ANALYSED).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from validator.findings import Finding, Severity, error, note, warning
from validator.source import luts
from validator.source.modules import local_closure
from validator.source.reachability import Reachability, Status
from validator.source.reading import (
    MAX_SOURCE_BYTES,
    SourceUnit,
    UnsafePath,
    decode_text,
    locate,
    parse_source,
    read_bytes_capped,
    relative_name,
)
from validator.source.rules import ALL_RULES
from validator.source.rules.common import RuleContext
from validator.source.wrappers import MAX_DEPTH, find_wrappers

_SEVERITY = {"error": Severity.ERROR, "warning": Severity.WARNING, "note": Severity.NOTE}


@dataclass
class _Unit:
    source: SourceUnit
    reach: Reachability
    outer_status: Status  # for decoded wrappers: whether the exec that runs them is live
    library: bool  # a local module: its functions are entry points for the script


def _finding(severity: Severity, code: str, message: str, file: str | None, line: int | None) -> Finding:
    return Finding(code, severity, message, file, line)


CHALLENGE_PYTHON = (3, 12)  # the official image's Python: syntax newer than ours is not the submission's fault


def _unparsed(code: str, what: str, exc: BaseException, file: str | None, line: int | None, text: str) -> Finding:
    """One line saying why `what` does not compile; syntax this Python is too old for is a warning of its own."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    reason = (getattr(exc, "msg", None) or str(exc) or exc.__class__.__name__).splitlines()[0][:120]
    newer = isinstance(exc, SyntaxError) and reason.startswith("f-string")  # PEP 701 (3.12) f-strings
    if newer and "\x00" not in text and sys.version_info[:2] < CHALLENGE_PYTHON:
        return warning(
            "SOURCE_NEEDS_NEWER_PYTHON",
            f"{what} does not compile with Python {here} ({reason}) but may with the challenge's Python "
            f"{CHALLENGE_PYTHON[0]}.{CHALLENGE_PYTHON[1]}: not audited here; run the validator on Python 3.12",
            file,
            line,
        )
    return warning(
        code,
        f"{what} does not compile with Python {here} ({exc.__class__.__name__}: {reason}); its rules were not "
        "checked: commit a script that runs",
        file,
        line,
    )


def _load(folder: Path, path: Path, findings: list[Finding]) -> SourceUnit | None:
    name = relative_name(folder, path)
    try:
        data, truncated = read_bytes_capped(folder, path)
    except UnsafePath as exc:
        findings.append(error("SOURCE_UNREADABLE", f"{name} cannot be audited: {exc}", name))
        return None
    if truncated:
        findings.append(
            warning(
                "SOURCE_TOO_LARGE",
                f"{name} is larger than {MAX_SOURCE_BYTES} bytes; not audited (split or shrink the script)",
                name,
            )
        )
        return None
    text, utf8 = decode_text(data)
    if not utf8:
        findings.append(warning("SOURCE_NOT_UTF8", f"{name} is not valid UTF-8; audited with replacements", name))
    try:
        tree = parse_source(text, name)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        line = getattr(exc, "lineno", None)
        findings.append(_unparsed("SOURCE_UNPARSED", name, exc, name, line if isinstance(line, int) else None, text))
        return None
    return SourceUnit(name, name, text, tree)


def _expand_wrappers(unit: SourceUnit, reach: Reachability, findings: list[Finding], depth: int = 0) -> list:
    """(decoded unit, status of the exec that runs it) for every wrapper in `unit`, recursively."""
    out = []
    for index, wrapper in enumerate(find_wrappers(unit.tree), start=1):
        line = unit.line_offset or wrapper.line
        steps = " + ".join(wrapper.steps) or "literal"
        exec_node = _node_at_line(unit.tree, wrapper.line)
        status = reach.status(exec_node) if exec_node is not None else Status(True)
        if wrapper.source is None:
            findings.append(
                warning(
                    "WRAPPER_UNDECODABLE",
                    f"{unit.name} executes an encoded payload that could not be decoded statically "
                    f"({wrapper.error}); its code was not audited",
                    unit.file,
                    line,
                )
            )
            continue
        decoded_size = len(wrapper.source.encode("utf-8"))
        findings.append(
            note(
                "OBFUSCATED_WRAPPER",
                f"{unit.name} line {wrapper.line} executes a {steps} wrapper ({wrapper.encoded_bytes} encoded bytes, "
                f"{decoded_size} decoded); decoded and audited",
                unit.file,
                line,
            )
        )
        if depth + 1 > MAX_DEPTH:
            findings.append(warning("WRAPPER_UNDECODABLE", f"wrappers nested deeper than {MAX_DEPTH}", unit.file, line))
            continue
        try:
            tree = parse_source(wrapper.source, unit.name)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            what = f"the decoded payload of {unit.name} line {wrapper.line}"
            findings.append(_unparsed("WRAPPER_UNDECODABLE", what, exc, unit.file, line, wrapper.source))
            continue
        decoded = SourceUnit(f"{unit.name} (decoded wrapper {index})", unit.file, wrapper.source, tree, line)
        inner_reach = Reachability(tree)
        out.append((decoded, inner_reach, status))
        out.extend(_expand_wrappers(decoded, inner_reach, findings, depth + 1))
    return out


def _node_at_line(tree: ast.AST, line: int) -> ast.AST | None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node, "lineno", None) == line:
            return node
    return None


def _severity(strong: bool, live: bool) -> Severity:
    if not live:
        return Severity.NOTE
    return Severity.ERROR if strong else Severity.WARNING


def _location(unit: SourceUnit, node: ast.AST) -> tuple[str, int | None, str]:
    line = getattr(node, "lineno", None)
    if unit.line_offset:
        return unit.file, unit.line_offset, f" [decoded line {line}]"
    return unit.file, line, ""


def _status(unit: _Unit, node: ast.AST) -> Status:
    if not unit.outer_status.live:
        return unit.outer_status
    status = unit.reach.status(node)
    if unit.library and not status.live and not status.flags:
        return Status(True)  # a module's function not called inside the module is called by the script
    return status


def _rule_findings(unit: _Unit, env: Mapping[str, str] | None) -> list[Finding]:
    del env  # the environment is already applied through unit.reach
    ctx = RuleContext.build(unit.source.tree, unit.reach)
    out = []
    for rule in ALL_RULES:
        for hit in rule(ctx):
            status = _status(unit, hit.node)
            file, line, suffix = _location(unit.source, hit.node)
            severity = Severity.NOTE if hit.code == "TTT_SCORE_FIRST" else _severity(hit.strong, status.live)
            where = "" if status.live else f" ({status.describe()})"
            out.append(_finding(severity, hit.code, f"{hit.message}{where}{suffix}", file, line))
    return out


def _lut_findings(units: list[_Unit], folder: Path) -> list[Finding]:
    out: list[Finding] = []
    trees = [u.source.tree for u in units]
    analysed = False
    for unit in units:
        for func in luts.lut_functions(unit.source.tree):
            analysed = True
            status = _status(unit, func)
            for issue in luts.analyse_lut(func):
                file, line, suffix = _location(unit.source, issue.node)
                severity = _SEVERITY[issue.severity] if status.live else Severity.NOTE
                where = "" if status.live else f" ({status.describe()})"
                out.append(_finding(severity, issue.code, f"{issue.message}{where}{suffix}", file, line))
    if not analysed:
        custom = any(luts.uses_custom_table(t) for t in trees)
        reason = "byte counts come from a file or sidecar" if custom else "no build_sentencepiece_luts-style table"
        out.append(
            note(
                "LUT_NOT_ANALYSED",
                f"the bytes-per-token table could not be checked statically ({reason}); verify the val_bpb "
                "denominator by recomputing it",
                units[0].source.file if units else None,
            )
        )
        return out
    if not luts.has_space_piece_guard(trees):
        lacking, unreadable = luts.tokenizers_without_space_piece(folder)
        for rel in lacking:
            out.append(
                error(
                    "LUT_NO_SPACE_PIECE",
                    f"tokenizer {rel} has no standalone '\u2581' piece and the script does not guard against it: "
                    "spaces become 3 byte-fallback tokens counted as 3 bytes (#897, ~20 % low bpb)",
                    rel,
                )
            )
        for rel in unreadable:
            out.append(
                note(
                    "LUT_SPACE_PIECE_UNCHECKED",
                    f"tokenizer {rel} could not be read to check for a standalone '\u2581' piece (#897)",
                    rel,
                )
            )
    return out


def audit_source(folder: Path, script: Path, *, env: Mapping[str, str] | None = None) -> list[Finding]:
    """Static legality audit of `script` (inside `folder`) and of everything it decodes or pulls in locally.

    `env` overrides environment variables when judging reachability (e.g. the settings a run command or a log's
    hyperparameter echo shows); by default the script's own defaults decide. Never executes the analysed code."""
    folder, script = locate(folder, script)
    findings: list[Finding] = []
    main = _load(folder, script, findings)
    if main is None:
        return findings
    units: list[_Unit] = []
    main_reach = Reachability(main.tree, env)
    units.append(_Unit(main, main_reach, Status(True), False))
    for decoded, reach, status in _expand_wrappers(main, main_reach, findings):
        units.append(_Unit(decoded, reach, status, False))
    try:
        decoded_trees = tuple(u.source.tree for u in units[1:])
        closure = local_closure(folder, script, main.tree, decoded_trees)
    except UnsafePath as exc:
        findings.append(error("SOURCE_UNSAFE_PATH", str(exc), main.file))
        closure = None
    if closure is not None:
        findings.extend(_module_findings(closure))
        for rel in closure.paths:
            if not rel.endswith(".py"):
                continue
            module = _load(folder, folder / rel, findings)
            if module is None:
                continue
            reach = Reachability(module.tree, env)
            units.append(_Unit(module, reach, Status(True), True))
            for decoded, inner, status in _expand_wrappers(module, reach, findings):
                units.append(_Unit(decoded, inner, status, True))
    for unit in units:
        findings.extend(_rule_findings(unit, env))
    findings.extend(_lut_findings(units, folder))
    return _dedupe(findings)


def _module_findings(closure) -> list[Finding]:
    out: list[Finding] = []
    if closure.references:
        listing = ", ".join(f"{ref.path} ({ref.kind}, {ref.source}:{ref.line})" for ref in closure.references)
        out.append(
            note(
                "LOCAL_MODULES",
                f"the script pulls in local code that counts towards code bytes: {listing}",
                closure.references[0].source,
                closure.references[0].line,
            )
        )
    for ref in closure.references:
        if ref.silent_fallback:
            out.append(
                warning(
                    "LOCAL_IMPORT_FALLBACK",
                    f"import of local {ref.path} sits in try/except ImportError with a silent fallback: a missing file "
                    "changes what runs without an error",
                    ref.source,
                    ref.line,
                )
            )
    for bad in closure.unsafe:
        out.append(
            error(
                "SOURCE_UNSAFE_PATH",
                f"{bad.name} (referenced at {bad.source}:{bad.line}) is not audited: {bad.reason}",
                bad.source,
                bad.line,
            )
        )
    for rel in closure.unreadable:
        out.append(warning("SOURCE_UNPARSED", f"local module {rel} could not be parsed; not audited", rel))
    return out


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple] = set()
    out = []
    for finding in findings:
        key = (finding.code, finding.file, finding.line, finding.message)
        if key not in seen:
            seen.add(key)
            out.append(finding)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m validator.source.audit FOLDER [SCRIPT]`: the findings (and code bytes) as JSON on stdout.
    Exit 0 without error findings, 1 with, 2 when the script cannot be found."""
    import argparse
    import json

    from validator.source.codebytes import code_bytes

    parser = argparse.ArgumentParser(prog="python -m validator.source.audit", description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("script", nargs="?", default="train_gpt.py", help="script inside the folder")
    args = parser.parse_args(argv)
    script = args.folder / args.script
    if not script.is_file():
        print(f"validator.source: {script} not found: pass the records folder and its script name", file=sys.stderr)
        return 2
    findings = audit_source(args.folder, script)
    report = {"findings": [f.to_dict() for f in findings]}
    try:
        report["code_bytes"] = code_bytes(args.folder, script).to_dict()
    except UnsafePath as exc:
        report["code_bytes"] = {"problems": [str(exc)]}
    print(json.dumps(report, indent=2))
    return 1 if any(f.severity is Severity.ERROR for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
