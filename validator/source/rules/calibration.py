"""Calibration on validation data (#593/#576/#569 GPTQ, #1919 AWQ, #991 temperature): quantisation statistics or
a temperature fitted on the tokens that are scored."""

from __future__ import annotations

import ast
import re

from validator.source.rules.common import Hit, RuleContext, node_name

CALIBRATION_CALL = re.compile(r"gptq|hessian|calib|awq|smoothquant|quantiz", re.IGNORECASE)
CALIBRATION_NAME = re.compile(r"calib|hessian", re.IGNORECASE)
TEMPERATURE_NAME = re.compile(
    r"(?:optimal|best)_?t(?:emp(?:erature)?)?$|temp(?:erature)?_?(?:scal|search|opt|fit)", re.I
)


def calibration_on_val(ctx: RuleContext) -> list[Hit]:
    hits: list[Hit] = []
    temperature_funcs: set[int] = set()
    for node in ctx.nodes:
        func = ctx.function_of(node)
        if isinstance(node, ast.Call):
            callee = node_name(node.func)
            if callee and CALIBRATION_CALL.search(callee):
                args = [*node.args, *(k.value for k in node.keywords)]
                if any(ctx.reads_val(arg, func) for arg in args):
                    hits.append(
                        Hit(
                            "CALIBRATION_ON_VAL",
                            True,
                            f"{callee}() is given validation data: quantisation calibration must use training data "
                            "(GPTQ/AWQ on val tokens banned, #593/#1919)",
                            node,
                        )
                    )
        elif isinstance(node, ast.Assign):
            names = [node_name(t) for t in node.targets]
            if any(n and CALIBRATION_NAME.search(n) for n in names) and ctx.reads_val(node.value, func):
                hits.append(
                    Hit(
                        "CALIBRATION_ON_VAL",
                        True,
                        f"{names[0]} is built from validation data: calibration must use training data",
                        node,
                    )
                )
            if (
                any(n and TEMPERATURE_NAME.search(n) for n in names)
                and func is not None
                and id(func) not in temperature_funcs
                and ctx.reads_val(func, func)
            ):
                temperature_funcs.add(id(func))
                hits.append(
                    Hit(
                        "TEMPERATURE_FIT_ON_VAL",
                        False,
                        f"{func.name}() appears to choose a temperature on validation data (#991): the scored "
                        "tokens must not pick the model's settings",
                        node,
                    )
                )
    return hits
