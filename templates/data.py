"""Token shards and batches. A shard is 256 little-endian int32 (magic 20240520, version 1, token count, then
unused) followed by that many uint16 tokens. Every shard is checked before training starts; a bad one is named.
"""

import glob
import os

import numpy as np
import torch

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
SHARD_MAGIC = 20240520
SHARD_VERSION = 1


class ShardError(ValueError):
    """A shard that is not in the challenge's format; the message names the file and the fix."""


def shard_token_count(path: str) -> int:
    """The number of tokens a shard holds, after checking its header against its size."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read the shard ({exc.strerror})") from exc
    if header.size < HEADER_INTS:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; re-create the shard")
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: magic {magic}, not {SHARD_MAGIC}: not a token shard; re-create it")
    if version != SHARD_VERSION:
        raise ShardError(f"{path}: shard version {version}; this script reads version {SHARD_VERSION}")
    if size != HEADER_BYTES + 2 * count:
        raise ShardError(f"{path}: header says {count} tokens but the file has {size} bytes; re-create the shard")
    return count


def read_shard(path: str) -> torch.Tensor:
    count = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    return torch.from_numpy(tokens.astype(np.int32))


def find_shards(data_path: str, split: str) -> list[str]:
    """The split's shards in name order, each checked; an error names the folder when there are none."""
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise ShardError(f"{data_path}: no fineweb_{split}_*.bin shards; set DATA_PATH to a folder of shards")
    for path in files:
        shard_token_count(path)
    return files


class ShardStream:
    """The training shards read front to back, and again from the first when the last runs out."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.next_file = 0
        self.tokens = torch.zeros(0, dtype=torch.int32)
        self.pos = 0

    def read(self, n: int) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.int64)
        filled = 0
        while filled < n:
            if self.pos == self.tokens.numel():
                self.tokens = read_shard(self.files[self.next_file])
                self.next_file = (self.next_file + 1) % len(self.files)
                self.pos = 0
                continue
            k = min(n - filled, self.tokens.numel() - self.pos)
            out[filled : filled + k] = self.tokens[self.pos : self.pos + k]
            filled += k
            self.pos += k
        return out


class BatchLoader:
    """One micro-batch per call: every rank reads the same span of the stream and keeps its own contiguous part
    (its sequences plus one token for the shifted targets)."""

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device) -> None:
        self.stream = ShardStream(files)
        self.rank, self.world_size, self.device = rank, world_size, device

    def next(self, batch_tokens: int, seq_len: int, accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = batch_tokens // (self.world_size * accum_steps) // seq_len * seq_len
        per_rank = max(per_rank, seq_len)
        span = self.stream.read((per_rank + 1) * self.world_size)
        mine = span[self.rank * (per_rank + 1) : (self.rank + 1) * (per_rank + 1)]
        if self.device.type == "cuda":
            mine = mine.pin_memory().to(self.device, non_blocking=True)
        return mine[:-1].view(-1, seq_len), mine[1:].view(-1, seq_len)


def load_validation_tokens(files: list[str], seq_len: int, limit: int = 0) -> torch.Tensor:
    """The validation stream cut to whole sequences plus one target token (its first `limit` tokens if set)."""
    tokens = torch.cat([read_shard(path) for path in files])
    if limit > 0:
        tokens = tokens[: limit + 1]
    usable = (tokens.numel() - 1) // seq_len * seq_len
    if usable <= 0:
        raise ShardError(f"{files[0]}: the validation split is shorter than one sequence of {seq_len} tokens")
    return tokens[: usable + 1]
