"""`builder data sample|text --vocab`: upstream's 1024/4096/8192 and the small test sizes (64..1023)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from builder.cli import main
from builder.data import shards
from builder.data import tokenizer as tok
from builder.data.corpus import generate_documents
from builder.data.sample import make_sample
from builder.data.text import make_text_dataset


def _all_ids(data_path):
    return np.concatenate([shards.read_shard(p) for s in ("val", "train") for p in shards.list_shards(data_path, s)])


def test_sample_4096_has_upstream_settings(tmp_path):
    result = make_sample(tmp_path, docs=40, val_docs=4)
    big = make_sample(tmp_path, docs=40, val_docs=4, vocab_size=4096)
    assert big.data_path == tmp_path / "datasets" / "fineweb10B_sp4096"
    assert big.tokenizer_path == tmp_path / "tokenizers" / "fineweb_4096_bpe.model"
    assert int(_all_ids(big.data_path).max()) < 4096
    processor = spm.SentencePieceProcessor(model_file=str(big.tokenizer_path))
    assert processor.is_byte(4) and processor.id_to_piece(4) == "<0x00>"  # byte fallback, as upstream
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [d["name"] for d in manifest["datasets"]] == ["fineweb10B_sp1024", "fineweb10B_sp4096"]
    settings = {t["vocab_size"]: t["settings"] for t in manifest["tokenizers"]}
    assert settings[4096] == tok.UPSTREAM_SETTINGS == settings[1024]
    assert result.data_path.is_dir()  # the 1024 dataset beside it is kept


@pytest.mark.parametrize("vocab", [96, 128, 512])
def test_small_vocab_sample_is_lossless_without_byte_fallback(tmp_path, vocab):
    result = make_sample(tmp_path, docs=30, val_docs=3, vocab_size=vocab, tokens_per_shard=50_000)
    processor = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    assert processor.get_piece_size() == vocab
    assert not any(processor.is_byte(i) for i in range(vocab))
    ids = _all_ids(result.data_path)
    assert int(ids.max()) < vocab and not (ids == tok.UNK_ID).any()
    docs = list(generate_documents(30, seed=0))
    val = shards.read_shard(shards.list_shards(result.data_path, "val")[0]).tolist()
    # BOS-delimited; decodes to the same text up to nmt_nfkc whitespace folding (as upstream)
    assert processor.decode(val[1 : val.index(1, 1)]) == " ".join(docs[0].split())
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())["tokenizers"]
    assert entry["settings"]["byte_fallback"] is False and entry["settings"]["character_coverage"] == 1.0


def test_small_vocab_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, doc in enumerate(generate_documents(12, seed=1)):
        (corpus / f"d{index}.txt").write_text(doc, encoding="utf-8")
    result = make_text_dataset([str(corpus / "*.txt")], tmp_path / "out", vocab_size=256, val_docs=2)
    assert result.data_path.name == "fineweb10B_sp256"
    assert int(_all_ids(result.data_path).max()) < 256


@pytest.mark.parametrize(
    ("vocab", "expected"),
    [
        ("64", "--vocab 64: the training text needs at least 71 pieces"),
        ("2000", "--vocab 2000: supported sizes are upstream's 1024, 4096, 8192, or 64..1023 for tests"),
        ("16", "--vocab 16: supported sizes"),
    ],
)
def test_unfit_vocab_is_one_line_and_writes_nothing(tmp_path, capsys, vocab, expected):
    out = tmp_path / "out"
    assert main(["data", "sample", "--out", str(out), "--docs", "30", "--vocab", vocab]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "doc/s" not in line]  # not the progress bar
    assert len(lines) == 1 and lines[0].startswith("builder data: error: ") and expected in lines[0]
    assert not out.exists()


def test_vocab_error_names_the_size_that_fits():
    with pytest.raises(tok.VocabSizeError, match=r"pass --vocab 73 or more"):
        tok.train_model(generate_documents(300, seed=0), 64)
    assert tok.train_model(generate_documents(300, seed=0), 73)


def test_vocab_error_at_an_upstream_size_names_a_supported_size_or_more_text():
    """Few documents dense in distinct characters (a Unicode table, as jinja2 ships) need more pieces than sp1024
    has: the message names upstream's next size and more tokenizer text, never an unsupported size."""
    rare = "".join(chr(0x4E00 + i) for i in range(1200))
    docs = [" ".join(rare[i : i + 40] for i in range(0, len(rare), 40))] + ["def f(x):\n    return x\n"] * 3
    with pytest.raises(tok.VocabSizeError) as caught:
        tok.train_model(docs, 1024)
    message = str(caught.value)
    assert "pass --vocab 4096, or train the tokenizer on more documents (--tokenizer-docs)" in message
    assert tok.fitting_vocab_hint(1024, 9000).startswith("train the tokenizer on more documents")
    assert tok.fitting_vocab_hint(64, 2000) == "pass --vocab 1024 or more (byte fallback covers rare characters there)"
