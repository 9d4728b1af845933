"""Shard format: round trip, the header layout, every error, and the streaming writer."""

from __future__ import annotations

import numpy as np
import pytest

from builder.cli import UserError
from builder.data import shards


def test_round_trip_and_exact_layout(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 1023], dtype=np.uint16)
    path = tmp_path / shards.shard_name("val", 0)
    shards.write_shard(path, tokens)
    assert path.name == "fineweb_val_000000.bin"
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * tokens.size
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5]
    assert not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert shards.read_shard(path).tolist() == tokens.tolist()
    assert shards.validate_shard(path, vocab_size=65536) == 5


def test_int_input_is_range_checked(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        shards.encode_shard([1, 70000])
    with pytest.raises(ValueError, match="65535"):
        shards.encode_shard([-1])


def _corrupt(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(raw))


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    shards.write_shard(path, np.arange(10, dtype=np.uint16))
    return path


def test_bad_magic(shard):
    _corrupt(shard, 0, 12345)
    with pytest.raises(shards.ShardError, match=r"fineweb_train_000000\.bin: bad magic 12345"):
        shards.read_shard(shard)


def test_bad_version(shard):
    _corrupt(shard, 4, 7)
    with pytest.raises(shards.ShardError, match=r"fineweb_train_000000\.bin: unsupported version 7"):
        shards.read_header(shard)


def test_short_file(shard):
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(shards.ShardError, match=r"fineweb_train_000000\.bin: short file \(100 bytes"):
        shards.read_shard(shard)


@pytest.mark.parametrize("delta", [-2, 2, -1])
def test_wrong_size(shard, delta):
    raw = shard.read_bytes()
    shard.write_bytes(raw[:delta] if delta < 0 else raw + b"\0" * delta)
    with pytest.raises(shards.ShardError, match=r"fineweb_train_000000\.bin: wrong size"):
        shards.read_shard(shard)


def test_missing_file(tmp_path):
    with pytest.raises(shards.ShardError, match="not found"):
        shards.read_header(tmp_path / "fineweb_val_000000.bin")


def test_vocab_check(shard):
    assert shards.validate_shard(shard, vocab_size=10) == 10
    with pytest.raises(shards.ShardError, match="token id 9 is outside the vocabulary of 9"):
        shards.validate_shard(shard, vocab_size=9)


def test_shard_error_is_a_user_error():
    assert issubclass(shards.ShardError, UserError)


def test_writer_splits_stream_into_full_shards(tmp_path):
    writer = shards.ShardWriter(tmp_path, "train", tokens_per_shard=7)
    stream = np.arange(30, dtype=np.uint16)
    for piece in np.split(stream, [3, 4, 20]):
        writer.add(piece)
    paths = writer.close()
    assert [p.name for p in paths] == [shards.shard_name("train", i) for i in range(5)]
    sizes = [shards.read_header(p) for p in paths]
    assert sizes == [7, 7, 7, 7, 2]
    assert np.concatenate([shards.read_shard(p) for p in paths]).tolist() == stream.tolist()
    assert writer.tokens_written == 30
    assert shards.list_shards(tmp_path, "train") == paths
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("bad", [[1, 70000], [-1, 2]])
def test_writer_refuses_ids_outside_uint16(tmp_path, bad):
    """The writer used to cast to uint16 first: 70000 was stored as 4464 and -1 as 65535, silently."""
    writer = shards.ShardWriter(tmp_path, "train", tokens_per_shard=7)
    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        writer.add(np.array(bad))
    writer.add([1, 2, 65535])  # lists and the full range are fine
    assert shards.read_shard(writer.close()[0]).tolist() == [1, 2, 65535]
