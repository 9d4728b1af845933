"""Report files: written atomically (temporary name, then rename), and checked before any work is done, so that a
path that cannot be written is one line on stderr and exit status 2, never a traceback or a half-written file."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


class OutputError(Exception):
    """A report path that cannot be written; the message is one line naming the path and the fix."""


def _problem(dest: str, what: str, exc: OSError | None = None, reason: str | None = None) -> OutputError:
    why = reason or (exc.strerror if exc is not None and exc.strerror else str(exc))
    return OutputError(f"cannot write the {what} to {dest}: {why}; pass a writable file path")


def check_writable(dest: str | Path | None, what: str = "report") -> None:
    """Raise OutputError unless `dest` ('-' is stdout) can be written: not a directory, its folder creatable and
    writable. Creates the missing parent folders, as the write itself would."""
    if dest is None or str(dest) == "-":
        return
    target = Path(dest)
    if target.is_dir():
        raise _problem(str(dest), what, reason="it is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".probe")
    except OSError as exc:
        raise _problem(str(dest), what, exc) from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def write_output(dest: str | Path, text: str, what: str = "report") -> None:
    """Write to stdout ('-') or atomically to a file; raise OutputError (one line) when it cannot be written."""
    if str(dest) == "-":
        sys.stdout.write(text)
        return
    check_writable(dest, what)
    target = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _problem(str(dest), what, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
