"""Inline templates/ modules into one self-contained train_gpt.py.

Starting from a variant's entry module, follows `from templates.<module> import name` statements, keeps only the
modules reached, orders them so that each comes after what it imports, hoists and de-duplicates third-party imports,
refuses two modules binding the same top-level name, writes the variant's defaults into VARIANT_DEFAULTS, and checks
the result: it compiles, imports nothing local, and the same inputs give the same bytes.
"""

from __future__ import annotations

import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "templates"
DEFAULTS_NAME = "VARIANT_DEFAULTS"
RULE = "# " + "-" * 117


class AssemblyError(Exception):
    """The templates cannot be assembled; the message names the module and line."""


@dataclass
class Module:
    name: str  # dotted, e.g. templates.mixers.attention
    path: Path
    source: str
    tree: ast.Module
    local_deps: list[str] = field(default_factory=list)


def _module_path(root: Path, name: str) -> Path:
    rel = Path(*name.split("."))
    for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise AssemblyError(f"module {name} not found under {root} (looked for {rel}.py)")


def _load(root: Path, name: str) -> Module:
    path = _module_path(root, name)
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise AssemblyError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from exc
    mod = Module(name, path, source, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssemblyError(f"{path}:{node.lineno}: relative import; use `from {PACKAGE}.<module> import ...`")
            if node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                if node not in tree.body:
                    raise AssemblyError(f"{path}:{node.lineno}: local import must be at module top level")
                if node.module == PACKAGE:
                    raise AssemblyError(f"{path}:{node.lineno}: import from a module, `from {PACKAGE}.<module> ...`")
                mod.local_deps.append(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    raise AssemblyError(
                        f"{path}:{node.lineno}: `import {alias.name}`; write `from {alias.name} import <name>`"
                    )
    return mod


def collect_modules(root: Path, entry: str) -> list[Module]:
    """The modules reached from `entry`, dependencies first; deterministic; cycles refused."""
    loaded: dict[str, Module] = {}
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name) :] + [name])
            raise AssemblyError(f"import cycle between templates: {cycle}")
        visiting.append(name)
        mod = loaded.setdefault(name, _load(root, name))
        for dep in mod.local_deps:
            visit(dep)
        visiting.pop()
        order.append(name)

    visit(entry)
    return [loaded[n] for n in order]


