"""No false positive on ssm-golf's own code: the template modules, joined into one script the way the assembler
joins them (local imports dropped), pass the audit without errors, and their byte table is canonical."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from validator.source.audit import audit_source


def _joined_templates(repo_root: Path) -> str:
    modules = sorted((repo_root / "templates").rglob("*.py"))
    if not modules:
        pytest.skip("no templates in this checkout")
    parts = []
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        tree.body = [
            stmt
            for stmt in tree.body
            if not (isinstance(stmt, ast.ImportFrom) and (stmt.module or "").startswith("templates"))
            and not (isinstance(stmt, ast.Import) and any(a.name.startswith("templates") for a in stmt.names))
        ]
        parts.append(ast.unparse(tree))
    return "\n\n".join(parts) + "\n\nif __name__ == '__main__':\n    main()\n"


def test_own_templates_have_no_errors(repo_root, tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text(_joined_templates(repo_root), encoding="utf-8")
    findings = audit_source(tmp_path, script)
    errors = [f"{f.code}: {f.message}" for f in findings if f.severity.value == "error"]
    assert errors == []
    assert not [f for f in findings if f.code.startswith("LUT_") and f.severity.value != "note"]
