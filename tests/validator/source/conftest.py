"""Fixtures of the source-audit tests: a submission folder written from a dict of file names to contents.
Also registers the synthetic scripts of scripts.py as the module `source_audit_scripts` (pytest runs in importlib
mode, so test modules cannot import their siblings by file name)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("source_audit_scripts", Path(__file__).with_name("scripts.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
sys.modules["source_audit_scripts"] = _module


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


@pytest.fixture(autouse=True)
def private_codebytes_cache(tmp_path, monkeypatch):
    """Keep the on-disk cache of wrapped sizes inside each test's temporary folder."""
    from validator.source.codebytes import wrapped_size

    monkeypatch.setenv("SSM_GOLF_CACHE", str(tmp_path / "codebytes-cache"))
    wrapped_size.cache_clear()
