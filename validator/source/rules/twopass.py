"""Two-pass rescoring (#869, #959, #991): the validation stream scored twice into the same total, the second pass
after a cache or the model has seen the tokens. Each token must be scored exactly once (Issue #1017 C4)."""

from __future__ import annotations

import ast
import re

from validator.source.rules.common import SCORE_NAME, Hit, RuleContext, node_name

TWO_PASS_NAME = re.compile(r"two_?pass|rescor|second_pass|full_rescore", re.IGNORECASE)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)


def _outer_loops(func: ast.AST) -> list[ast.AST]:
    """Loops of `func` not nested in another loop of it, in source order."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(child, _LOOPS):
                found.append(child)
            else:
                visit(child)

    visit(func)
    return found


def _accumulators(loop: ast.AST) -> set[str]:
    return {
        node_name(n.target)
        for n in ast.walk(loop)
        if isinstance(n, ast.AugAssign) and SCORE_NAME.search(node_name(n.target) or "")
    }


def _reset_between(ctx: RuleContext, func: ast.AST, first: ast.AST, second: ast.AST, name: str) -> bool:
    for node in ctx.walk(func):
        if isinstance(node, ast.Assign) and first.lineno < node.lineno < second.lineno:
            if any(node_name(t) == name for t in node.targets):
                return True
    return False


def two_pass(ctx: RuleContext) -> list[Hit]:
    hits: list[Hit] = []
    for func in ctx.functions:
        loops = [loop for loop in _outer_loops(func) if _accumulators(loop) and ctx.reads_val(loop, func)]
        flagged = False
        for i, first in enumerate(loops):
            for second in loops[i + 1 :]:
                shared = sorted(
                    name
                    for name in _accumulators(first) & _accumulators(second)
                    if not _reset_between(ctx, func, first, second, name)
                )
                if shared and not flagged:
                    flagged = True
                    hits.append(
                        Hit(
                            "TWO_PASS_RESCORE",
                            True,
                            f"{func.name}() accumulates {shared[0]} over validation data in two separate passes "
                            f"(lines {first.lineno} and {second.lineno}): each token must be scored once (C4)",
                            second,
                        )
                    )
        if not flagged:
            for node in ctx.walk(func):
                name = node_name(node) if isinstance(node, (ast.Name, ast.Attribute, ast.Constant)) else ""
                if isinstance(node, ast.Constant) and not (isinstance(node.value, str) and len(node.value) < 60):
                    continue
                if name and TWO_PASS_NAME.search(name):
                    hits.append(
                        Hit(
                            "TWO_PASS_SUSPECT",
                            False,
                            f"{func.name}() refers to {name!r}: a two-pass/rescoring mode; each token must be "
                            "scored exactly once",
                            node,
                        )
                    )
                    break
    return hits
