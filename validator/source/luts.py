"""Canonicality of the byte tables behind val_bpb (`build_sentencepiece_luts` and look-alikes).

Canonical: base bytes = UTF-8 length of the piece without its leading `▁`; byte-fallback pieces `<0xNN>` = 1;
control/unknown/unused pieces are boundaries with 0 bytes; the eval adds one byte for the leading space unless the
previous token is a boundary. Bugs flagged: the "+1" leading-space bug (base bytes counting the marker or adding one
for the space, on top of the eval's own +1: #1698 lineage, ~16.7 % on SP8192), byte-fallback pieces not counted as
1 byte (#1143/#1184: 3 bytes; 6 when `<0xNN>` is measured as text), a boundary set other than
control|unknown|unused, and no guard for a tokenizer without a standalone `▁` piece (#897) when the folder ships one.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from validator.source.reading import UnsafePath, read_bytes_capped, relative_name
from validator.source.rules.common import node_name

SPACE = "\u2581"
LUT_FUNCTION = re.compile(r"luts?$|lut_|byte_?(?:table|count|len)|sentencepiece_luts", re.IGNORECASE)
BASE_TABLE = re.compile(r"base|bytes|byte_len|nbytes|token_len", re.IGNORECASE)
NOT_BASE = re.compile(r"space|boundary|bound|bos", re.IGNORECASE)
MAX_TOKENIZER_BYTES = 50_000_000


@dataclass(frozen=True)
class LutIssue:
    code: str
    severity: str  # "error" | "warning" | "note"
    message: str
    node: ast.AST


def _calls(node: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Call) and node_name(n.func) in (name, _camel(name)) for n in ast.walk(node))


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _mentions_space(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and SPACE in n.value for n in ast.walk(node))


def lut_functions(tree: ast.Module) -> list[ast.AST]:
    """Functions that build per-token byte tables from sentencepiece pieces."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        builds = _calls(node, "id_to_piece") or _calls(node, "is_byte")
        if builds and (LUT_FUNCTION.search(node.name) or _mentions_space(node)):
            found.append(node)
    return found


def _base_assignments(func: ast.AST) -> list[tuple[ast.AST, ast.AST]]:
    """(statement, value) of every write into a base-bytes table: `base[i] = v`, `base[i] += v`."""
    out = []
    for node in ast.walk(func):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Subscript):
                name = node_name(target.value)
                if BASE_TABLE.search(name) and not NOT_BASE.search(name):
                    out.append((node, node.value))
    return out


def _adds_one(node: ast.AST, value: ast.AST) -> bool:
    if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
        return True
    for sub in ast.walk(value):
        if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Add):
            for side, other in ((sub.left, sub.right), (sub.right, sub.left)):
                if isinstance(side, ast.Constant) and side.value == 1 and _calls(other, "len"):
                    return True
    return False


def _strips_marker(func: ast.AST) -> tuple[bool, bool]:
    """(strips the marker, replaces it with a real space)."""
    strips = replaces_with_space = False
    for node in ast.walk(func):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
            lower = node.slice.lower
            if node.slice.upper is None and (
                (isinstance(lower, ast.Constant) and lower.value == 1) or (lower is not None and _mentions_space(lower))
            ):
                strips = True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            method = node.func.attr
            if method in ("lstrip", "removeprefix", "strip") and _mentions_space(node.args[0]):
                strips = True
            if method == "replace" and _mentions_space(node.args[0]) and len(node.args) > 1:
                new = node.args[1]
                if isinstance(new, ast.Constant) and new.value == "":
                    strips = True
                else:
                    replaces_with_space = True
    return strips, replaces_with_space


def _byte_branches(func: ast.AST) -> list[list[ast.AST]] | None:
    """The bodies taken for byte-fallback pieces; None when the function never asks `is_byte` or `<0x`."""
    branches: list[list[ast.AST]] = []
    asked = False
    for node in ast.walk(func):
        if isinstance(node, (ast.If, ast.IfExp)):
            test = node.test
            negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
            core = test.operand if negated else test
            byte_test = _calls(core, "is_byte") or any(
                isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("<0x")
                for n in ast.walk(core)
            )
            if not byte_test:
                continue
            asked = True
            if isinstance(node, ast.If):
                branches.append(node.orelse if negated else node.body)
            else:
                branches.append([node.orelse if negated else node.body])
    if not asked and _calls(func, "is_byte"):
        asked = True  # e.g. a mask array built from is_byte; judged by its assignments below
    return branches if asked else None


