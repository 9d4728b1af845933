"""Code bytes of a submission, three ways, so a check can tell which counting convention its logs used.

- `raw`: bytes of the committed script (what the upstream README counts: "all counted code in train_gpt.py").
- `wrapped`: bytes of the deterministic self-extracting wrapper of the script, the convention that every upstream
  record from 2026-04-10 on computes at run time ("Code size (compressed)"):
  1. minify the script's text with python-minifier **3.4.0** (`python_minifier.minify`) with the options of the
     `pyminify --no-rename-locals --no-hoist-literals --remove-literal-statements` command line, every other
     option at its default;
  2. compress the UTF-8 bytes with `lzma.compress` (xz container, preset 6, the defaults);
  3. encode with `base64.b85encode` and wrap as the two lines
     `import lzma as L,base64 as B` / `exec(L.decompress(B.b85decode("<payload>")))` plus a final newline.
  A script that is itself a wrapper is measured from its decoded source (`decoded` holds that size).
- `with_modules`: `raw` plus the bytes of every local file the script imports, execs or loads (transitively).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import lzma
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from validator.source.modules import local_closure
from validator.source.reading import (
    UnsafePath,
    decode_text,
    file_size,
    locate,
    parse_source,
    read_bytes_capped,
)
from validator.source.wrappers import WRAPPER_PREFIX, WRAPPER_SUFFIX, find_wrappers

PINNED_MINIFIER = "3.4.0"
MINIFY_OPTIONS = {"rename_locals": False, "hoist_literals": False, "remove_literal_statements": True}


@dataclass(frozen=True)
class CodeBytes:
    raw: int
    wrapped: int | None  # None when the source cannot be minified (syntax error) or the minifier is missing
    with_modules: int
    local_modules: list[str]
    minifier_version: str  # python-minifier's version that produced `wrapped` ("" when not installed)
    decoded: int | None = None  # bytes of the decoded source when the script is itself a wrapper
    problems: list[str] = field(default_factory=list)  # why a figure is missing or not comparable

    @property
    def minifier_pinned(self) -> bool:
        return self.minifier_version == PINNED_MINIFIER

    def to_dict(self) -> dict:
        return {
            "raw": self.raw,
            "wrapped": self.wrapped,
            "with_modules": self.with_modules,
            "local_modules": list(self.local_modules),
            "minifier_version": self.minifier_version,
            "decoded": self.decoded,
            "problems": list(self.problems),
        }


def minifier_version() -> str:
    try:
        return importlib.metadata.version("python-minifier")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cache_dir() -> Path | None:
    """Where wrapped sizes are remembered between runs ($SSM_GOLF_CACHE, else ~/.cache/ssm-golf); None: off."""
    base = os.environ.get("SSM_GOLF_CACHE")
    if base == "":
        return None
    return Path(base) if base else Path.home() / ".cache" / "ssm-golf"


def _cache_key(source: str) -> str:
    options = ",".join(f"{k}={v}" for k, v in sorted(MINIFY_OPTIONS.items()))
    payload = f"{minifier_version()}|{options}|{WRAPPER_PREFIX!r}|{WRAPPER_SUFFIX!r}|".encode() + source.encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def _cached(key: str) -> int | None:
    directory = _cache_dir()
    if directory is None:
        return None
    try:
        return int((directory / "wrapped" / key).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def _remember(key: str, size: int) -> None:
    directory = _cache_dir()
    if directory is None:
        return
    try:
        target = directory / "wrapped"
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target, delete=False, encoding="ascii") as handle:
            handle.write(str(size))
        os.replace(handle.name, target / key)
    except OSError:
        pass  # a cache that cannot be written only costs time


@lru_cache(maxsize=256)
def wrapped_size(source: str) -> int:
    """Length of the convention's wrapper around `source`. Minifying 150 KB takes most of a second, so results are
    also kept on disk keyed by sha256 of (minifier version, options, wrapper text, source)."""
    key = _cache_key(source)
    cached = _cached(key)
    if cached is not None:
        return cached
    import python_minifier

    minified = python_minifier.minify(source, **MINIFY_OPTIONS).encode("utf-8")
    payload = lzma.compress(minified)
    # b85 turns every 4 bytes (a padded last group) into 5 characters, exactly as base64.b85encode does
    encoded_len = (len(payload) // 4) * 5 + (len(payload) % 4 + 1 if len(payload) % 4 else 0)
    size = len(WRAPPER_PREFIX) + encoded_len + len(WRAPPER_SUFFIX)
    _remember(key, size)
    return size


def code_bytes(folder: Path, script: Path, wrap: bool = True) -> CodeBytes:
    """The three code-byte figures of `script` (a file inside `folder`). Raises UnsafePath for a script that is
    missing, not a regular file, or outside the folder; everything else is reported in `problems`. wrap=False
    leaves the wrapped figure out (None): it needs the minifier, most of a second on a large script."""
    folder, script = locate(folder, script)
    data, truncated = read_bytes_capped(folder, script)
    raw = file_size(folder, script)
    problems: list[str] = []
    version = minifier_version()
    if wrap and not version:
        problems.append("python-minifier is not installed: install python-minifier==3.4.0 for the wrapped figure")
    elif wrap and version != PINNED_MINIFIER:
        problems.append(f"python-minifier {version} is not the pinned {PINNED_MINIFIER}: wrapped bytes may differ")
    if truncated:
        problems.append(f"script larger than the read cap ({len(data)} bytes read); wrapped figure not computed")
    text, utf8 = decode_text(data)
    if not utf8:
        problems.append("script is not valid UTF-8")
    tree = None
    decoded = None
    decoded_trees: list = []
    source_for_wrap = text
    try:
        tree = parse_source(text, script.name)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        problems.append(f"script does not parse ({exc.__class__.__name__}); wrapped figure not computed")
    if tree is not None:
        wrappers = [w for w in find_wrappers(tree) if w.source is not None]
        for wrapper in wrappers:
            try:
                decoded_trees.append(parse_source(wrapper.source or "", script.name))
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                problems.append(f"a wrapper payload of {script.name} does not parse; its local imports are unknown")
        if wrappers and len(tree.body) <= 6:  # the whole script is a launcher around one payload
            source_for_wrap = max(wrappers, key=lambda w: len(w.source or "")).source or text
            decoded = len(source_for_wrap.encode("utf-8"))
    wrapped = None
    if wrap and tree is not None and version and not truncated and utf8:
        try:
            wrapped = wrapped_size(source_for_wrap)
        except Exception as exc:  # the minifier raises its own errors on sources it cannot handle
            problems.append(f"python-minifier failed ({exc.__class__.__name__}); wrapped figure not computed")
    modules: list[str] = []
    extra = 0
    try:
        closure = local_closure(folder, script, tree, tuple(decoded_trees))
        modules = closure.paths
        extra = sum(file_size(folder, folder / rel) for rel in modules)
        for bad in closure.unsafe:
            problems.append(f"{bad.name} (referenced by {bad.source}:{bad.line}) not counted: {bad.reason}")
    except UnsafePath as exc:
        problems.append(str(exc))
    return CodeBytes(raw, wrapped, raw + extra, modules, version, decoded, problems)
