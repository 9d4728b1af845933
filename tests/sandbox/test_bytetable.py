"""The validator's own byte table and val_bpb: the canonical rule, checked against sentencepiece's decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from validator.bytetable import byte_table, read_shard, score, target_bytes, val_stream


@pytest.fixture(scope="module")
def tokenizer(sample_paths):
    return sample_paths[1]


def test_table_follows_the_canonical_rule(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    table = byte_table(tokenizer)
    the = sp.piece_to_id("\u2581the")
    he = sp.piece_to_id("he")
    byte_a = sp.piece_to_id("<0x41>")
    assert (table.base_bytes[the], table.leading_space[the]) == (3, True)
    assert (table.base_bytes[he], table.leading_space[he]) == (2, False)
    assert table.base_bytes[byte_a] == 1 and not table.leading_space[byte_a]  # byte fallback is one byte, not 3
    for special in (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()):
        assert table.boundary[special] and table.base_bytes[special] == 0
    bos = sp.bos_id()
    # "▁the" after a boundary: no space counted; after a word: the space is one byte
    assert target_bytes(table, np.array([bos, the])).tolist() == [3]
    assert target_bytes(table, np.array([he, the])).tolist() == [4]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghij klmnop,.é", min_size=1, max_size=40), min_size=1, max_size=3))
def test_bytes_after_a_document_start_equal_the_decoded_text(sample_paths, texts):
    tokenizer = sample_paths[1]
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    table = byte_table(tokenizer)
    for text in texts:
        ids = sp.encode(text)
        if not ids:
            continue
        stream = np.array([sp.bos_id(), *ids])
        assert int(target_bytes(table, stream).sum()) == len(sp.decode(ids).encode("utf-8"))


def test_score_is_nats_over_ln2_over_bytes(tokenizer):
    table = byte_table(tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    tokens = np.array([sp.bos_id(), *sp.encode("the cat sat on the mat")])
    losses = np.linspace(0.5, 2.5, tokens.size - 1)
    result = score(table, tokens, losses)
    n_bytes = len(b"the cat sat on the mat")
    assert result.bytes == n_bytes and result.tokens == losses.size
    assert math.isclose(result.val_bpb, losses.sum() / math.log(2) / n_bytes, rel_tol=1e-12)
    with pytest.raises(ValueError, match="len\\(tokens\\) == len\\(losses\\) \\+ 1"):
        score(table, tokens, losses[:-1])
    with pytest.raises(ValueError, match="finite"):
        score(table, tokens, np.full(losses.size, np.nan))
    with pytest.raises(ValueError, match="token ids"):
        score(table, np.array([0, 5000]), np.array([1.0]))


def test_shards_are_read_and_bad_ones_named(sample_paths, tmp_path):
    data, _ = sample_paths
    stream = val_stream(data)
    assert stream.ndim == 1 and stream.size > 1000 and stream.max() < 1024
    bad = tmp_path / "fineweb_val_000000.bin"
    bad.write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match="fineweb_val_000000.bin: not a shard"):
        read_shard(bad)
    with pytest.raises(FileNotFoundError, match="no fineweb_val"):
        val_stream(tmp_path / "empty")
