"""Validation data read by the training side (README: no validation access during training, 2cff08e1a):
`fineweb_val_` files or validation names flowing into a train pattern, train loader or train stream."""

from __future__ import annotations

import ast
import re

from validator.source.rules.common import VAL_NAME, Hit, RuleContext, node_name

TRAIN_NAME = re.compile(
    r"train\w*(?:file|pattern|path|glob|loader|stream|data|token|shard|dir|bin)|"
    r"(?:file|pattern|path|glob|loader|stream|data|token|shard|dir)s?_?train",
    re.IGNORECASE,
)
BOTH_SPLITS = re.compile(r"fineweb_\*|fineweb\*")


def _both_splits_literal(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Constant) and isinstance(n.value, str) and BOTH_SPLITS.search(n.value) for n in ast.walk(node)
    )


def _check(ctx: RuleContext, name: str, value: ast.AST, func, anchor: ast.AST) -> Hit | None:
    if not name or not TRAIN_NAME.search(name) or VAL_NAME.search(name) or "val" in name.lower():
        return None
    if _both_splits_literal(value):
        return Hit(
            "VAL_IN_TRAINING_DATA",
            True,
            f"{name} uses a file pattern that matches the validation shards too (fineweb_*): training would read "
            "fineweb_val_* files",
            anchor,
        )
    if ctx.reads_val(value, func):
        return Hit(
            "VAL_IN_TRAINING_DATA",
            True,
            f"{name} is built from validation data: the training side reads fineweb_val_* (README: no validation "
            "access during training)",
            anchor,
        )
    return None


def val_in_training(ctx: RuleContext) -> list[Hit]:
    hits: list[Hit] = []
    for node in ctx.nodes:
        func = ctx.function_of(node)
        hit = None
        if isinstance(node, ast.Assign):
            for target in node.targets:
                hit = hit or _check(ctx, node_name(target), node.value, func, node)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            hit = _check(ctx, node_name(node.target), node.value, func, node)
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                hit = hit or _check(ctx, keyword.arg or "", keyword.value, func, node)
            callee = node_name(node.func)
            if not hit and callee and TRAIN_NAME.search(callee):
                for arg in node.args:
                    hit = hit or _check(ctx, callee, arg, func, node)
        if hit:
            hits.append(hit)
    return hits
