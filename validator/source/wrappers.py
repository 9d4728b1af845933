"""Self-extracting wrappers (`exec(lzma.decompress(base64.b85decode(b"...")))`): found in the AST, decoded from
their literals with bounded decompressors, never executed.

Supported steps: lzma, zlib, gzip, bz2, brotli decompression; base85/ascii85/base64/base32/base16/hex decoding
(`base64`, `binascii`, `codecs`, `bytes.fromhex`); `.decode()`/`.encode()`/`str(b, enc)`; `compile(src, ...)`.
The literal may be inline, a module-level name bound to a literal, or a concatenation of literals.
"""

from __future__ import annotations

import ast
import base64
import binascii
import bz2
import codecs
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass

MAX_DECODED_BYTES = 20_000_000  # a decoded script larger than this is refused, not expanded
MAX_DEPTH = 4  # nested wrappers followed at most this deep (audit side)


class DecodeError(Exception):
    """A wrapper whose payload could not be decoded statically."""


def _bounded(decompressor, decompress: Callable[[bytes, int], bytes], finished: Callable[[], bool], data: bytes):
    out = decompress(data, MAX_DECODED_BYTES + 1)
    if len(out) > MAX_DECODED_BYTES:
        raise DecodeError(f"decoded payload exceeds {MAX_DECODED_BYTES} bytes")
    if not finished():
        raise DecodeError(f"{type(decompressor).__name__}: payload truncated or corrupt")
    return out


def _lzma(data: bytes, format: int = lzma.FORMAT_AUTO, filters: list | None = None) -> bytes:
    d = lzma.LZMADecompressor(format, None, filters)
    return _bounded(d, lambda x, n: d.decompress(x, max_length=n), lambda: d.eof, data)


def _zlib(data: bytes, wbits: int = zlib.MAX_WBITS) -> bytes:
    d = zlib.decompressobj(wbits)
    return _bounded(d, d.decompress, lambda: d.eof, data)


def _bz2(data: bytes) -> bytes:
    d = bz2.BZ2Decompressor()
    return _bounded(d, lambda x, n: d.decompress(x, max_length=n), lambda: d.eof, data)


def _brotli(data: bytes) -> bytes:
    import brotli

    d = brotli.Decompressor()
    return _bounded(d, lambda x, n: d.process(x, output_buffer_limit=n), d.is_finished, data)


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


# name of the final attribute or function -> transform of bytes
_DECOMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "lzma.decompress": _lzma,
    "zlib.decompress": _zlib,
    "gzip.decompress": lambda d: _zlib(d, 16 + zlib.MAX_WBITS),
    "bz2.decompress": _bz2,
    "brotli.decompress": _brotli,
}
# every decoding function of base64 and binascii a wrapper may call, by dotted name
_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    **{
        f"base64.{fn}": getattr(base64, fn)
        for fn in ("b85decode", "a85decode", "b64decode", "standard_b64decode", "urlsafe_b64decode")
        + ("decodebytes", "b32decode", "b16decode")
    },
    **{f"binascii.{fn}": getattr(binascii, fn) for fn in ("a2b_base64", "unhexlify", "a2b_hex")},
}
_CODECS = {
    "base64": base64.b64decode,
    "base_64": base64.b64decode,
    "zlib": _zlib,
    "zip": _zlib,
    "bz2": _bz2,
    "hex": binascii.unhexlify,
}
TRANSFORMS = {**_DECOMPRESSORS, **_DECODERS}
_SHORT_NAMES = {name.rsplit(".", 1)[1] for name in TRANSFORMS} - {"decompress"}


@dataclass(frozen=True)
class Wrapper:
    """One exec/eval of a decoded payload found in a source."""

    line: int
    steps: tuple[str, ...]  # transforms applied, innermost first, e.g. ("base64.b85decode", "lzma.decompress")
    encoded_bytes: int  # size of the literal payload
    source: str | None  # the decoded text, None when it could not be decoded
    error: str | None = None


