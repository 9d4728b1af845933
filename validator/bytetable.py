"""The validator's own score arithmetic: a canonical byte table from a sentencepiece model, the validation
stream read from the shards, and val_bpb recomputed from per-token losses.

Independent of any submission's code, so a byte-table bug in a script (the "+1 leading space" family, byte
fallback counted as 3 bytes, a missing boundary rule) cannot inflate the score the validator reports.
Canonical rule: bytes of a target = UTF-8 length of its piece without the leading `▁`, plus one for that space
unless the previous token is a boundary (control, unknown or unused piece); byte-fallback pieces `<0xNN>` are one
byte; boundaries stand for no bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPACE = "\u2581"
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256


@dataclass(frozen=True)
class ByteTable:
    base_bytes: np.ndarray  # int64 per piece id
    leading_space: np.ndarray  # bool per piece id
    boundary: np.ndarray  # bool per piece id

    @property
    def size(self) -> int:
        return int(self.base_bytes.shape[0])


@dataclass(frozen=True)
class Score:
    val_loss: float  # mean nats per target token
    val_bpb: float
    tokens: int
    bytes: int


def byte_table(model_path: Path | str) -> ByteTable:
    """The canonical table of a sentencepiece .model file."""
    import sentencepiece as spm

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer model not found; pass the .model file that made the shards")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    base = np.zeros(n, dtype=np.int64)
    space = np.zeros(n, dtype=bool)
    boundary = np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = piece.startswith(SPACE)
            base[i] = len(piece.removeprefix(SPACE).encode("utf-8"))
    return ByteTable(base, space, boundary)


def target_bytes(table: ByteTable, tokens: np.ndarray) -> np.ndarray:
    """Bytes each of tokens[1:] stands for, given the token before it."""
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1 or ids.size < 2:
        raise ValueError("the token stream must be one-dimensional with at least two tokens")
    if ids.min() < 0 or ids.max() >= table.size:
        raise ValueError(f"token ids must lie in [0, {table.size}); found {ids.min()}..{ids.max()}")
    prev, target = ids[:-1], ids[1:]
    return table.base_bytes[target] + (table.leading_space[target] & ~table.boundary[prev])


def score(table: ByteTable, tokens: np.ndarray, losses: np.ndarray) -> Score:
    """val_loss and val_bpb from per-target losses in nats (losses[i] scores tokens[i + 1])."""
    nats = np.asarray(losses, dtype=np.float64)
    if nats.ndim != 1 or nats.size + 1 != np.asarray(tokens).size:
        raise ValueError(f"need len(tokens) == len(losses) + 1; got {np.asarray(tokens).size} and {nats.size}")
    if not np.all(np.isfinite(nats)) or nats.min() < 0:
        raise ValueError("per-token losses must be finite and non-negative nats")
    total_bytes = int(target_bytes(table, tokens).sum())
    if total_bytes <= 0:
        raise ValueError("the scored tokens stand for no bytes")
    total_nats = float(nats.sum())
    return Score(total_nats / nats.size, total_nats / math.log(2.0) / total_bytes, int(nats.size), total_bytes)


def read_shard(path: Path) -> np.ndarray:
    """Tokens of one shard: 256 little-endian int32 header (magic, version, count), then uint16 tokens."""
    raw = Path(path).read_bytes()
    if len(raw) < HEADER_INTS * 4:
        raise ValueError(f"{path}: shorter than the 1024-byte shard header; re-make the shard")
    header = np.frombuffer(raw, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a shard (magic {header[0]}, version {header[1]}); re-make the shard")
    count = int(header[2])
    if len(raw) != HEADER_INTS * 4 + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens but the file holds {(len(raw) - 1024) // 2}")
    return np.frombuffer(raw, dtype="<u2", offset=HEADER_INTS * 4).astype(np.int64)


def val_stream(data_dir: Path) -> np.ndarray:
    """The whole validation stream: every fineweb_val_*.bin shard of the folder, in name order."""
    shards = sorted(Path(data_dir).glob("fineweb_val_*.bin"))
    if not shards:
        raise FileNotFoundError(f"{data_dir}: no fineweb_val_*.bin shards; pass the dataset folder with --data")
    return np.concatenate([read_shard(s) for s in shards])
