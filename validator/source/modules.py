"""Local code a script pulls in at runtime, found statically: imports that resolve to files of the folder,
`exec(open(...).read())`, `runpy`/`importlib` loads, and any literal naming a code file of the folder
(C++/CUDA sources compiled at run time, shared objects). These count towards the code bytes."""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from validator.source.reading import UnsafePath, decode_text, inside, parse_source, read_bytes_capped, relative_name

CODE_SUFFIXES = (".py", ".cpp", ".cc", ".cxx", ".c", ".h", ".hpp", ".cu", ".cuh", ".so", ".pyx")
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
MAX_MODULES = 200


@dataclass(frozen=True)
class LocalReference:
    """One place where a source pulls in a file of the folder."""

    path: str  # the referenced file, relative to the folder
    kind: str  # "import", "load" (exec/runpy/importlib by path or name), or "file" (a literal naming a code file)
    source: str  # the referring file, relative to the folder
    line: int
    silent_fallback: bool = False  # an import inside try/except ImportError whose handler does not re-raise


@dataclass(frozen=True)
class UnsafeReference:
    """A referenced path that exists but leaves the folder (a link) or cannot be read."""

    name: str
    source: str
    line: int
    reason: str


def _module_candidates(base: Path, dotted: str) -> list[Path]:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        return [base / "__init__.py"]
    stem = base.joinpath(*parts)
    return [stem.with_name(stem.name + ".py"), stem / "__init__.py"]


def _fallback_imports(tree: ast.AST) -> set[int]:
    """ids of Import/ImportFrom nodes inside a try whose ImportError handler swallows the error."""
    silent: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        swallowing = False
        for handler in node.handlers:
            names = _handler_names(handler.type)
            if (handler.type is None or names & _IMPORT_ERRORS) and not any(
                isinstance(sub, ast.Raise) for stmt in handler.body for sub in ast.walk(stmt)
            ):
                swallowing = True
        if swallowing:
            for stmt in node.body:
                for sub in ast.walk(stmt):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        silent.add(id(sub))
    return silent


def _handler_names(node: ast.AST | None) -> set[str]:
    if node is None:
        return set()
    elts = node.elts if isinstance(node, ast.Tuple) else [node]
    return {e.id if isinstance(e, ast.Name) else e.attr if isinstance(e, ast.Attribute) else "" for e in elts}


def references_in(folder: Path, path: Path, tree: ast.AST) -> tuple[list[LocalReference], list[UnsafeReference]]:
    """Local files that one source (at `path`, inside `folder`) pulls in."""
    base = path.parent
    source = relative_name(folder, path)
    found: dict[tuple[str, str], LocalReference] = {}
    unsafe: list[UnsafeReference] = []
    silent = _fallback_imports(tree)

    def consider(candidates: list[Path], kind: str, line: int, fallback: bool = False) -> bool:
        for candidate in candidates:
            if not (candidate.exists() or candidate.is_symlink()):
                continue
            try:
                resolved = inside(folder, candidate)
            except UnsafePath as exc:
                unsafe.append(UnsafeReference(relative_name(folder, candidate), source, line, str(exc)))
                return True
            if not resolved.is_file() or resolved == path.resolve():
                continue
            rel = relative_name(folder.resolve(), resolved)
            key = (rel, kind)
            if key not in found or (fallback and not found[key].silent_fallback):
                found[key] = LocalReference(rel, kind, source, line, fallback)
            return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                consider(_module_candidates(base, alias.name), "import", node.lineno, id(node) in silent)
                parts = alias.name.split(".")
                for depth in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
                    consider([base.joinpath(*parts[:depth], "__init__.py")], "import", node.lineno, id(node) in silent)
        elif isinstance(node, ast.ImportFrom):
            origin = base
            for _ in range(max(node.level - 1, 0)):
                origin = origin.parent
            module = node.module or ""
            consider(_module_candidates(origin, module), "import", node.lineno, id(node) in silent)
            for alias in node.names:
                dotted = f"{module}.{alias.name}" if module else alias.name
                consider(_module_candidates(origin, dotted), "import", node.lineno, id(node) in silent)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    consider(_module_candidates(base, arg.value), "load", node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip()
            if 0 < len(text) < 300 and text.endswith(CODE_SUFFIXES) and "\n" not in text and "*" not in text:
                candidates = [base / text, folder / text] if not text.startswith("/") else []
                consider(candidates, "file", getattr(node, "lineno", 0))
    return sorted(found.values(), key=lambda r: (r.path, r.kind)), unsafe


@dataclass(frozen=True)
class LocalClosure:
    """Every local file reached from a script, transitively through the Python ones."""

    references: list[LocalReference]
    unsafe: list[UnsafeReference]
    unreadable: list[str]  # local .py files that could not be parsed (their own references are unknown)

    @property
    def paths(self) -> list[str]:
        return sorted({ref.path for ref in self.references})


def local_closure(
    folder: Path, script: Path, script_tree: ast.AST | None = None, extra_trees: tuple[ast.AST, ...] = ()
) -> LocalClosure:
    """Follow local references from `script` (and from every local .py it reaches), staying inside `folder`.
    `extra_trees` are sources that run as the script itself (payloads decoded from its wrappers)."""
    folder = folder.resolve()
    start = inside(folder, script)
    references: list[LocalReference] = []
    unsafe: list[UnsafeReference] = []
    unreadable: list[str] = []
    visited = {start}
    queue: deque[tuple[Path, ast.AST | None]] = deque([(start, script_tree)])
    queue.extend((start, tree) for tree in extra_trees)
    while queue and len(visited) <= MAX_MODULES:
        path, tree = queue.popleft()
        if tree is None:
            try:
                data, _ = read_bytes_capped(folder, path)
                tree = parse_source(decode_text(data)[0], path.name)
            except (UnsafePath, SyntaxError, ValueError, RecursionError, MemoryError):
                unreadable.append(relative_name(folder, path))
                continue
        refs, bad = references_in(folder, path, tree)
        references.extend(refs)
        unsafe.extend(bad)
        for ref in refs:
            target = (folder / ref.path).resolve()
            if target not in visited and target.suffix == ".py":
                visited.add(target)
                queue.append((target, None))
    return LocalClosure(references, unsafe, unreadable)
