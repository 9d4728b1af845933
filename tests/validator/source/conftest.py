"""Fixtures of the source-audit tests: a submission folder written from a dict of file names to contents."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from validator.findings import Finding


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[[dict[str, str | bytes]], Path]:
    def make(files: dict[str, str | bytes]) -> Path:
        folder = tmp_path / "2026-11-23_Synthetic"
        folder.mkdir(exist_ok=True)
        for name, content in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        return folder

    return make


def codes(findings: list[Finding], severity: str | None = None) -> set[str]:
    return {f.code for f in findings if severity is None or f.severity.value == severity}
