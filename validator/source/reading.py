"""Safe reading of files inside a submission folder: resolved, capped, never through a link that leaves it."""

from __future__ import annotations

import ast
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

# A real train_gpt.py is < 200 KB; anything past this is read no further.
MAX_SOURCE_BYTES = 4_000_000


class UnsafePath(Exception):
    """A path that leads outside the checked folder, is not a regular file, or cannot be read."""


def locate(folder: str | Path, script: str | Path) -> tuple[Path, Path]:
    """`folder` made absolute, and `script` as an absolute path inside it: an absolute script as it is; a relative
    one that starts with the folder as given (`records/x/train_gpt.py` for `records/x`) from the working
    directory; any other relative one (`train_gpt.py`) inside the folder. Never joins the folder twice."""
    given = Path(folder)
    root = Path(os.path.abspath(given))
    path = Path(script)
    if path.is_absolute():
        return root, path
    if given.parts and path.parts[: len(given.parts)] == given.parts and len(path.parts) > len(given.parts):
        return root, Path(os.path.abspath(path))
    return root, root / path


def relative_name(folder: Path, path: Path) -> str:
    """The path as the report shows it: relative to the folder where possible, never an absolute machine path."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        try:
            return path.resolve().relative_to(folder.resolve()).as_posix()
        except (ValueError, OSError):
            return path.name


def inside(folder: Path, path: Path) -> Path:
    """Resolve `path` (following every link) and return it if it stays inside `folder`, else raise UnsafePath."""
    try:
        root = folder.resolve(strict=True)
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UnsafePath(f"cannot resolve {path.name}: {exc.__class__.__name__}") from None
    if resolved != root and root not in resolved.parents:
        raise UnsafePath(f"{path.name} resolves outside the submission folder")
    return resolved


def read_bytes_capped(folder: Path, path: Path, cap: int = MAX_SOURCE_BYTES) -> tuple[bytes, bool]:
    """Bytes of a regular file inside `folder`, at most `cap` of them; the flag says whether it was cut."""
    resolved = inside(folder, path)
    if not resolved.is_file():
        raise UnsafePath(f"{path.name} is not a regular file")
    try:
        with resolved.open("rb") as handle:
            data = handle.read(cap + 1)
    except OSError as exc:
        raise UnsafePath(f"cannot read {path.name}: {exc.__class__.__name__}") from None
    return data[:cap], len(data) > cap


def file_size(folder: Path, path: Path) -> int:
    """Size in bytes of a regular file inside `folder` (0 when it is unsafe or missing)."""
    try:
        resolved = inside(folder, path)
        return resolved.stat().st_size if resolved.is_file() else 0
    except (UnsafePath, OSError):
        return 0


@dataclass(frozen=True)
class SourceUnit:
    """One piece of Python source to audit: a file of the folder, or a source decoded from a wrapper in one."""

    name: str  # where it came from, as reported: "train_gpt.py" or "train_gpt.py (decoded wrapper 1)"
    file: str  # the folder file that holds it (findings point here)
    text: str
    tree: ast.Module
    line_offset: int = 0  # for decoded sources: the line of the wrapper in `file`


def parse_source(text: str, filename: str) -> ast.Module:
    """ast.parse without the noise: SyntaxWarnings of odd escapes are silenced. Raises SyntaxError/ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(text, filename=filename)


def decode_text(data: bytes) -> tuple[str, bool]:
    """UTF-8 text of `data`; on invalid bytes, the text with replacements and False."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False
