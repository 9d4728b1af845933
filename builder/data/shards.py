"""Token shards in the challenge format: write, read back and validate.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, token count, then zeros) followed by
the tokens as little-endian uint16, so its size is exactly 1024 + 2 * count bytes. Files are named
`fineweb_{train,val}_NNNNNN.bin`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from builder.cli import UserError
from builder.data.files import atomic_write_bytes

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2
MAX_TOKENS = 2**31 - 1
SPLITS = ("train", "val")


class ShardError(UserError):
    """A shard file is not in the challenge format; the message names the file."""


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` of `split` ('train' or 'val')."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"fineweb_{split}_{index:06d}.bin"


def encode_shard(tokens: np.ndarray | Iterable[int]) -> bytes:
    """The bytes of a shard holding `tokens` (each in [0, 65535])."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {array.shape}")
    if array.size > MAX_TOKENS:
        raise ValueError(f"{array.size} tokens do not fit one shard (at most {MAX_TOKENS})")
    if array.dtype != np.uint16:
        if array.size and (int(array.min()) < 0 or int(array.max()) >= 2**16):
            raise ValueError("token ids must lie in [0, 65535] to be stored as uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, array.size
    return header.tobytes() + array.astype("<u2", copy=False).tobytes()


def write_shard(path: Path, tokens: np.ndarray | Iterable[int]) -> None:
    """Write one shard atomically (temporary name, then rename)."""
    atomic_write_bytes(Path(path), encode_shard(tokens))


def read_header(path: Path) -> int:
    """Check the header and the file size of a shard; return its token count. Raises ShardError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found; check the dataset folder (DATA_PATH)")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: short file ({size} bytes, the header alone is {HEADER_BYTES}); the shard is truncated, "
            "make or download it again"
        )
    with path.open("rb") as handle:
        header = np.frombuffer(handle.read(HEADER_BYTES), dtype="<i4")
    if int(header[0]) != MAGIC:
        raise ShardError(
            f"{path}: bad magic {int(header[0])} (expected {MAGIC}); this is not a challenge shard, "
            "make it with `builder data`"
        )
    if int(header[1]) != VERSION:
        raise ShardError(f"{path}: unsupported version {int(header[1])} (expected {VERSION}); re-export the shard")
    count = int(header[2])
    expected = HEADER_BYTES + TOKEN_BYTES * count
    if count < 0 or size != expected:
        raise ShardError(
            f"{path}: wrong size {size} bytes for {count} tokens (expected {expected}); "
            "the shard is truncated or corrupt, make or download it again"
        )
    return count


def read_shard(path: Path) -> np.ndarray:
    """The tokens of a shard as a uint16 array, after the header and size checks."""
    count = read_header(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)


def validate_shard(path: Path, vocab_size: int | None = None) -> int:
    """Check a shard completely (header, size, and every id below `vocab_size` when given); return its count."""
    count = read_header(path)
    if vocab_size is not None and count:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
        top = int(tokens.max())
        if top >= vocab_size:
            raise ShardError(
                f"{path}: token id {top} is outside the vocabulary of {vocab_size}; "
                "the shard belongs to another tokenizer variant"
            )
    return count


def list_shards(dataset_dir: Path, split: str) -> list[Path]:
    """The shards of `split` in `dataset_dir`, in name order."""
    return sorted(Path(dataset_dir).glob(f"fineweb_{split}_*.bin"))


class ShardWriter:
    """Collects a stream of tokens for one split and writes full shards of `tokens_per_shard` as they fill."""

    def __init__(self, out_dir: Path, split: str, tokens_per_shard: int) -> None:
        if tokens_per_shard <= 0:
            raise ValueError(f"tokens_per_shard must be positive, got {tokens_per_shard}")
        shard_name(split, 0)
        self.out_dir = Path(out_dir)
        self.split = split
        self.tokens_per_shard = int(tokens_per_shard)
        self.buffer = np.empty(self.tokens_per_shard, dtype=np.uint16)
        self.fill = 0
        self.paths: list[Path] = []
        self.tokens_written = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens; writes a shard each time the buffer is full. Ids outside uint16 are refused, not wrapped."""
        tokens = np.asarray(tokens)
        if tokens.dtype != np.uint16 and tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**16):
            raise ValueError("token ids must lie in [0, 65535] to be stored as uint16")
        tokens = tokens.astype(np.uint16, copy=False)
        position = 0
        while position < tokens.size:
            take = min(self.tokens_per_shard - self.fill, tokens.size - position)
            self.buffer[self.fill : self.fill + take] = tokens[position : position + take]
            self.fill += take
            position += take
            if self.fill == self.tokens_per_shard:
                self._flush()

    def close(self) -> list[Path]:
        """Write the last partial shard; return the paths of all shards written."""
        self._flush()
        return self.paths

    def _flush(self) -> None:
        if self.fill == 0:
            return
        path = self.out_dir / shard_name(self.split, len(self.paths))
        write_shard(path, self.buffer[: self.fill])
        self.paths.append(path)
        self.tokens_written += self.fill
        self.fill = 0