def _byte_value_ok(branch: list[ast.AST]) -> bool | None:
    """True when the branch gives byte pieces exactly 1 byte, False when another value, None when silent."""
    values = []
    for stmt in branch:
        if isinstance(stmt, ast.expr):
            values.append(stmt)
            continue
        for _node, value in _base_assignments(ast.Module(body=[stmt], type_ignores=[])):
            values.append(value)
    if not values:
        return None
    return all(isinstance(v, ast.Constant) and v.value == 1 for v in values)


def analyse_lut(func: ast.AST) -> list[LutIssue]:
    """Issues of one byte-table function (empty: canonical)."""
    issues: list[LutIssue] = []
    name = func.name
    assignments = _base_assignments(func)
    strips, replaces = _strips_marker(func)
    if any(_adds_one(node, value) for node, value in assignments) or replaces:
        node = next((n for n, v in assignments if _adds_one(n, v)), func)
        issues.append(
            LutIssue(
                "LUT_LEADING_SPACE_PLUS_ONE",
                "error",
                f"{name}() counts the leading space inside the base bytes (+1 or the marker replaced by a space); "
                "the eval adds it again, inflating bytes (~16.7 % on SP8192, #1698 lineage)",
                node,
            )
        )
    elif assignments and _mentions_space(func) and not strips:
        issues.append(
            LutIssue(
                "LUT_SPACE_MARKER_COUNTED",
                "error",
                f"{name}() measures pieces without removing the leading '\u2581' marker: it counts 3 bytes for a "
                "1-byte space",
                assignments[0][0],
            )
        )
    elif assignments and not _mentions_space(func) and not strips:
        issues.append(
            LutIssue(
                "LUT_SPACE_MARKER_COUNTED",
                "error",
                f"{name}() never handles the '\u2581' marker: base bytes include it (3 bytes for a 1-byte space)",
                assignments[0][0],
            )
        )
    branches = _byte_branches(func)
    if branches is None:
        issues.append(
            LutIssue(
                "LUT_BYTE_FALLBACK_NOT_ONE",
                "error",
                f"{name}() never special-cases byte-fallback pieces: '<0xNN>' is measured as text (6 bytes) instead "
                "of 1 byte",
                func,
            )
        )
    else:
        verdicts = [_byte_value_ok(b) for b in branches]
        if any(v is False for v in verdicts) or (verdicts and all(v is None for v in verdicts) and assignments):
            issues.append(
                LutIssue(
                    "LUT_BYTE_FALLBACK_NOT_ONE",
                    "error",
                    f"{name}() does not give byte-fallback pieces exactly 1 byte (#1143/#1184: counted as 3)",
                    func,
                )
            )
    missing = [kind for kind in ("is_control", "is_unknown", "is_unused") if not _calls(func, kind)]
    if missing:
        severity = "warning" if missing == ["is_unused"] else "error"
        issues.append(
            LutIssue(
                "LUT_BOUNDARY_SET",
                severity,
                f"{name}()'s boundary set is not control|unknown|unused (missing {', '.join(missing)}): such pieces "
                "get bytes or a leading-space byte they do not have",
                func,
            )
        )
    return issues


def has_space_piece_guard(trees: list[ast.Module]) -> bool:
    """Does any source check that the tokenizer has a standalone '▁' piece (`piece_to_id("▁")`)?"""
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node_name(node.func) in ("piece_to_id", "PieceToId"):
                if any(_mentions_space(arg) for arg in node.args):
                    return True
    return False


def tokenizers_without_space_piece(folder: Path) -> tuple[list[str], list[str]]:
    """(shipped .model files that lack a standalone '▁' piece, files that could not be read as sentencepiece)."""
    lacking, unreadable = [], []
    try:
        candidates = sorted(p for p in folder.rglob("*.model") if not p.is_symlink())[:8]
    except OSError:
        return lacking, unreadable
    for path in candidates:
        rel = relative_name(folder, path)
        try:
            data, truncated = read_bytes_capped(folder, path, MAX_TOKENIZER_BYTES)
            if truncated:
                unreadable.append(rel)
                continue
            import sentencepiece as spm

            processor = spm.SentencePieceProcessor()
            processor.LoadFromSerializedProto(data)
            if processor.piece_to_id(SPACE) == processor.unk_id():
                lacking.append(rel)
        except (UnsafePath, RuntimeError, OSError, ValueError, TypeError, ImportError):
            unreadable.append(rel)
    return lacking, unreadable


def uses_custom_table(tree: ast.Module) -> bool:
    """Byte counts read from a file (a meta .npz or a sidecar) rather than computed from the tokenizer."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.search(r"meta\.npz|base_bytes|val_bytes|byte_sidecar|bytes_.*\.bin", node.value):
                return True
    return False
