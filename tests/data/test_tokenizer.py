"""The tokenizer is trained with the upstream settings, deterministically, and saved like SentencePiece does."""

from __future__ import annotations

import struct

import sentencepiece as spm

from builder.data import tokenizer as tok
from builder.data.corpus import generate_documents

DOCS = list(generate_documents(150, seed=11))

# Field numbers in sentencepiece_model.proto (ModelProto / TrainerSpec / NormalizerSpec); read with a small
# protobuf wire reader so the test needs no protobuf package.
MODEL_TRAINER_SPEC, MODEL_NORMALIZER_SPEC = 2, 3
TRAINER = {"input": 1, "model_prefix": 2, "model_type": 3, "vocab_size": 4, "character_coverage": 10,
           "split_digits": 25, "hard_vocab_limit": 33, "byte_fallback": 35,
           "unk_id": 40, "bos_id": 41, "eos_id": 42, "pad_id": 43}  # fmt: skip
NORMALIZER = {"name": 1, "add_dummy_prefix": 3}
BPE = 2


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(buf: bytes) -> dict[int, list]:
    """Top-level fields of a protobuf message: number -> values (ints, bytes, or floats for 32-bit)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack("<f", buf[pos : pos + 4])[0], pos + 4
        else:
            assert wire == 1, f"unexpected wire type {wire}"
            value, pos = buf[pos : pos + 8], pos + 8
        out.setdefault(number, []).append(value)
    return out


def test_settings_applied_and_special_ids():
    model_bytes = tok.train_model(DOCS, 1024)
    assert model_bytes == tok.train_model(DOCS, 1024)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    assert processor.get_piece_size() == 1024
    assert [processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id()] == [0, 1, 2, 3]
    assert [processor.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    # byte fallback: all 256 byte pieces right after the specials
    assert [processor.id_to_piece(4 + b) for b in (0, 65, 255)] == ["<0x00>", "<0x41>", "<0xFF>"]
    assert all(processor.is_byte(4 + b) for b in range(256))
    # digits are split, no dummy prefix, unseen characters fall back to bytes
    assert processor.encode("2024", out_type=str) == ["2", "0", "2", "4"]
    assert not processor.encode("the", out_type=str)[0].startswith("\u2581")
    assert processor.encode("\u00e9", out_type=str) == ["<0xC3>", "<0xA9>"]
    # nmt_nfkc: the full-width digit is normalised to an ASCII one
    assert processor.encode("\uff11", out_type=str) == ["1"]

    model = _fields(model_bytes)
    trainer = _fields(model[MODEL_TRAINER_SPEC][0])
    normalizer = _fields(model[MODEL_NORMALIZER_SPEC][0])
    spec = {name: trainer[number][0] for name, number in TRAINER.items() if number in trainer}
    assert spec["model_type"] == BPE and spec["vocab_size"] == 1024
    assert spec["byte_fallback"] == 1 and spec["split_digits"] == 1 and spec["hard_vocab_limit"] == 0
    assert abs(spec["character_coverage"] - 0.999) < 1e-6
    assert [spec[k] for k in ("pad_id", "bos_id", "eos_id", "unk_id")] == [0, 1, 2, 3]
    assert normalizer[NORMALIZER["name"]] == [b"nmt_nfkc"] and normalizer[NORMALIZER["add_dummy_prefix"]] == [0]
    assert "input" not in spec and "model_prefix" not in spec, "no temporary path may end up inside the model"


def test_bpe_learns_word_merges():
    processor = spm.SentencePieceProcessor(model_proto=tok.train_model(DOCS, 1024))
    pieces = {processor.id_to_piece(i) for i in range(processor.get_piece_size())}
    assert {"\u2581the", "the"} & pieces
    assert sum(len(p) >= 4 for p in pieces) > 100


def test_saved_files(tmp_path):
    model_bytes = tok.train_model(DOCS, 1024)
    path = tmp_path / "tokenizers" / "fineweb_1024_bpe.model"
    processor = tok.save_model(model_bytes, path)
    assert path.read_bytes() == model_bytes
    lines = path.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(lines) == processor.get_piece_size()
    assert lines[0] == "<pad>\t0" and lines[4] == "<0x00>\t0"
    assert lines[260].split("\t")[1] == "-0"


def test_long_lines_are_cut_for_training():
    line = " ".join(["word"] * 3000)
    pieces = list(tok.training_sentences([line, "", "a\n\nb"]))
    assert all(len(p.encode()) <= tok.MAX_SENTENCE_BYTES for p in pieces)
    assert " ".join(pieces[:-2]).split() == line.split()
    assert pieces[-2:] == ["a", "b"]
