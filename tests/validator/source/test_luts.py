"""Byte-table canonicality: the canonical table passes; the +1 leading-space bug, byte-fallback pieces not counted
as one byte, a wrong boundary set, and a shipped tokenizer without a standalone space piece are each flagged."""

from __future__ import annotations

import pytest
from source_audit_scripts import CANONICAL_LUT, codes, script

from validator.source.audit import audit_source

PLUS_ONE = CANONICAL_LUT.replace(
    'base_bytes[token_id] = len(piece.encode("utf-8"))', 'base_bytes[token_id] = len(piece.encode("utf-8")) + 1'
)
MARKER_KEPT = CANONICAL_LUT.replace("            piece = piece[1:]\n", "")
SPACE_REPLACED = CANONICAL_LUT.replace(
    "            piece = piece[1:]\n", '            piece = piece.replace("\u2581", " ")\n'
)
BYTE_AS_THREE = CANONICAL_LUT.replace(
    "            base_bytes[token_id] = 1\n", "            base_bytes[token_id] = 3\n"
)
NO_BYTE_CASE = CANONICAL_LUT.replace(
    "        if sp.is_byte(token_id):\n            base_bytes[token_id] = 1\n            continue\n", ""
)
NO_UNUSED = CANONICAL_LUT.replace(" or sp.is_unused(token_id)", "")
NO_UNKNOWN = CANONICAL_LUT.replace(" or sp.is_unknown(token_id)", "")


def audit_with_lut(make_folder, lut: str, extra_files: dict | None = None):
    folder = make_folder({"train_gpt.py": script().replace(CANONICAL_LUT, lut), **(extra_files or {})})
    return audit_source(folder, folder / "train_gpt.py")


def test_variants_differ_from_canonical():
    variants = [PLUS_ONE, MARKER_KEPT, SPACE_REPLACED, BYTE_AS_THREE, NO_BYTE_CASE, NO_UNUSED, NO_UNKNOWN]
    assert all(v != CANONICAL_LUT for v in variants)


def test_canonical_table_passes(make_folder):
    findings = audit_with_lut(make_folder, CANONICAL_LUT)
    assert not {c for c in codes(findings) if c.startswith("LUT_")}


@pytest.mark.parametrize(
    "lut,code,severity",
    [
        (PLUS_ONE, "LUT_LEADING_SPACE_PLUS_ONE", "error"),
        (SPACE_REPLACED, "LUT_LEADING_SPACE_PLUS_ONE", "error"),
        (MARKER_KEPT, "LUT_SPACE_MARKER_COUNTED", "error"),
        (BYTE_AS_THREE, "LUT_BYTE_FALLBACK_NOT_ONE", "error"),
        (NO_BYTE_CASE, "LUT_BYTE_FALLBACK_NOT_ONE", "error"),
        (NO_UNKNOWN, "LUT_BOUNDARY_SET", "error"),
        (NO_UNUSED, "LUT_BOUNDARY_SET", "warning"),
    ],
    ids=["plus-one", "space-replaced", "marker-kept", "byte-3", "byte-missing", "no-unknown", "no-unused"],
)
def test_lut_bug_is_flagged(make_folder, lut, code, severity):
    findings = audit_with_lut(make_folder, lut)
    hits = [f for f in findings if f.code == code]
    assert hits and hits[0].severity.value == severity, [(f.code, f.severity.value) for f in findings]


def test_buggy_table_in_dead_code_is_a_note(make_folder):
    dead = PLUS_ONE.replace("def build_sentencepiece_luts(", "def build_sentencepiece_luts_old(")
    folder = make_folder({"train_gpt.py": script(dead)})
    findings = audit_source(folder, folder / "train_gpt.py")
    hits = [f for f in findings if f.code == "LUT_LEADING_SPACE_PLUS_ONE"]
    assert hits and all(f.severity.value == "note" for f in hits)


def test_table_read_from_a_file_is_not_analysed(make_folder):
    custom = """
def load_luts(path="tokenizer.meta.npz"):
    return np.load(path)["base_bytes"]
"""
    folder = make_folder({"train_gpt.py": script().replace(CANONICAL_LUT, custom)})
    findings = audit_source(folder, folder / "train_gpt.py")
    assert "LUT_NOT_ANALYSED" in codes(findings, "note")


def _tokenizer(tmp_path, with_space_piece: bool) -> bytes:
    """A tiny byte-fallback BPE model; without spaces in its corpus (and no dummy prefix) it has no '▁' piece."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    joiner = " " if with_space_piece else ""
    corpus.write_text(
        "\n".join(joiner.join(words[(i + j) % 8] for j in range(6)) for i in range(200)), encoding="utf-8"
    )
    prefix = tmp_path / ("with" if with_space_piece else "without")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=with_space_piece,
        minloglevel=2,
    )
    model = prefix.with_suffix(".model").read_bytes()
    processor = spm.SentencePieceProcessor(model_proto=model)
    assert (processor.piece_to_id("▁") != processor.unk_id()) == with_space_piece
    return model


def test_tokenizer_without_space_piece_is_an_error(make_folder, tmp_path):
    model = _tokenizer(tmp_path, with_space_piece=False)
    findings = audit_with_lut(make_folder, CANONICAL_LUT, {"tokenizers/custom.model": model})
    assert "LUT_NO_SPACE_PIECE" in codes(findings, "error")


def test_tokenizer_with_space_piece_passes(make_folder, tmp_path):
    model = _tokenizer(tmp_path, with_space_piece=True)
    findings = audit_with_lut(make_folder, CANONICAL_LUT, {"tokenizers/custom.model": model})
    assert "LUT_NO_SPACE_PIECE" not in codes(findings)


def test_guard_in_code_silences_the_tokenizer_check(make_folder, tmp_path):
    model = _tokenizer(tmp_path, with_space_piece=False)
    guarded = CANONICAL_LUT.replace(
        "    size = max(",
        '    assert sp.piece_to_id("\u2581") != sp.unk_id(), "need a standalone space piece"\n    size = max(',
    )
    findings = audit_with_lut(make_folder, guarded, {"tokenizers/custom.model": model})
    assert "LUT_NO_SPACE_PIECE" not in codes(findings)
