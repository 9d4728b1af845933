"""Test-time training on validation tokens: legal only score-first (a chunk is scored before any update that has
seen it, Issue #402 / #1017 C3). Train-then-score (pre-quant TTT, #1376) and update-then-score are errors."""

from __future__ import annotations

import ast

from validator.source.rules.common import Hit, RuleContext, enclosing_loops, is_score_statement, node_name
from validator.source.rules.slot import _loss_of, slot_functions

MAX_CALLER_DEPTH = 3


def _order_in_loops(ctx: RuleContext, node: ast.AST, func: ast.AST | None) -> str:
    """ "before" when a score is accumulated earlier in an enclosing loop's iteration, "after" when only later,
    "none" when no enclosing loop of `func` scores anything."""
    after = False
    for loop, holder in enclosing_loops(ctx, node, func):
        index = loop.body.index(holder)
        if any(is_score_statement(stmt) for stmt in loop.body[:index]):
            return "before"
        if any(is_score_statement(stmt) for stmt in loop.body[index + 1 :]):
            after = True
    return "after" if after else "none"


def _callers(ctx: RuleContext, func: ast.AST) -> list[ast.Call]:
    return [
        n
        for n in ctx.nodes
        if isinstance(n, ast.Call) and node_name(n.func) == func.name and ctx.function_of(n) is not func
    ]


def score_order(ctx: RuleContext, node: ast.AST, func: ast.AST | None, depth: int = 0) -> str:
    """Where scoring sits relative to the update at `node`, looking through up to three levels of callers."""
    order = _order_in_loops(ctx, node, func)
    if order != "none" or func is None or depth >= MAX_CALLER_DEPTH:
        return order
    results = {score_order(ctx, call, ctx.function_of(call), depth + 1) for call in _callers(ctx, func)}
    if "before" in results:
        return "before"
    return "after" if "after" in results else "none"


def _throwaway_optimizer(ctx: RuleContext, func: ast.AST, site: ast.AST) -> bool:
    """The optimizer stepped next to `site` is deleted later in the function (`del adapter, opt`)."""
    deleted = {
        target.id
        for node in ctx.walk(func)
        if isinstance(node, ast.Delete)
        for target in node.targets
        for target in ast.walk(target)
        if isinstance(target, ast.Name)
    }
    loops = enclosing_loops(ctx, site, func)
    scope = loops[0][0] if loops else func
    stepped = {
        node.func.value.id
        for node in ctx.walk(scope)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "step"
        and isinstance(node.func.value, ast.Name)
    }
    return bool(stepped) and stepped <= deleted


def test_time_training(ctx: RuleContext) -> list[Hit]:
    hits: list[Hit] = []
    slots = slot_functions(ctx)
    for func in ctx.functions:
        if id(func) in slots:
            continue  # judged by the SLOT rule
        sites = [
            n
            for n in ctx.walk(func)
            if isinstance(n, ast.Call)
            and (
                (node_name(n.func) == "backward" and isinstance(n.func, ast.Attribute))
                or ctx.dotted(n.func) in ("torch.autograd.grad", "autograd.grad")
            )
            and ctx.function_of(n) is func
        ]
        for site in sites:
            if not ctx.reads_val(_loss_of(site), func):
                continue
            order = score_order(ctx, site, func)
            if order == "before":
                hits.append(
                    Hit(
                        "TTT_SCORE_FIRST",
                        False,
                        f"{func.name}() trains on validation tokens after scoring them (score-first TTT, legal "
                        "per Issue #402)",
                        site,
                    )
                )
            elif order == "after":
                hits.append(
                    Hit(
                        "TTT_UPDATE_BEFORE_SCORE",
                        True,
                        f"{func.name}() updates the model on validation tokens and scores them afterwards in the "
                        "same pass (Issue #1017 C3: score before any update that has seen the token)",
                        site,
                    )
                )
            elif _throwaway_optimizer(ctx, func, site):
                hits.append(
                    Hit(
                        "TTT_WARMUP_ON_VAL",
                        False,
                        f"{func.name}() runs backward/step on validation tokens with a throwaway optimizer (compile "
                        "warm-up, #1530): the model is not kept, but warm-up should use synthetic tokens",
                        site,
                    )
                )
            else:
                hits.append(
                    Hit(
                        "TTT_TRAIN_THEN_SCORE",
                        True,
                        f"{func.name}() trains on validation tokens with no scoring before the update "
                        "(train-then-score / pre-quant TTT, #402 and #1376)",
                        site,
                    )
                )
            break  # one finding per function
    return hits
