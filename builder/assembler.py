"""Inline templates/ modules into one self-contained train_gpt.py that reads like a training script.

Starting from a variant's entry module and the parts it names (mixers, features, codecs), follows
`from templates.<module> import name` statements and keeps only the modules reached. Orders them for reading
(hyperparameters, declaration, data, layers and mixers, model, optimisers, export, evaluation, training) while
each still comes after what it imports; leaves out top-level functions and classes nothing uses; gathers the
imports into one sorted block; refuses two modules binding the same top-level name; writes the variant's
defaults into VARIANT_DEFAULTS; puts a banner with the module's own description above each section; and checks the
result: it compiles, imports nothing local, and the same inputs give the same bytes.
"""

from __future__ import annotations

import ast
import json
import sys
import textwrap
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


# sections in reading order: a module takes the place of the first prefix it matches (dependencies still first)
READING_ORDER = (
    "templates.hparams",
    "templates.config",
    "templates.registry",
    "templates.data",
    "templates.bpb",
    "templates.layers",
    "templates.scan",
    "templates.mixers",
    "templates.features",
    "templates.model",
    "templates.optim",
    "templates.quant",
    "templates.quant_ternary",
    "templates.export",
    "templates.brotli_codec",
    "templates.gptq",
    "templates.evaluate",
    "templates.ttt",
    "templates.train",
)


def _reading_rank(name: str) -> int:
    for i, prefix in enumerate(READING_ORDER):
        if name == prefix or name.startswith(prefix + "."):
            return i
    return len(READING_ORDER)


def collect_modules(root: Path, entries: str | list[str]) -> list[Module]:
    """The modules reached from `entries`, each after what it imports, otherwise in reading order; cycles refused."""
    roots = [entries] if isinstance(entries, str) else list(entries)
    loaded: dict[str, Module] = {}
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in loaded and name not in visiting:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name) :] + [name])
            raise AssemblyError(f"import cycle between templates: {cycle}")
        visiting.append(name)
        mod = _load(root, name)
        loaded[name] = mod
        for dep in mod.local_deps:
            visit(dep)
        visiting.pop()

    for entry in roots:
        visit(entry)
    order: list[str] = []
    waiting = dict(loaded)
    while waiting:
        ready = [n for n, m in waiting.items() if all(d in order for d in m.local_deps)]
        pick = min(ready, key=lambda n: (_reading_rank(n), n))
        order.append(pick)
        del waiting[pick]
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


def _statement_span(stmt: ast.stmt) -> range:
    """0-based lines of a top-level statement, decorators included."""
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return range(first - 1, stmt.end_lineno or stmt.lineno)


