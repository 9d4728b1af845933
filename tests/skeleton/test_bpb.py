"""Byte tables and val_bpb against small examples computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from templates.bpb import bits_per_byte, build_byte_tables, target_bytes


class FakePieces:
    """A sentencepiece-like vocabulary small enough to check by hand."""

    # id: (piece, kind) with kind in control/unknown/byte/normal/unused
    PIECES = [
        ("<pad>", "control"),
        ("<s>", "control"),
        ("</s>", "control"),
        ("<unk>", "unknown"),
        ("<0x41>", "byte"),
        ("\u2581the", "normal"),
        ("cat", "normal"),
        ("\u2581", "normal"),
        ("\u00e9t\u00e9", "normal"),  # 2 + 1 + 2 bytes in UTF-8
        ("\u2581\u00e9", "normal"),
        ("<unused>", "unused"),
    ]

    def get_piece_size(self) -> int:
        return len(self.PIECES)

    def id_to_piece(self, i: int) -> str:
        return self.PIECES[i][0]

    def is_control(self, i: int) -> bool:
        return self.PIECES[i][1] == "control"

    def is_unknown(self, i: int) -> bool:
        return self.PIECES[i][1] == "unknown"

    def is_unused(self, i: int) -> bool:
        return self.PIECES[i][1] == "unused"

    def is_byte(self, i: int) -> bool:
        return self.PIECES[i][1] == "byte"


def test_tables_by_hand():
    base, space, boundary = build_byte_tables(FakePieces(), vocab_size=12, device=torch.device("cpu"))
    assert base.tolist() == [0, 0, 0, 0, 1, 3, 3, 0, 5, 2, 0, 0]
    assert space.tolist() == [False] * 5 + [True, False, True, False, True, False, False]
    assert boundary.tolist() == [True] * 4 + [False] * 6 + [True, True]  # padded ids past the vocab are boundaries


def test_leading_space_counts_unless_after_a_boundary():
    tables = build_byte_tables(FakePieces(), vocab_size=11, device=torch.device("cpu"))
    prev = torch.tensor([1, 6, 5, 7, 3, 6])
    tgt = torch.tensor([5, 5, 7, 9, 5, 4])
    # <s>->"▁the": 3 (no space after BOS); cat->"▁the": 4; ▁the->"▁": 1; "▁"->"▁é": 3; <unk>->"▁the": 3; byte: 1
    assert target_bytes(prev, tgt, tables).tolist() == [3, 4, 1, 3, 3, 1]


def test_bits_per_byte():
    # 4 tokens at ln(2) nats each = 4 bits over 2 bytes = 2 bits per byte
    assert bits_per_byte(4 * math.log(2), 4, 2) == pytest.approx(2.0)
    assert bits_per_byte(10.0, 5, 5) == pytest.approx(2.0 / math.log(2))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0, 3)


def test_real_tokenizer_bytes_match_the_text(sample_data):
    import sentencepiece as spm

    _, model = sample_data
    sp = spm.SentencePieceProcessor(model_file=str(model))
    text = "The 42 cats sat, quietly; naïve café 3.14!"
    ids = [1] + sp.encode(text)  # BOS then the document, as the shards hold it
    tables = build_byte_tables(sp, sp.get_piece_size(), torch.device("cpu"))
    t = torch.tensor(ids)
    counted = int(target_bytes(t[:-1], t[1:], tables).sum())
    assert counted == len(text.encode("utf-8"))
