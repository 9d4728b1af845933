"""Static values of configuration expressions: what `int(os.environ.get("NGRAM", "0"))` or a Hyperparameters
attribute holds when nobody sets the environment. Used to tell code behind a default-off flag from live code.

`FlagEvaluator.value(expr)` returns a Python value or UNKNOWN, and records in `.flags` the environment variables
the value depends on. Nothing is executed: only constants, environment look-ups, a few builtins and operators.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping

from validator.source.wrappers import import_aliases


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()
_SIMPLE = (str, int, float, bool, type(None), tuple)
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Div: operator.truediv,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_STR_METHODS = {"lower", "upper", "strip", "lstrip", "rstrip", "casefold"}
_ENV_GETTERS = {"os.environ.get", "os.getenv", "environ.get", "getenv", "os.environ.setdefault"}


def _assigned(body: list[ast.stmt]) -> dict[str, list[ast.expr]]:
    """Name -> every expression bound to it by plain assignments in `body` (nested blocks included, not defs)."""
    bound: dict[str, list[ast.expr]] = {}
    stack = list(body)
    while stack:
        stmt = stack.pop()
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    bound.setdefault(target.id, []).append(stmt.value)
                elif isinstance(target, (ast.Tuple, ast.List)):
                    for elt in target.elts:
                        if isinstance(elt, ast.Name):
                            bound.setdefault(elt.id, []).append(None)  # type: ignore[arg-type]
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            bound.setdefault(stmt.target.id, []).append(stmt.value)  # type: ignore[arg-type]
        elif isinstance(stmt, (ast.AugAssign, ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)):
            for target in _store_names(stmt):
                bound.setdefault(target, []).append(None)  # type: ignore[arg-type]
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.stmt):
                stack.append(child)
            elif isinstance(child, (ast.excepthandler, ast.match_case)):
                stack.extend(child.body)
    return bound


def _store_names(stmt: ast.stmt) -> list[str]:
    names = []
    targets: list[ast.AST] = []
    if isinstance(stmt, ast.AugAssign):
        targets = [stmt.target]
    elif isinstance(stmt, (ast.For, ast.AsyncFor)):
        targets = [stmt.target]
    elif isinstance(stmt, (ast.With, ast.AsyncWith)):
        targets = [item.optional_vars for item in stmt.items if item.optional_vars is not None]
    for target in targets:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                names.append(node.id)
    return names


class FlagEvaluator:
    """Evaluates configuration expressions of one module under an environment (default: empty)."""

    def __init__(self, tree: ast.Module, env: Mapping[str, str] | None = None, nodes: list[ast.AST] | None = None):
        self.env = dict(env or {})
        nodes = nodes if nodes is not None else list(ast.walk(tree))
        self.aliases = import_aliases(tree, nodes)
        self.module_names = _assigned(tree.body)
        self.attributes: dict[str, list[ast.expr]] = {}
        self.functions: dict[str, ast.FunctionDef] = {}
        for node in nodes:
            if isinstance(node, ast.ClassDef):
                for name, values in _assigned(node.body).items():
                    self.attributes.setdefault(name, []).extend(values)
            elif isinstance(node, ast.FunctionDef):
                self.functions.setdefault(node.name, node)
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Assign):
                        for target in sub.targets:
                            if (
                                isinstance(target, ast.Attribute)
                                and isinstance(target.value, ast.Name)
                                and target.value.id == "self"
                            ):
                                self.attributes.setdefault(target.attr, []).append(sub.value)
        self.flags: set[str] = set()

    def truth(self, expr: ast.expr, local: Mapping[str, list[ast.expr]] | None = None) -> bool | None:
        """True/False when `expr` has a definite truth value under the environment, else None."""
        value = self.value(expr, local or {})
        if value is UNKNOWN:
            return None
        try:
            return bool(value)
        except Exception:
            return None

    def value(self, node: ast.AST, local: Mapping[str, list[ast.expr]], depth: int = 0):  # noqa: C901
        if depth > 30:
            return UNKNOWN
        nxt = depth + 1
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            values = local.get(node.id) or (None if node.id in local else self.module_names.get(node.id))
            return self._single(values, local, nxt)
        if isinstance(node, ast.Attribute):
            dotted = self._dotted(node)
            if dotted in ("os.environ", "environ"):
                return UNKNOWN
            return self._attribute(node.attr, nxt)
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = tuple(self.value(e, local, nxt) for e in node.elts)
            return UNKNOWN if any(i is UNKNOWN for i in items) else items
        if isinstance(node, ast.UnaryOp):
            operand = self.value(node.operand, local, nxt)
            if operand is UNKNOWN:
                return UNKNOWN
            try:
                if isinstance(node.op, ast.Not):
                    return not operand
                if isinstance(node.op, ast.USub):
                    return -operand
                if isinstance(node.op, ast.UAdd):
                    return +operand
            except Exception:
                return UNKNOWN
            return UNKNOWN
        if isinstance(node, ast.BoolOp):
            return self._boolop(node, local, nxt)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = self.value(node.left, local, nxt), self.value(node.right, local, nxt)
            if left is UNKNOWN or right is UNKNOWN:
                return UNKNOWN
            try:
                return _BINOPS[type(node.op)](left, right)
            except Exception:
                return UNKNOWN
        if isinstance(node, ast.Compare):
            return self._compare(node, local, nxt)
        if isinstance(node, ast.IfExp):
            test = self.value(node.test, local, nxt)
            if test is UNKNOWN:
                return UNKNOWN
            return self.value(node.body if test else node.orelse, local, nxt)
        if isinstance(node, ast.Call):
            return self._call(node, local, nxt)
        return UNKNOWN

    def _attribute(self, attr: str, depth: int):
        """`self.flag` / `h.flag`: copies of a same-named attribute (`self.flag = h.flag`) pass the value through;
        the other bindings must all agree on one known value."""
        values = [v for v in self.attributes.get(attr) or [] if not (isinstance(v, ast.Attribute) and v.attr == attr)]
        if not values or any(v is None for v in values):
            return UNKNOWN
        results = [self.value(v, {}, depth) for v in values]
        first = results[0]
        if first is UNKNOWN or any(r is UNKNOWN or type(r) is not type(first) or r != first for r in results[1:]):
            return UNKNOWN
        return first

    def _single(self, values: list[ast.expr] | None, local, depth: int):
        if not values or len(values) != 1 or values[0] is None:
            return UNKNOWN
        return self.value(values[0], local, depth)

    def _dotted(self, node: ast.AST) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(self.aliases.get(node.id, node.id))
        return ".".join(reversed(parts))

    def _boolop(self, node: ast.BoolOp, local, depth: int):
        is_and = isinstance(node.op, ast.And)
        result = None
        unknown = False
        for value_node in node.values:
            value = self.value(value_node, local, depth)
            if value is UNKNOWN:
                unknown = True
                continue
            if is_and and not value:
                return value  # False and anything -> False, whatever the unknowns
            if not is_and and value:
                return value
            result = value
        return UNKNOWN if unknown else result

    def _compare(self, node: ast.Compare, local, depth: int):
        if (
            len(node.ops) == 1
            and isinstance(node.ops[0], (ast.In, ast.NotIn))
            and self._dotted(node.comparators[0]) in ("os.environ", "environ")
        ):
            key = self.value(node.left, local, depth)
            if not isinstance(key, str):
                return UNKNOWN
            self.flags.add(key)
            present = key in self.env
            return present if isinstance(node.ops[0], ast.In) else not present
        left = self.value(node.left, local, depth)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.value(comparator, local, depth)
            if left is UNKNOWN or right is UNKNOWN or type(op) not in _CMPOPS:
                return UNKNOWN
            try:
                if not _CMPOPS[type(op)](left, right):
                    return False
            except Exception:
                return UNKNOWN
            left = right
        return True

    def _call(self, node: ast.Call, local, depth: int):
        name = self._dotted(node.func)
        args = node.args
        if name in _ENV_GETTERS and args:
            key = self.value(args[0], local, depth)
            if not isinstance(key, str):
                return UNKNOWN
            self.flags.add(key)
            if key in self.env:
                return self.env[key]
            default_node = args[1] if len(args) > 1 else next((k.value for k in node.keywords if k.arg), None)
            return None if default_node is None else self.value(default_node, local, depth)
        if isinstance(node.func, ast.Attribute) and node.func.attr in _STR_METHODS and not args:
            inner = self.value(node.func.value, local, depth)
            return getattr(inner, node.func.attr)() if isinstance(inner, str) else UNKNOWN
        if name in ("int", "float", "bool", "str") and len(args) == 1 and not node.keywords:
            inner = self.value(args[0], local, depth)
            if inner is UNKNOWN:
                return UNKNOWN
            try:
                return {"int": int, "float": float, "bool": bool, "str": str}[name](inner)
            except Exception:
                return UNKNOWN
        if name in ("getattr", "builtins.getattr") and len(args) == 3:
            attr = self.value(args[1], local, depth)
            if not isinstance(attr, str):
                return UNKNOWN
            if attr in self.attributes:
                return self._single(self.attributes[attr], {}, depth)
            return self.value(args[2], local, depth)
        if name in self.functions and not node.keywords:
            return self._inline(self.functions[name], args, local, depth)
        return UNKNOWN

    def _inline(self, func: ast.FunctionDef, args: list[ast.expr], local, depth: int):
        """A helper such as `def env_flag(name, default): return bool(int(os.environ.get(name, default)))`."""
        body = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
            return UNKNOWN
        params = [a.arg for a in func.args.args]
        defaults = func.args.defaults
        bindings: dict[str, list[ast.expr]] = {}
        first_default = len(params) - len(defaults)
        for index, param in enumerate(params):
            if index < len(args):
                bound = self.value(args[index], local, depth)
            elif index >= first_default:
                bound = self.value(defaults[index - first_default], {}, depth)
            else:
                return UNKNOWN
            if bound is UNKNOWN or not isinstance(bound, _SIMPLE):
                return UNKNOWN
            bindings[param] = [ast.Constant(bound)]
        return self.value(body[0].value, bindings, depth)
