"""Atomic file output: write under a temporary name beside the target, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_link_or_copy(source: Path, destination: Path) -> None:
    """Place `source` at `destination` (hard link where possible, else a copy), atomically."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    tmp_path.unlink(missing_ok=True)
    try:
        try:
            os.link(Path(source).resolve(), tmp_path)
        except OSError:
            shutil.copyfile(source, tmp_path)
        os.replace(tmp_path, destination)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def make_staging_dir(parent: Path, name: str) -> Path:
    """A fresh, empty folder inside `parent` to build an output in before it is swapped into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=parent))
    os.chmod(staged, DIR_MODE)
    return staged


def replace_dir(staged: Path, target: Path) -> None:
    """Swap the folder `staged` in as `target`; an older `target` is moved aside first and then removed."""
    staged, target = Path(staged), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
