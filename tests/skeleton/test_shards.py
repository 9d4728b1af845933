"""The shard reader inside train_gpt.py: the format, its errors, and agreement with the builder's writer."""

from __future__ import annotations

import numpy as np
import pytest

from builder.data.shards import write_shard
from templates.data import DistributedTokenLoader, TokenStream, load_data_shard, load_validation_tokens


def _header(n: int, magic: int = 20240520, version: int = 1) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:3] = (magic, version, n)
    return h.tobytes()


def test_reads_what_the_builder_writes(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 1024
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    got = load_data_shard(str(tmp_path / "fineweb_train_000000.bin"))
    assert got.dtype.is_floating_point is False
    assert got.tolist() == tokens.tolist()


@pytest.mark.parametrize(
    "content, message",
    [
        (_header(4, magic=12345) + b"\0" * 8, "bad magic"),
        (_header(4, version=2) + b"\0" * 8, "version"),
        (b"\0" * 100, "shorter than"),
        (_header(10) + b"\0" * 8, "header says 10 tokens"),
    ],
)
def test_bad_shards_name_the_file(tmp_path, content, message):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_data_shard(str(path))
    assert str(path) in str(info.value)


def test_stream_wraps_across_shards_and_loader_splits_ranks(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(0, 50, dtype=np.uint16))
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(50, 100, dtype=np.uint16))
    stream = TokenStream(str(tmp_path / "fineweb_train_*.bin"))
    assert stream.take(70).tolist() == list(range(70))
    assert stream.take(40).tolist() == list(range(70, 100)) + list(range(10))
    import torch

    pattern = str(tmp_path / "fineweb_train_*.bin")
    x0, y0 = DistributedTokenLoader(pattern, 0, 2, torch.device("cpu")).next_batch(16, 4, 1)
    x1, y1 = DistributedTokenLoader(pattern, 1, 2, torch.device("cpu")).next_batch(16, 4, 1)
    assert x0.flatten().tolist() == list(range(8)) and y0.flatten().tolist() == list(range(1, 9))
    assert x1.flatten().tolist() == list(range(9, 17))


def test_validation_is_cut_to_whole_sequences(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(103, dtype=np.uint16))
    val = load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len=10)
    assert val.numel() == 101
    assert load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), seq_len=10, limit=25).numel() == 21
    with pytest.raises(FileNotFoundError, match="DATA_PATH"):
        load_validation_tokens(str(tmp_path / "nothing_*.bin"), seq_len=10)