def import_aliases(tree: ast.AST, nodes: list[ast.AST] | None = None) -> dict[str, str]:
    """Local name -> dotted origin for every import in the tree (`import lzma as L` gives L -> lzma)."""
    aliases: dict[str, str] = {}
    for node in nodes if nodes is not None else ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def dotted_name(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`L.decompress` -> "lzma.decompress" given the aliases; None for anything not a plain dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def module_literals(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level names bound exactly once, to the expression they are bound to."""
    bound: dict[str, ast.expr] = {}
    seen: set[str] = set()
    for stmt in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        for target in targets:
            if isinstance(target, ast.Name):
                if target.id in seen:
                    bound.pop(target.id, None)
                else:
                    bound[target.id] = value
                seen.add(target.id)
    return bound


class _Evaluator:
    def __init__(self, tree: ast.Module):
        self.aliases = import_aliases(tree)
        self.literals = module_literals(tree)
        self.steps: list[str] = []
        self.payload_bytes = 0

    def value(self, node: ast.AST, depth: int = 0) -> bytes | str:
        if depth > 40:
            raise DecodeError("expression too deep")
        if isinstance(node, ast.Constant) and isinstance(node.value, (bytes, str)):
            self.payload_bytes = max(self.payload_bytes, len(node.value))
            return node.value
        if isinstance(node, ast.Name) and node.id in self.literals:
            return self.value(self.literals[node.id], depth + 1)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.value(node.left, depth + 1), self.value(node.right, depth + 1)
            if type(left) is not type(right):
                raise DecodeError("mixed str/bytes concatenation")
            return left + right
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise DecodeError(f"payload is not a literal ({type(node).__name__} at line {getattr(node, 'lineno', '?')})")

    def option(self, node: ast.AST):
        """A literal keyword value of lzma.decompress: constants, lists, dicts, `lzma.FORMAT_RAW`-style names."""
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.option(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {self.option(k): self.option(v) for k, v in zip(node.keys, node.values) if k is not None}
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.option(node.left) | self.option(node.right)
        name = dotted_name(node, self.aliases) or ""
        module, _, attr = name.rpartition(".")
        if module == "lzma" and attr.isupper() and hasattr(lzma, attr):
            return getattr(lzma, attr)
        raise DecodeError(f"lzma option {name or type(node).__name__} is not a literal")

    def _call(self, node: ast.Call, depth: int) -> bytes | str:
        func = node.func
        name = dotted_name(func, self.aliases) or ""
        special = ("codecs.decode", "codecs.encode", "bytes.fromhex")
        if (
            isinstance(func, ast.Attribute)
            and func.attr in ("decode", "encode")
            and name not in (*TRANSFORMS, *special)
        ):
            inner = self.value(func.value, depth + 1)
            if func.attr == "decode" and len(node.args) >= 2 and not isinstance(inner, str):
                pass  # codecs-style obj.decode(x, "codec") is handled below
            else:
                encoding = _const_str(node.args[0]) if node.args else "utf-8"
                if func.attr == "decode":
                    return self._codec_decode(_as_bytes(inner), encoding or "utf-8", as_text=True)
                return inner.encode(encoding or "utf-8") if isinstance(inner, str) else inner
        if name in ("compile", "builtins.compile") and node.args:
            return self.value(node.args[0], depth + 1)
        if name in ("str", "builtins.str") and len(node.args) >= 2:
            return _as_bytes(self.value(node.args[0], depth + 1)).decode(_const_str(node.args[1]) or "utf-8")
        if name in ("bytes.fromhex",) and node.args:
            return bytes.fromhex(str(self.value(node.args[0], depth + 1)))
        if name in ("codecs.decode",) and len(node.args) >= 2:
            data = self.value(node.args[0], depth + 1)
            return self._codec_decode(_as_bytes(data), _const_str(node.args[1]) or "", as_text=False)
        transform = TRANSFORMS.get(name)
        if transform is None and isinstance(func, (ast.Attribute, ast.Name)):
            short = func.attr if isinstance(func, ast.Attribute) else func.id
            candidates = [key for key in TRANSFORMS if key.endswith("." + short)]
            if short in _SHORT_NAMES and len(candidates) == 1:
                name, transform = candidates[0], TRANSFORMS[candidates[0]]
        if transform is None or not node.args:
            raise DecodeError(f"unknown step {name or type(func).__name__}() at line {node.lineno}")
        data = _as_bytes(self.value(node.args[0], depth + 1))
        options = {k.arg: self.option(k.value) for k in node.keywords if k.arg in ("format", "filters")}
        try:
            out = transform(data, **options) if options and name == "lzma.decompress" else transform(data)
        except DecodeError:
            raise
        except Exception as exc:  # every decoder signals bad input its own way
            raise DecodeError(f"{name} failed: {exc.__class__.__name__}") from None
        self.steps.append(name)
        return out

    def _codec_decode(self, data: bytes, codec: str, as_text: bool) -> bytes | str:
        codec_key = codec.lower().replace("-", "_")
        if codec_key in _CODECS:
            try:
                out = _CODECS[codec_key](data)
            except DecodeError:
                raise
            except Exception as exc:
                raise DecodeError(f"codec {codec} failed: {exc.__class__.__name__}") from None
            self.steps.append(f"codecs:{codec_key}")
            return out
        try:
            codecs.lookup(codec)
            return data.decode(codec)
        except (LookupError, UnicodeDecodeError, TypeError) as exc:
            if as_text:
                raise DecodeError(f"cannot decode payload as {codec}: {exc.__class__.__name__}") from None
            raise DecodeError(f"unsupported codec {codec}") from None


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _contains_transform(node: ast.AST, aliases: dict[str, str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            name = dotted_name(sub.func, aliases) or ""
            short = name.rsplit(".", 1)[-1]
            if name in TRANSFORMS or short in _SHORT_NAMES or short in ("decompress", "loads"):
                return True
    return False


def _is_exec_call(node: ast.Call, aliases: dict[str, str]) -> bool:
    name = dotted_name(node.func, aliases)
    return name in ("exec", "eval", "builtins.exec", "builtins.eval") and bool(node.args)


def find_wrappers(tree: ast.Module) -> list[Wrapper]:
    """Every exec/eval whose argument goes through a decompressor or decoder, decoded where it can be."""
    aliases = import_aliases(tree)
    found: list[Wrapper] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _is_exec_call(node, aliases)):
            continue
        arg = node.args[0]
        if not _contains_transform(arg, aliases) and not _names_wrapped_literal(arg, tree, aliases):
            continue
        evaluator = _Evaluator(tree)
        try:
            decoded = evaluator.value(arg)
            text = decoded if isinstance(decoded, str) else decoded.decode("utf-8")
            found.append(Wrapper(node.lineno, tuple(evaluator.steps), evaluator.payload_bytes, text))
        except (DecodeError, UnicodeDecodeError, ValueError, TypeError, RecursionError, MemoryError) as exc:
            message = str(exc) if isinstance(exc, DecodeError) else f"payload not UTF-8 text ({exc.__class__.__name__})"
            found.append(Wrapper(node.lineno, tuple(evaluator.steps), evaluator.payload_bytes, None, message))
    return found


def _names_wrapped_literal(arg: ast.expr, tree: ast.Module, aliases: dict[str, str]) -> bool:
    """exec(code) where `code` is bound at module level to a decoding expression."""
    if isinstance(arg, ast.Name):
        bound = module_literals(tree).get(arg.id)
        return bound is not None and _contains_transform(bound, aliases)
    return False


def build_wrapper(minified: bytes) -> bytes:
    """The lzma + base85 self-extracting wrapper for already-minified source bytes (the code-bytes convention)."""
    return WRAPPER_PREFIX + base64.b85encode(lzma.compress(minified)) + WRAPPER_SUFFIX


# The wrapper text of the convention (upstream records 2026-04-10 onwards compute exactly this at runtime):
WRAPPER_PREFIX = b'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("'
WRAPPER_SUFFIX = b'")))\n'
