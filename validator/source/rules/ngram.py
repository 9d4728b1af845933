"""Hashed n-gram / phrase caches keyed on the scored token (PR #779 ruling): a hash mixing a large multiplier or
XOR prime with target ids, and the blend of a cache probability into the gathered gold-token probability."""

from __future__ import annotations

import ast
import re

from validator.source.rules.common import Hit, RuleContext, node_name

HASH_CONSTANT_MIN = 1 << 16
CACHE_NAME = re.compile(r"ngram|n_gram|cache|count|hash|ctx_table|full_table|phrase|backoff", re.IGNORECASE)


def _large_constant(node: ast.AST, ctx: RuleContext) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return abs(node.value) >= HASH_CONSTANT_MIN
    if isinstance(node, ast.Name):
        values = ctx.bindings(None).get(node.id, [])
        return len(values) == 1 and _large_constant(values[0], ctx)
    return False


def _is_hash_mix(expr: ast.BinOp, ctx: RuleContext) -> bool:
    """An XOR (hash combine), or a multiply by a large constant (a hashing multiplier/prime), in the expression."""
    for node in ast.walk(expr):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            if _large_constant(node.left, ctx) or _large_constant(node.right, ctx):
                return True
    return False


def _gathers_gold(expr: ast.AST, ctx: RuleContext, func: ast.AST | None) -> bool:
    for node in ast.walk(expr):
        if isinstance(node, ast.Call) and node_name(node.func) == "gather":
            if any(ctx.reads_target(arg, func) for arg in [*node.args, *(k.value for k in node.keywords)]):
                return True
    return False


def ngram_cache(ctx: RuleContext) -> list[Hit]:
    hits: list[Hit] = []
    seen_lines: set[int] = set()
    for node in ctx.nodes:
        if not isinstance(node, ast.BinOp):
            continue
        parent = ctx.reach.parent.get(id(node))
        if isinstance(parent, ast.BinOp):
            continue  # judge whole expressions only
        func = ctx.function_of(node)
        if _is_hash_mix(node, ctx) and ctx.reads_target(node, func) and node.lineno not in seen_lines:
            seen_lines.add(node.lineno)
            hits.append(
                Hit(
                    "NGRAM_HASH_KEYED_ON_TARGET",
                    True,
                    "hash key mixes the scored target token (hashed n-gram cache keyed on targets, PR #779 ruling): "
                    "the prediction at a position reads the token it is scored on",
                    node,
                )
            )
        elif isinstance(node.op, ast.Add) and func is not None:
            sides = (node.left, node.right)
            for gold, other in (sides, sides[::-1]):
                names = {node_name(n) for n in ast.walk(other)}
                if _gathers_gold(gold, ctx, func) and any(CACHE_NAME.search(n) for n in names if n):
                    hits.append(
                        Hit(
                            "NGRAM_GOLD_BLEND",
                            False,
                            "a cache/n-gram probability is blended into the gathered gold-token probability only "
                            "(not a normalised distribution over the vocabulary, Issue #1017 C2)",
                            node,
                        )
                    )
                    break
    return hits
