"""Is a node of the script live when it runs with its defaults? A rule hit in code that only runs behind an
environment flag whose default is off (or in a function nothing live calls) is dead code: a note, not an error.

Dead code is: a branch of `if`/`while`/conditional expression whose test is statically false (true for `else`),
statements after an early-exit guard (`if not FLAG: return`) whose test is statically true, the right side of an
`and` after a false operand, and functions whose every reference is itself dead (or that nothing references).
Anything not provably dead is live: the analysis errs towards reporting.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass

from validator.source.flags import FlagEvaluator, _assigned

_FUNC = (ast.FunctionDef, ast.AsyncFunctionDef)
_STMT_LISTS = ("body", "orelse", "finalbody")


@dataclass(frozen=True)
class Status:
    live: bool
    flags: frozenset[str] = frozenset()  # environment variables that would turn the code on

    def describe(self) -> str:
        if self.live:
            return "reachable with the default settings"
        if self.flags:
            names = ", ".join(sorted(self.flags))
            return f"dead code with the default settings: only reachable when {names} is set"
        return "dead code: never reached from the script's entry points"


LIVE = Status(True)


def _terminates(body: list[ast.stmt]) -> bool:
    return bool(body) and isinstance(body[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break))


class Reachability:
    """Liveness of every node of one module under an environment (default: the script's own defaults)."""

    def __init__(self, tree: ast.Module, env: Mapping[str, str] | None = None):
        self.tree = tree
        self.parent: dict[int, ast.AST] = {}
        self.func_of: dict[int, ast.AST | None] = {}
        self.defs: dict[str, list[ast.AST]] = {}
        self.nodes: list[ast.AST] = []
        stack: list[tuple[ast.AST, ast.AST | None]] = [(tree, None)]
        while stack:  # one pass: parents, enclosing functions, every node in order
            node, func = stack.pop()
            self.nodes.append(node)
            self.func_of[id(node)] = func
            inner = node if isinstance(node, _FUNC) else func
            if isinstance(node, _FUNC):
                self.defs.setdefault(node.name, []).append(node)
            children = list(ast.iter_child_nodes(node))
            for child in reversed(children):
                self.parent[id(child)] = node
                stack.append((child, inner))
        self.evaluator = FlagEvaluator(tree, env, self.nodes)
        self._walk_cache: dict[int, list[ast.AST]] = {}
        self._local_cache: dict[int, frozenset[str] | None] = {}
        self._locals_cache: dict[int, dict] = {}
        self._live_defs: set[int] = set()
        self._dead_flags: dict[int, frozenset[str]] = {}
        self._solve_functions()

    # -- structure --------------------------------------------------------------------------------------------
    def enclosing_function(self, node: ast.AST) -> ast.AST | None:
        if id(node) in self.func_of:
            return self.func_of[id(node)]
        current = self.parent.get(id(node))
        while current is not None and not isinstance(current, _FUNC):
            current = self.parent.get(id(current))
        return current

    def walk(self, node: ast.AST) -> list[ast.AST]:
        """ast.walk(node) as a list, cached (the rules walk the same functions many times)."""
        key = id(node)
        if key not in self._walk_cache:
            self._walk_cache[key] = self.nodes if node is self.tree else list(ast.walk(node))
        return self._walk_cache[key]

    def _locals(self, func: ast.AST | None) -> dict:
        if func is None:
            return {}
        key = id(func)
        if key not in self._locals_cache:
            bound = _assigned(func.body)
            for arg in ast.walk(func.args):
                if isinstance(arg, ast.arg):
                    bound.setdefault(arg.arg, []).append(None)
            self._locals_cache[key] = bound
        return self._locals_cache[key]

    def _truth(self, expr: ast.expr, func: ast.AST | None) -> tuple[bool | None, frozenset[str]]:
        self.evaluator.flags = set()
        value = self.evaluator.truth(expr, self._locals(func))
        return value, frozenset(self.evaluator.flags)

    # -- dead branches inside one function (or the module body) --------------------------------------------
    def local_dead(self, node: ast.AST) -> frozenset[str] | None:
        """Flags keeping `node` dead within its own function, or None when it is live there."""
        key = id(node)
        if key in self._local_cache:
            return self._local_cache[key]
        func = self.enclosing_function(node)
        result: frozenset[str] | None = None
        child, parent = node, self.parent.get(id(node))
        while parent is not None and result is None and not isinstance(child, _FUNC):
            result = self._dead_edge(child, parent, func)
            if isinstance(parent, _FUNC):
                break
            child, parent = parent, self.parent.get(id(parent))
        self._local_cache[key] = result
        return result

    def _dead_edge(self, child: ast.AST, parent: ast.AST, func: ast.AST | None) -> frozenset[str] | None:
        if isinstance(parent, (ast.If, ast.While, ast.IfExp)) and child is not parent.test:
            in_body = child in parent.body if isinstance(parent.body, list) else child is parent.body
            truth, flags = self._truth(parent.test, func)
            if in_body and truth is False:
                return flags
            if not in_body and truth is True and not isinstance(parent, ast.While):
                return flags
        if isinstance(parent, ast.BoolOp) and isinstance(parent.op, ast.And) and child in parent.values:
            for earlier in parent.values[: parent.values.index(child)]:
                truth, flags = self._truth(earlier, func)
                if truth is False:
                    return flags
        for field in _STMT_LISTS:
            stmts = getattr(parent, field, None)
            if isinstance(stmts, list) and child in stmts:
                for earlier in stmts[: stmts.index(child)]:
                    if isinstance(earlier, (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                        return frozenset()
                    if isinstance(earlier, ast.If) and _terminates(earlier.body) and not earlier.orelse:
                        truth, flags = self._truth(earlier.test, func)
                        if truth is True:
                            return flags
        return None

    # -- functions: live when something live refers to them ------------------------------------------------
    def _references(self) -> list[tuple[str, ast.AST]]:
        refs: list[tuple[str, ast.AST]] = []
        for node in self.nodes:
            if isinstance(node, ast.Name) and node.id in self.defs and not isinstance(node.ctx, ast.Store):
                refs.append((node.id, node))
            elif isinstance(node, ast.Attribute) and node.attr in self.defs:
                refs.append((node.attr, node))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in self.defs:
                refs.append((node.value, node))
        return refs

    def _solve_functions(self) -> None:
        for name, defs in self.defs.items():
            if name.startswith("__") and name.endswith("__") or name in ("forward", "backward"):
                for d in defs:
                    if self.enclosing_function(d) is None:  # methods called implicitly by Python / torch
                        self._live_defs.add(id(d))
        refs = self._references()
        changed = True
        while changed:
            changed = False
            for name, ref in refs:
                owner = self.enclosing_function(ref)
                if owner is not None and id(owner) not in self._live_defs:
                    continue
                if owner is not None and owner.name == name:
                    continue  # recursion keeps nothing alive
                if self.local_dead(ref) is not None:
                    continue
                for d in self.defs[name]:
                    if id(d) not in self._live_defs:
                        self._live_defs.add(id(d))
                        changed = True
        dead = [d for defs in self.defs.values() for d in defs if id(d) not in self._live_defs]
        for d in dead:
            self._dead_flags[id(d)] = frozenset()
        for _ in range(4):
            for name, ref in refs:
                targets = [d for d in self.defs[name] if id(d) not in self._live_defs]
                if not targets:
                    continue
                flags = self.local_dead(ref) or frozenset()
                owner = self.enclosing_function(ref)
                if owner is not None and id(owner) not in self._live_defs and owner.name != name:
                    flags = flags | self._dead_flags.get(id(owner), frozenset())
                for d in targets:
                    self._dead_flags[id(d)] = self._dead_flags[id(d)] | flags

    def status(self, node: ast.AST) -> Status:
        """Live, or dead with the flags that would turn it on."""
        flags = self.local_dead(node)
        if flags is not None:
            return Status(False, flags)
        func = node if isinstance(node, _FUNC) else self.enclosing_function(node)
        while func is not None:
            if id(func) not in self._live_defs:
                return Status(False, self._dead_flags.get(id(func), frozenset()))
            outer_flags = self.local_dead(func)
            if outer_flags is not None:
                return Status(False, outer_flags)
            func = self.enclosing_function(func)
        return LIVE