def _bound_names(stmt: ast.stmt) -> list[str]:
    """Top-level names a statement binds (imports excluded), looking inside top-level if/try/with/for blocks."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
        inner = list(stmt.body) + list(getattr(stmt, "orelse", [])) + list(getattr(stmt, "finalbody", []))
        for handler in getattr(stmt, "handlers", []):
            inner += handler.body
        return [name for s in inner for name in _bound_names(s)]
    targets: list[ast.expr] = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    names = []
    for t in targets:
        for node in ast.walk(t):
            if isinstance(node, ast.Name):
                names.append(node.id)
    return names


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _is_main_guard(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.If)
        and isinstance(stmt.test, ast.Compare)
        and isinstance(stmt.test.left, ast.Name)
        and stmt.test.left.id == "__name__"
    )


def _render_defaults(defaults: dict[str, str]) -> str:
    if not defaults:
        return f"{DEFAULTS_NAME}: dict[str, str] = {{}}"
    lines = [f"{DEFAULTS_NAME}: dict[str, str] = {{"]
    lines += [f"    {json.dumps(k)}: {json.dumps(str(v))}," for k, v in sorted(defaults.items())]
    return "\n".join(lines + ["}"])


def _import_key(stmt: ast.Import | ast.ImportFrom) -> list[tuple[str, str]]:
    """(bound name, normalised import statement) for each alias, one statement per alias."""
    out = []
    for alias in stmt.names:
        if isinstance(stmt, ast.Import):
            bound = alias.asname or alias.name.split(".")[0]
            text = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        else:
            bound = alias.asname or alias.name
            text = f"from {stmt.module} import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        out.append((bound, text))
    return out


def assemble_source(root: Path, entry: str, defaults: dict[str, str], header: str) -> str:
    """One script from the templates under `root` (the folder holding the `templates` package)."""
    modules = collect_modules(root, entry)
    future: set[str] = set()
    imports: dict[str, str] = {}  # normalised statement -> bound name
    owners: dict[str, str] = {}  # top-level name -> module that binds it
    bodies: list[str] = []
    defaults_written = False
    for mod in modules:
        lines = mod.source.splitlines()
        drop: set[int] = set()  # 0-based line numbers to leave out
        replace: dict[int, str] = {}  # first line of a statement -> replacement text
        for i, stmt in enumerate(mod.tree.body):
            span = range(stmt.lineno - 1, stmt.end_lineno or stmt.lineno)
            if i == 0 and _is_docstring(stmt):
                drop.update(span)
            elif isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                future.update(a.name for a in stmt.names)
                drop.update(span)
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith(PACKAGE + "."):
                drop.update(span)
            elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for bound, text in _import_key(stmt):
                    imports[text] = bound
                drop.update(span)
            elif _is_main_guard(stmt) and mod.name != entry:
                raise AssemblyError(f"{mod.path}:{stmt.lineno}: only the entry module may have a __main__ block")
            else:
                for name in _bound_names(stmt):
                    if name in owners and owners[name] != mod.name:
                        raise AssemblyError(
                            f"top-level name {name!r} is bound in both {owners[name]} and {mod.name}; rename one"
                        )
                    owners[name] = mod.name
                if _bound_names(stmt) == [DEFAULTS_NAME]:
                    replace[stmt.lineno - 1] = _render_defaults(defaults)
                    drop.update(span)
                    defaults_written = True
        kept = []
        for n, line in enumerate(lines):
            if n in replace:
                kept.append(replace[n])
            if n not in drop:
                kept.append(line)
        body = "\n".join(kept).strip("\n")
        doc = ast.get_docstring(mod.tree)
        title = f"{RULE}\n# {mod.name}" + (f": {doc.splitlines()[0]}" if doc else "")
        bodies.append(f"{title}\n{RULE}\n\n{body}\n")
    if defaults and not defaults_written:
        raise AssemblyError(f"variant defaults given but no module reached from {entry} defines {DEFAULTS_NAME}")
    bound_by_import: dict[str, str] = {}
    for text, bound in sorted(imports.items()):
        if bound in owners:
            raise AssemblyError(f"`{text}` binds {bound!r}, which {owners[bound]} also defines; rename one")
        if bound in bound_by_import and bound_by_import[bound] != text:
            raise AssemblyError(f"`{text}` and `{bound_by_import[bound]}` bind the same name {bound!r}")
        bound_by_import[bound] = text
    parts = [f'"""{header.strip()}\n"""']
    if future:
        parts.append("\n".join(f"from __future__ import {name}" for name in sorted(future)))
    plain = sorted(t for t in imports if t.startswith("import "))
    froms = sorted(t for t in imports if t.startswith("from "))
    parts.append("\n".join(plain + froms))
    source = "\n\n".join(parts) + "\n\n\n" + "\n\n".join(bodies)
    check_script(source)
    return source


def third_party_roots(source: str) -> set[str]:
    """Top-level packages the script imports that are not in the standard library."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            root = name.split(".")[0]
            if root not in sys.stdlib_module_names and root != "__future__":
                roots.add(root)
    return roots


def check_script(source: str) -> None:
    """The assembled script compiles and imports nothing local."""
    try:
        compile(source, "train_gpt.py", "exec")
    except SyntaxError as exc:
        raise AssemblyError(f"assembled script does not compile: line {exc.lineno}: {exc.msg}") from exc
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssemblyError(f"assembled script keeps a relative import at line {node.lineno}")
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any(n == PACKAGE or n.startswith(PACKAGE + ".") for n in names):
            raise AssemblyError(f"assembled script still imports {PACKAGE} at line {node.lineno}")
