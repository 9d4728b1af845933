"""Token shards: the challenge's binary format, a sequential token stream and a distributed batch loader."""

import glob
import os

import numpy as np
import torch

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256


def load_data_shard(path: str) -> torch.Tensor:
    """Read one shard: 256 little-endian int32 (magic, version, token count, ...), then uint16 tokens."""
    header_bytes = SHARD_HEADER_INTS * 4
    size = os.path.getsize(path)
    if size < header_bytes:
        raise ValueError(f"{path}: shard is {size} bytes, shorter than its {header_bytes}-byte header; re-create it")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {int(header[0])} (want {SHARD_MAGIC}); not a token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {int(header[1])} is not supported (want {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = header_bytes + 2 * num_tokens
    if size != expected:
        raise ValueError(
            f"{path}: size {size} bytes but header says {num_tokens} tokens ({expected} bytes); re-create it"
        )
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=header_bytes)
    return torch.from_numpy(tokens.astype(np.int32))


def shard_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}; set DATA_PATH to a folder with fineweb_*_*.bin files")
    return files


class TokenStream:
    """Reads shards in order, forever, and hands out contiguous runs of tokens."""

    def __init__(self, pattern: str) -> None:
        self.files = shard_files(pattern)
        self.file_idx = 0
        self.tokens = load_data_shard(self.files[0])
        self.pos = 0

    def _advance(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = load_data_shard(self.files[self.file_idx])
        self.pos = 0

    def take(self, n: int) -> torch.Tensor:
        chunks = []
        while n > 0:
            avail = self.tokens.numel() - self.pos
            if avail <= 0:
                self._advance()
                continue
            k = min(n, avail)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class DistributedTokenLoader:
    """Each call takes one global batch from the stream; every rank keeps its own contiguous span."""

    def __init__(self, pattern: str, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.stream = TokenStream(pattern)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        local_tokens = max(seq_len, local_tokens // seq_len * seq_len)
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span : (self.rank + 1) * span].to(dtype=torch.int64)
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        pin = self.device.type == "cuda"
        return x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)


def load_validation_tokens(pattern: str, seq_len: int, limit: int = 0) -> torch.Tensor:
    """The validation stream, cut to whole sequences plus one token (optionally only its first `limit` tokens)."""
    tokens = torch.cat([load_data_shard(f) for f in shard_files(pattern)])
    if limit > 0:
        tokens = tokens[: limit + 1]
    usable = (tokens.numel() - 1) // seq_len * seq_len
    if usable <= 0:
        raise ValueError(f"validation split {pattern} is shorter than one sequence of {seq_len} tokens")
    return tokens[: usable + 1]
