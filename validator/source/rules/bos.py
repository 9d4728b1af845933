"""Cross-document leakage at BOS (#1797 audit, fixed in #1851/#1855): a token-shift op (smear gate, previous-token
mix, causal conv) that crosses document boundaries while the rest of the model isolates documents."""

from __future__ import annotations

import ast
import re

from validator.source.rules.common import Hit, RuleContext, node_name

DOC_ISOLATION = re.compile(r"cu_seqlens|varlen|doc_mask|document_mask|doc_ids|document_ids|block_mask", re.I)
MASK_NAME = re.compile(r"bos|doc|boundar|sep_", re.I)


def _is_minus_one(node: ast.AST | None) -> bool:
    return (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and node.operand.value == 1
    )


def _shifted(node: ast.AST) -> bool:
    """x[:, :-1] (any leading dims) — the previous token's row along the sequence axis."""
    if not isinstance(node, ast.Subscript) or not isinstance(node.slice, ast.Tuple):
        return False
    return any(isinstance(e, ast.Slice) and e.lower is None and _is_minus_one(e.upper) for e in node.slice.elts[1:])


def _shift_ops(ctx: RuleContext, func: ast.AST) -> list[ast.AST]:
    ops = []
    for node in ctx.walk(func):
        if not isinstance(node, ast.Call):
            continue
        callee = node_name(node.func)
        if callee in ("cat", "concat", "concatenate", "pad") and any(_shifted(n) for n in ast.walk(node)):
            ops.append(node)
        elif callee == "roll" and any(isinstance(a, ast.Constant) and a.value == 1 for a in node.args[1:2]):
            ops.append(node)
        elif callee == "roll" and any(
            k.arg == "shifts" and isinstance(k.value, ast.Constant) and k.value.value == 1 for k in node.keywords
        ):
            ops.append(node)
    return ops


def _masked(ctx: RuleContext, func: ast.AST) -> bool:
    """A comparison with a BOS/document id (`input_ids != BOS_ID`), or a document index passed to a kernel."""
    for node in ctx.walk(func):
        if isinstance(node, ast.Compare):
            names = [node_name(n) for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))]
            if any(MASK_NAME.search(n) for n in names if n):
                return True
            if any(isinstance(c, ast.Constant) and c.value == 1 for c in node.comparators) and any(
                re.search(r"ids|tok|idx", n) for n in names if n
            ):
                return True  # input_ids == 1: the BOS id of the challenge's tokenizers
        if isinstance(node, ast.Assign) and any(MASK_NAME.search(node_name(t)) for t in node.targets):
            return True  # bos_mask = ..., not_bos = ..., doc_start = ...
        if isinstance(node, ast.keyword) and node.arg in ("seq_idx", "cu_seqlens", "doc_ids", "document_ids"):
            return True
    return False


DOC_START = re.compile(r"^doc_?(?:start|begin|offset|off)s?$", re.I)
DOC_LEN = re.compile(r"^doc_?(?:len|length|size|end)s?$", re.I)
_FUNC = (ast.FunctionDef, ast.AsyncFunctionDef)


def _names_in(node: ast.AST) -> set[str]:
    return {
        n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))
    }


def _builds_document_rows(ctx: RuleContext, func: ast.AST) -> bool:
    """The function lays out one document per row: it unpacks a document's start and length together
    (`doc_start, doc_len = batch[b]`, `for doc_start, doc_len in ...`)."""
    for node in ctx.walk(func):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.For) else []
        names = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if any(DOC_START.match(n) for n in names) and any(DOC_LEN.match(n) for n in names):
            return True
    return False


def _function_names(ctx: RuleContext) -> dict[int, set[str]]:
    """Per function definition, every name it mentions (computed once per module)."""
    cached = getattr(ctx, "_bos_function_names", None)
    if cached is None:
        cached = {
            id(f): {
                n.id if isinstance(n, ast.Name) else n.attr
                for n in ctx.walk(f)
                if isinstance(n, (ast.Name, ast.Attribute))
            }
            for f in ctx.functions
        }
        ctx._bos_function_names = cached
    return cached


def _aliases(ctx: RuleContext, name: str) -> set[str]:
    """Names through which a function is called: wrappers that mention it, names bound to expressions that mention
    it (`f = torch.compile(wrapper)`), and parameters it is passed as (`evaluate(..., forward=f)`)."""
    names = {name}
    by_func = _function_names(ctx)
    for _ in range(8):
        grown: set[str] = set()
        for node in ctx.nodes:
            if isinstance(node, _FUNC) and node.name not in names and names & by_func.get(id(node), set()):
                grown.add(node.name)
            elif isinstance(node, ast.Assign) and names & _names_in(node.value):
                grown |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            elif isinstance(node, ast.Call):
                grown |= {k.arg for k in node.keywords if k.arg and names & _names_in(k.value)}
        grown -= names
        if not grown:
            break
        names |= grown
    return names


def _fed_document_rows(ctx: RuleContext, func: ast.AST) -> bool:
    """A function whose rows hold a single document each: some caller reached through its aliases builds its
    batches one document per row, so a shift inside a row never crosses a document boundary."""
    names = _aliases(ctx, func.name)
    for caller in ctx.functions:
        calls = any(
            isinstance(n, ast.Call) and node_name(n.func) in names and node_name(n.func) != caller.name
            for n in ctx.walk(caller)
        )
        if calls and _builds_document_rows(ctx, caller):
            return True
    return False


def bos_leak(ctx: RuleContext) -> list[Hit]:
    isolates = any(
        DOC_ISOLATION.search(node_name(n))
        for n in ctx.nodes
        if isinstance(n, (ast.Name, ast.Attribute, ast.Constant, ast.arg))
    ) or any(isinstance(n, ast.arg) and DOC_ISOLATION.search(n.arg) for n in ctx.nodes)
    if not isolates:
        return []  # a continuous stream: the previous token is part of the scored prefix (C1 allows it)
    hits = []
    for func in ctx.functions:
        if _masked(ctx, func):
            continue
        ops = _shift_ops(ctx, func)
        if ops and _fed_document_rows(ctx, func):
            ops = []  # one document per row: the previous position is always the same document's
        for op in ops:
            hits.append(
                Hit(
                    "BOS_LEAK_TOKEN_SHIFT",
                    True,
                    f"{func.name}() mixes the previous position's token/state with no BOS or document mask while "
                    "the script isolates documents elsewhere: the first token of a document sees the end of "
                    "another (#1797; fix: mask where input_ids == BOS)",
                    op,
                )
            )
            break
        for node in ctx.walk(func):
            if isinstance(node, ast.Call) and node_name(node.func) in ("causal_conv1d_fn", "conv1d", "Conv1d"):
                if node_name(node.func) == "Conv1d":
                    continue  # the module's construction; its call in forward is what mixes
                if not any(k.arg == "seq_idx" for k in node.keywords):
                    hits.append(
                        Hit(
                            "BOS_LEAK_CONV",
                            False,
                            f"{func.name}() runs a causal conv across positions without seq_idx/document reset "
                            "while documents are isolated elsewhere",
                            node,
                        )
                    )
                    break
    return hits
