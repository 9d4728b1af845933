"""SLOT-style deltas (PR #1240 proof, #1336): a fresh tensor with requires_grad (a hidden-state delta or a logit
bias) optimised at evaluation time, with a loss on the targets that are then scored."""

from __future__ import annotations

import ast

from validator.source.rules.common import Hit, RuleContext, is_score_statement, node_name


def fresh_grad_tensors(ctx: RuleContext, func: ast.AST) -> dict[str, ast.AST]:
    """Names bound inside `func` to new tensors that require grad (not module attributes set up in __init__)."""
    found: dict[str, ast.AST] = {}
    for node in ctx.walk(func):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call):
                grad_kw = any(
                    k.arg == "requires_grad" and ctx.reach.evaluator.truth(k.value) is True for k in value.keywords
                )
                is_param = node_name(value.func) == "Parameter"
                chained = isinstance(value.func, ast.Attribute) and value.func.attr == "requires_grad_"
                if grad_kw or is_param or chained:
                    found[node.targets[0].id] = node
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "requires_grad_":
            if isinstance(node.func.value, ast.Name):
                found.setdefault(node.func.value.id, node)
    return found


def _optimised(ctx: RuleContext, func: ast.AST, names: set[str]) -> ast.AST | None:
    """An optimizer built over, or an autograd.grad taken with respect to, one of `names`."""
    for node in ctx.walk(func):
        if not isinstance(node, ast.Call):
            continue
        callee = node_name(node.func)
        args = [*node.args, *(k.value for k in node.keywords)]
        inner = {n.id for arg in args for n in ast.walk(arg) if isinstance(n, ast.Name)}
        if callee in ("Adam", "AdamW", "SGD", "LBFGS", "RMSprop", "Adagrad") and inner & names:
            return node
        if callee == "grad" and len(node.args) >= 2:
            if {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & names:
                return node
    return None


def _loss_of(call: ast.Call) -> ast.AST:
    """The loss of `loss.backward()` or of `torch.autograd.grad(loss, ...)`."""
    if node_name(call.func) == "backward" and isinstance(call.func, ast.Attribute):
        return call.func.value
    return call.args[0] if call.args else call


def slot_functions(ctx: RuleContext) -> dict[int, ast.AST]:
    """id(function) -> the optimizer call, for every function that optimises a fresh delta."""
    out = {}
    for func in ctx.functions:
        if func.name == "__init__":
            continue
        deltas = fresh_grad_tensors(ctx, func)
        if deltas:
            site = _optimised(ctx, func, set(deltas))
            if site is not None:
                out[id(func)] = site
    return out


def slot_delta(ctx: RuleContext) -> list[Hit]:
    hits = []
    slots = slot_functions(ctx)
    for func in ctx.functions:
        site = slots.get(id(func))
        if site is None:
            continue
        touches_val = ctx.reads_val(func, func) or "eval" in func.name or "slot" in func.name.lower()
        if not touches_val:
            continue
        losses = [n for n in ctx.walk(func) if isinstance(n, ast.Call) and node_name(n.func) in ("backward", "grad")]
        on_targets = any(ctx.reads_target(_loss_of(n), func) for n in losses)
        scores = any(is_score_statement(stmt) for stmt in func.body)
        if on_targets and scores:
            hits.append(
                Hit(
                    "SLOT_DELTA_ON_SCORED_TARGETS",
                    True,
                    f"{func.name}() optimises a fresh delta/logit bias against the targets it then scores "
                    "(SLOT, PR #1240/#1336: adapt-then-score on the scored tokens)",
                    site,
                )
            )
        else:
            hits.append(
                Hit(
                    "SLOT_DELTA_AT_EVAL",
                    False,
                    f"{func.name}() optimises a fresh delta/logit bias on validation data at evaluation time "
                    "(SLOT-style); check that its loss never sees a token before that token is scored",
                    site,
                )
            )
    return hits
