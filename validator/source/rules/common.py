"""What the rules share: the Hit record, name patterns (validation data, scored targets, score accumulators),
and a small intra-module data flow: does an expression depend, through assignments and call arguments, on
something that matches a pattern."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from validator.source.reachability import Reachability
from validator.source.wrappers import dotted_name

_FUNC = (ast.FunctionDef, ast.AsyncFunctionDef)

VAL_NAME = re.compile(
    r"(?:^|_)(?:val|valid|validation|eval)_(?:tokens?|toks|data|ids|loader|files?|pattern|stream|seqs?|shards?|"
    r"docs?|set|split|inputs?|np|arr|array|chunks?|buf|x|y)$",
    re.IGNORECASE,
)
VAL_STRING = re.compile(r"fineweb_val|_val_\*|val_\d*\.bin", re.IGNORECASE)
TARGET_NAME = re.compile(
    r"^(?:y|ys|yb|y_?batch|tgt|tgts|target|targets|target_ids|target_tokens|tgt_ids|labels?|next_tokens?|next_ids|"
    r"gold|gold_ids|y_true)$"
)
SCORE_NAME = re.compile(
    r"(?:loss_sum|sum_loss|total_loss|loss_total|nll|bits|bpb|score|byte_count|token_count|tok_count|losses|"
    r"sum_nll|val_loss)",
    re.IGNORECASE,
)
SCORE_CALL = re.compile(r"(?:^|_)(?:score|eval)(?:_|$)|^eval|accum\w*(?:bpb|loss|nll|score)|(?:bpb|nll)_?accum", re.I)
ACCUMULATOR = re.compile(r"^(?:loss_sum|byte_sum|byte_count|token_count|tok_count|nll_sum|bits_sum|sum_loss)$")


@dataclass(frozen=True)
class Hit:
    code: str
    strong: bool  # a rule break when live (error); False: suggestive (warning)
    message: str
    node: ast.AST


def node_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return ""


def is_val_leaf(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return bool(VAL_STRING.search(node.value))
    name = node_name(node)
    return bool(name) and isinstance(node, (ast.Name, ast.Attribute)) and bool(VAL_NAME.search(name))


def is_target_leaf(node: ast.AST) -> bool:
    if isinstance(node, (ast.Name, ast.Attribute)) and TARGET_NAME.match(node_name(node)):
        return True
    # tokens[pos + 1]: the next token, read inside a per-position loop
    if isinstance(node, ast.Subscript):
        index = node.slice
        if (
            isinstance(index, ast.BinOp)
            and isinstance(index.op, ast.Add)
            and isinstance(index.right, ast.Constant)
            and index.right.value == 1
            and re.search(r"tok|val|ids|seq|stream|np", node_name(node.value), re.IGNORECASE)
        ):
            return True
    return False


def is_score_statement(stmt: ast.AST) -> bool:
    """Accumulates a score: `loss_sum += ...`, `nll.add_(...)`, `losses.append(...)`, `score_chunk(...)`."""
    for node in ast.walk(stmt):
        if isinstance(node, ast.AugAssign) and SCORE_NAME.search(node_name(node.target) or _subscript_base(node)):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("add_", "append", "extend") and SCORE_NAME.search(node_name(node.func.value)):
                return True
        if isinstance(node, ast.Call):
            callee = node_name(node.func)
            if callee and SCORE_CALL.search(callee) and callee not in ("eval",):
                return True
            if any(isinstance(a, ast.Name) and ACCUMULATOR.match(a.id) for a in node.args):
                return True
    return False


def _name_leaf(name: str) -> Callable[[ast.AST], bool]:
    return lambda node: isinstance(node, ast.Name) and node.id == name


def _subscript_base(node: ast.AugAssign) -> str:
    target = node.target
    while isinstance(target, ast.Subscript):
        target = target.value
    return node_name(target)


def _bindings(func: ast.AST | None, tree: ast.Module) -> dict[str, list[ast.AST]]:
    """Name -> expressions it is bound from inside `func` (the module body when None), nested defs excluded."""
    body = tree.body if func is None else func.body
    bound: dict[str, list[ast.AST]] = {}

    def add(target: ast.AST, value: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                bound.setdefault(node.id, []).append(value)

    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (*_FUNC, ast.ClassDef, ast.Lambda, ast.comprehension)):
            continue
        if isinstance(node, ast.Assign):
            for target in node.targets:
                add(target, node.value)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            add(node.target, node.value)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            add(node.target, node.iter)
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            add(node.optional_vars, node.context_expr)
        elif isinstance(node, ast.NamedExpr):
            add(node.target, node.value)
        stack.extend(ast.iter_child_nodes(node))
    return bound


@dataclass
class RuleContext:
    """One module under audit: its tree, reachability, and a memoised data flow."""

    tree: ast.Module
    reach: Reachability
    aliases: dict[str, str] = field(default_factory=dict)
    functions: list[ast.AST] = field(default_factory=list)
    _bindings: dict[int, dict[str, list[ast.AST]]] = field(default_factory=dict)
    _memo: dict[tuple[int, int, str], bool] = field(default_factory=dict)
    _val_params: dict[int, set[str]] = field(default_factory=dict)
    _returns: dict[int, set[str]] = field(default_factory=dict)
    defs_by_name: dict[str, list[ast.AST]] = field(default_factory=dict)

    @classmethod
    def build(cls, tree: ast.Module, reach: Reachability) -> RuleContext:
        ctx = cls(tree, reach, reach.evaluator.aliases)
        ctx.functions = [n for n in reach.nodes if isinstance(n, _FUNC)]
        for func in ctx.functions:
            ctx.defs_by_name.setdefault(func.name, []).append(func)
        ctx._taint_parameters()
        return ctx

    def function_of(self, node: ast.AST) -> ast.AST | None:
        return self.reach.enclosing_function(node)

    @property
    def nodes(self) -> list[ast.AST]:
        return self.reach.nodes

    def walk(self, node: ast.AST) -> list[ast.AST]:
        return self.reach.walk(node)

    def bindings(self, func: ast.AST | None) -> dict[str, list[ast.AST]]:
        key = id(func) if func is not None else 0
        if key not in self._bindings:
            self._bindings[key] = _bindings(func, self.tree)
        return self._bindings[key]

    def dotted(self, node: ast.AST) -> str:
        return dotted_name(node, self.aliases) or node_name(node)

    def depends(self, expr: ast.AST, func: ast.AST | None, leaf: Callable[[ast.AST], bool], kind: str) -> bool:
        """Does `expr` (inside `func`) read something `leaf` accepts, directly or through local bindings?
        A call to a function of this module passes on only the arguments that reach its return value."""
        return self._depends(expr, func, leaf, kind, set())

    def _depends(self, expr, func, leaf, kind, visiting: set) -> bool:
        key = (id(expr), id(func), kind)
        if key in self._memo:
            return self._memo[key]
        self._memo[key] = False  # provisional, breaks cycles
        result = self._walk(expr, func, leaf, kind, visiting)
        self._memo[key] = result
        return result

    def _walk(self, node, func, leaf, kind, visiting, shadow: frozenset = frozenset()) -> bool:
        if leaf(node):
            return True
        if isinstance(node, ast.Name):
            return node.id not in shadow and self._name_depends(node.id, func, leaf, kind, visiting)
        if isinstance(node, ast.Call):
            flowing = self._flowing_arguments(node)
            if flowing is not None:
                return any(self._walk(arg, func, leaf, kind, visiting, shadow) for arg in flowing)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            # comprehension variables live in their own scope: they depend on what they iterate over
            inner = shadow | {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
            parts = [g.iter for g in node.generators]
            rest = [c for g in node.generators for c in g.ifs]
            rest += [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            return any(self._walk(p, func, leaf, kind, visiting, shadow) for p in parts) or any(
                self._walk(p, func, leaf, kind, visiting, inner) for p in rest
            )
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not func:
            return False
        return any(self._walk(child, func, leaf, kind, visiting, shadow) for child in ast.iter_child_nodes(node))

    def _name_depends(self, name: str, func, leaf, kind, visiting) -> bool:
        if kind == "val" and func is not None and name in self._val_params.get(id(func), ()):
            return True
        scopes = [(self.bindings(func), func)] + ([(self.bindings(None), None)] if func is not None else [])
        for scope, owner in scopes:
            if name not in scope:
                continue
            mark = (id(owner), name, kind)
            if mark in visiting:
                return False
            visiting.add(mark)
            return any(self._depends(value, owner, leaf, kind, visiting) for value in scope[name])
        return False

    def _flowing_arguments(self, call: ast.Call) -> list[ast.AST] | None:
        """Arguments of a call to a module function that reach its return value; None when not a module function."""
        defs = self.defs_by_name.get(node_name(call.func))
        if not defs:
            return None
        flowing: list[ast.AST] = []
        for callee in defs:
            params = [a.arg for a in callee.args.args]
            offset = 1 if params[:1] in (["self"], ["cls"]) and isinstance(call.func, ast.Attribute) else 0
            returning = self._returning_params(callee)
            for index, arg in enumerate(call.args):
                if isinstance(arg, ast.Starred) or index + offset >= len(params):
                    flowing.append(arg)
                elif params[index + offset] in returning:
                    flowing.append(arg)
            for keyword in call.keywords:
                if keyword.arg is None or keyword.arg not in params or keyword.arg in returning:
                    flowing.append(keyword.value)
        return flowing

    def _returning_params(self, func: ast.AST) -> set[str]:
        key = id(func)
        if key in self._returns:
            return self._returns[key]
        params = {a.arg for a in ast.walk(func.args) if isinstance(a, ast.arg)}
        self._returns[key] = params  # provisional: recursion keeps everything
        returns = [
            n.value
            for n in self.walk(func)
            if isinstance(n, (ast.Return, ast.Yield)) and n.value is not None and self.function_of(n) is func
        ]
        flowing = set()
        for param in params:
            leaf = _name_leaf(param)
            if any(self._depends(value, func, leaf, f"param:{param}", set()) for value in returns):
                flowing.add(param)
        self._returns[key] = flowing
        return flowing

    def _taint_parameters(self) -> None:
        """Parameters that receive validation data at some call site (two passes cover one level of nesting)."""
        by_name: dict[str, list[ast.AST]] = {}
        for func in self.functions:
            by_name.setdefault(func.name, []).append(func)
        calls = [n for n in self.nodes if isinstance(n, ast.Call) and node_name(n.func) in by_name]
        for _ in range(2):
            self._memo.clear()
            for call in calls:
                caller = self.function_of(call)
                for callee in by_name[node_name(call.func)]:
                    params = [a.arg for a in callee.args.args]
                    offset = 1 if params[:1] in (["self"], ["cls"]) and isinstance(call.func, ast.Attribute) else 0
                    for index, arg in enumerate(call.args):
                        if index + offset < len(params) and self.depends(arg, caller, is_val_leaf, "val"):
                            self._val_params.setdefault(id(callee), set()).add(params[index + offset])
                    for keyword in call.keywords:
                        if keyword.arg in params and self.depends(keyword.value, caller, is_val_leaf, "val"):
                            self._val_params.setdefault(id(callee), set()).add(keyword.arg)
        self._memo.clear()

    def reads_val(self, expr: ast.AST, func: ast.AST | None) -> bool:
        return self.depends(expr, func, is_val_leaf, "val")

    def reads_target(self, expr: ast.AST, func: ast.AST | None) -> bool:
        return self.depends(expr, func, is_target_leaf, "target")


def enclosing_loops(ctx: RuleContext, node: ast.AST, func: ast.AST | None) -> list[tuple[ast.AST, ast.stmt]]:
    """(loop, the statement of its body that holds `node`), innermost first, up to `func`."""
    loops = []
    child, parent = node, ctx.reach.parent.get(id(node))
    while parent is not None and parent is not func:
        if isinstance(parent, (ast.For, ast.AsyncFor, ast.While)) and child in parent.body:
            loops.append((parent, child))
        child, parent = parent, ctx.reach.parent.get(id(parent))
    return loops


def statement_of(ctx: RuleContext, node: ast.AST, body: list[ast.stmt]) -> ast.stmt | None:
    """The statement of `body` that holds `node` (directly or nested)."""
    current = node
    while current is not None:
        if current in body:
            return current
        current = ctx.reach.parent.get(id(current))
    return None
