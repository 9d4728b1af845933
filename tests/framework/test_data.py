"""The shard reader inside train_gpt.py: the format, every shard checked up front, the stream and the batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.data.shards import write_shard
from templates.data import BatchLoader, ShardError, ShardStream, find_shards, load_validation_tokens, read_shard


def _header(n: int, magic: int = 20240520, version: int = 1) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:3] = (magic, version, n)
    return h.tobytes()


def test_reads_what_the_builder_writes(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 1024
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert read_shard(str(tmp_path / "fineweb_train_000000.bin")).tolist() == tokens.tolist()


@pytest.mark.parametrize(
    "content, message",
    [
        (_header(4, magic=12345) + b"\0" * 8, "magic 12345"),
        (_header(4, version=2) + b"\0" * 8, "version 2"),
        (b"\0" * 100, "shorter than"),
        (_header(10) + b"\0" * 8, "header says 10 tokens"),
    ],
)
def test_a_bad_shard_anywhere_is_named_before_training(tmp_path, content, message):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(64, dtype=np.uint16))
    bad = tmp_path / "fineweb_train_000007.bin"  # not the first shard: all are checked
    bad.write_bytes(content)
    with pytest.raises(ShardError, match=message) as info:
        find_shards(str(tmp_path), "train")
    assert str(bad) in str(info.value)


def test_no_shards_names_the_folder(tmp_path):
    with pytest.raises(ShardError, match="DATA_PATH"):
        find_shards(str(tmp_path), "val")


def test_stream_wraps_across_shards_and_loader_splits_ranks(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 50, dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(50, 100, dtype=np.uint16))
    files = find_shards(str(tmp_path), "train")
    stream = ShardStream(files)
    assert stream.read(70).tolist() == list(range(70))
    assert stream.read(40).tolist() == list(range(70, 100)) + list(range(10))
    x0, y0 = BatchLoader(files, 0, 2, torch.device("cpu")).next(16, 4, 1)
    x1, y1 = BatchLoader(files, 1, 2, torch.device("cpu")).next(16, 4, 1)
    assert x0.dtype == torch.int64 and x0.shape == (2, 4)
    assert x0.flatten().tolist() == list(range(8)) and y0.flatten().tolist() == list(range(1, 9))
    assert x1.flatten().tolist() == list(range(9, 17)) and y1.flatten().tolist() == list(range(10, 18))
    # with gradient accumulation each micro-step is 1/accum of the rank's share: 32 tokens, 2 ranks, 4 micro-steps
    loader = BatchLoader(files, 0, 2, torch.device("cpu"))
    micro = [loader.next(32, 4, 4) for _ in range(4)]
    assert all(x.shape == (1, 4) for x, _ in micro)
    assert [x.flatten().tolist() for x, _ in micro] == [list(range(s, s + 4)) for s in (0, 10, 20, 30)]


def test_validation_is_cut_to_whole_sequences(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(103, dtype=np.uint16))
    files = find_shards(str(tmp_path), "val")
    assert load_validation_tokens(files, seq_len=10).numel() == 101
    assert load_validation_tokens(files, seq_len=10, limit=25).numel() == 21
    with pytest.raises(ShardError, match="shorter than one sequence"):
        load_validation_tokens(files, seq_len=200)
