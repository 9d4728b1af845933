"""Safe reading of a submission folder: lists regular files only, never follows a symlink, caps sizes and counts.

Everything the checks read goes through `SubmissionFolder`, so no check can read outside the folder: symlinks are
reported and skipped (an escape is an error), files are opened with O_NOFOLLOW and re-checked with fstat, names
that are not valid UTF-8 are reported by their `ascii()` form and skipped, and oversized files are read as
head + tail so that a log's final lines still parse.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from validator.findings import Finding, error, note, warning

MAX_FILES = 5000
MAX_DEPTH = 8
READ_CAP_BYTES = 32 * 1024 * 1024  # per file; larger files are read as head + tail


@dataclass
class SubmissionFolder:
    """The regular files of one folder (relative POSIX names -> sizes) and what was refused while listing it."""

    root: Path
    files: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    def top_level(self) -> list[str]:
        return sorted(f for f in self.files if "/" not in f)

    def read_bytes(self, rel: str, cap: int | None = None) -> bytes | None:
        """The file's bytes (head + tail beyond `cap`), or None if it is not a listed regular file."""
        cap = READ_CAP_BYTES if cap is None else cap
        if rel not in self.files:
            return None
        path = self.root.joinpath(*rel.split("/"))
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            with os.fdopen(fd, "rb", closefd=False) as fh:
                if st.st_size <= cap:
                    return fh.read(cap + 1)[:cap]
                half = cap // 2
                head = fh.read(half)
                fh.seek(max(st.st_size - half, half))
                return head + b"\n" + fh.read(half)
        except OSError:
            return None
        finally:
            os.close(fd)

    def read_text(self, rel: str, cap: int | None = None) -> str | None:
        data = self.read_bytes(rel, cap)
        return None if data is None else data.decode("utf-8", errors="replace")


def _valid_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 32 for c in name)


def open_folder(path: str | Path) -> SubmissionFolder:
    """List a folder safely. Raises NotADirectoryError / FileNotFoundError when `path` is not a directory."""
    root = Path(os.path.abspath(path))  # `.` and relative paths: the real name, and no path joined twice
    if root.is_symlink():
        raise NotADirectoryError(f"{path}: the submission folder itself is a symlink; pass the real folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{path}: not a directory; pass a records folder (records/<track>/<date>_<name>)")
    real_root = root.resolve()
    folder = SubmissionFolder(root=root)
    pending: list[tuple[Path, str, int]] = [(root, "", 0)]
    while pending:
        directory, prefix, depth = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            folder.findings.append(warning("UNREADABLE_DIR", f"cannot list {prefix or '.'}: {exc.strerror}", prefix))
            continue
        for entry in entries:
            rel = prefix + entry.name
            if not _valid_name(entry.name):
                folder.findings.append(
                    warning(
                        "NAME_NOT_UTF8", f"file name {ascii(entry.name)} is not valid UTF-8 text; skipped; rename it"
                    )
                )
                continue
            if entry.is_symlink():
                try:
                    target = Path(os.path.realpath(entry.path))
                    inside = target == real_root or real_root in target.parents
                except (OSError, RuntimeError):
                    inside = False
                if inside:
                    folder.findings.append(note("SYMLINK", "symlink inside the folder; not followed", rel))
                else:
                    folder.findings.append(
                        error(
                            "SYMLINK_OUTSIDE_FOLDER",
                            "symlink points outside the folder; not read; commit the file",
                            rel,
                        )
                    )
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.name in {".git", "__pycache__"}:
                    continue
                if depth + 1 >= MAX_DEPTH:
                    folder.findings.append(warning("TREE_TOO_DEEP", f"deeper than {MAX_DEPTH} levels; not listed", rel))
                    continue
                pending.append((Path(entry.path), rel + "/", depth + 1))
            elif stat.S_ISREG(st.st_mode):
                if len(folder.files) >= MAX_FILES:
                    folder.findings.append(warning("TOO_MANY_FILES", f"more than {MAX_FILES} files; the rest skipped"))
                    return folder
                folder.files[rel] = st.st_size
                if st.st_size > READ_CAP_BYTES:
                    folder.findings.append(
                        note("FILE_LARGE", f"{st.st_size:,} bytes; only head and tail are read", rel)
                    )
            else:
                folder.findings.append(note("SPECIAL_FILE", "not a regular file; skipped", rel))
    return folder