def _loaded_names(nodes: list[ast.stmt]) -> set[str]:
    return {n.id for stmt in nodes for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _unused_definitions(statements: list[ast.stmt], keep: set[str]) -> set[int]:
    """ids of top-level function and class definitions that nothing kept refers to (decorated ones register
    themselves, so they stay)."""
    defs = [s for s in statements if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    live = {id(s) for s in defs if s.decorator_list or s.name in keep}
    while True:
        kept = [s for s in statements if id(s) in live or s not in defs]
        used = _loaded_names(kept)
        grown = live | {id(d) for d in defs if d.name in used}
        if grown == live:
            return {id(d) for d in defs} - live
        live = grown


def _import_lines(imports: dict[tuple[str, str | None, str | None], str]) -> list[str]:
    """isort-style block: standard library, then third party; plain imports before from-imports; one from-import
    per module with its names ordered constants, classes, others."""

    def member_key(name: str) -> tuple[int, str]:
        kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
        return kind, name.lower()

    sections: list[list[str]] = []
    for stdlib in (True, False):
        plain, froms = [], {}
        for module, name, alias in imports:
            if (module.split(".")[0] in sys.stdlib_module_names) != stdlib:
                continue
            if name is None:
                plain.append((module.lower(), f"import {module}" + (f" as {alias}" if alias else "")))
            else:
                froms.setdefault(module, []).append(name + (f" as {alias}" if alias else ""))
        lines = [text for _, text in sorted(plain)]
        for module in sorted(froms, key=str.lower):
            names = sorted(set(froms[module]), key=member_key)
            one = f"from {module} import {', '.join(names)}"
            if len(one) <= 120:
                lines.append(one)
            else:
                lines.append(f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")")
        if lines:
            sections.append(lines)
    return ["\n".join(sec) for sec in sections]


def _banner(mod: Module) -> str:
    doc = ast.get_docstring(mod.tree) or mod.name
    lines = [f"# {line}".rstrip() for line in doc.splitlines()]
    return "\n".join([RULE, *lines, RULE])


def assemble_source(root: Path, entry: str | list[str], defaults: dict[str, str], header: str) -> str:
    """One script from the templates under `root` (the folder holding the `templates` package).

    `entry` is the module with the main block, or a list of it followed by the parts the variant names."""
    entries = [entry] if isinstance(entry, str) else list(entry)
    modules = collect_modules(root, entries)
    future: set[str] = set()
    imports: dict[tuple[str, str | None, str | None], str] = {}  # (module, name or None, alias) -> bound name
    owners: dict[str, str] = {}  # top-level name -> module that binds it
    kept_statements: list[tuple[Module, ast.stmt]] = []
    defaults_written = False
    for mod in modules:
        for i, stmt in enumerate(mod.tree.body):
            if i == 0 and _is_docstring(stmt):
                continue
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                future.update(a.name for a in stmt.names)
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith(PACKAGE + "."):
                continue
            elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for alias in stmt.names:
                    if isinstance(stmt, ast.Import):
                        key = (alias.name, None, alias.asname)
                        bound = alias.asname or alias.name.split(".")[0]
                    else:
                        key = (stmt.module or "", alias.name, alias.asname)
                        bound = alias.asname or alias.name
                    clash = [k for k, b in imports.items() if b == bound and k != key]
                    both_plain = key[1] is None and key[2] is None and all(k[1] is None and not k[2] for k in clash)
                    if clash and not both_plain:
                        raise AssemblyError(f"{mod.path}:{stmt.lineno}: {bound!r} is imported in two different ways")
                    imports[key] = bound
            elif _is_main_guard(stmt) and mod.name != entries[0]:
                raise AssemblyError(f"{mod.path}:{stmt.lineno}: only the entry module may have a __main__ block")
            else:
                for name in _bound_names(stmt):
                    if name in owners and owners[name] != mod.name:
                        raise AssemblyError(
                            f"top-level name {name!r} is bound in both {owners[name]} and {mod.name}; rename one"
                        )
                    owners[name] = mod.name
                kept_statements.append((mod, stmt))
    # what the entry modules define themselves is kept (main, or the API of a library-style entry)
    keep = {n for m, st in kept_statements if m.name in entries for n in _bound_names(st)}
    unused = _unused_definitions([s for _, s in kept_statements], keep=keep)
    bodies: list[str] = []
    for mod in modules:
        lines = mod.source.splitlines()
        mine = [s for m, s in kept_statements if m is mod and id(s) not in unused]
        if not mine:
            continue
        chunks: list[str] = []
        for stmt in mine:
            span = _statement_span(stmt)
            start = span.start
            while start > 0 and lines[start - 1].lstrip().startswith("#"):
                start -= 1  # the comment lines right above a statement belong to it
            if _bound_names(stmt) == [DEFAULTS_NAME]:
                text = _render_defaults(defaults)
                defaults_written = True
            else:
                text = "\n".join(lines[start : span.stop])
            compound = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.Try))
            chunks.append(("\n\n\n" if compound or (chunks and chunks[-1].startswith("\n\n\n")) else "\n") + text)
        body = "".join(chunks).strip("\n")
        gap = "\n\n\n" if chunks[0].startswith("\n\n\n") else "\n\n"
        bodies.append(f"{_banner(mod)}{gap}{body}\n")
    if defaults and not defaults_written:
        raise AssemblyError(f"variant defaults given but no module reached from {entries[0]} defines {DEFAULTS_NAME}")
    for (module, name, _), bound in sorted(imports.items(), key=lambda kv: kv[1]):
        if bound in owners:
            what = f"from {module} import {name}" if name else f"import {module}"
            raise AssemblyError(f"`{what}` binds {bound!r}, which {owners[bound]} also defines; rename one")
    wrapped = "\n".join(textwrap.fill(p, 116) if p else "" for p in header.strip().split("\n"))
    parts = [f'"""{wrapped}\n"""']
    if future:
        parts.append("\n".join(f"from __future__ import {name}" for name in sorted(future)))
    parts.extend(_import_lines(imports))
    source = "\n\n".join(parts) + "\n\n" + "\n\n".join(bodies)
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
