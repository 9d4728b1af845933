"""`builder data sample`: determinism, the upstream layout, BOS before every document, the val split first."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from builder.cli import UserError, main
from builder.data import shards
from builder.data.corpus import generate_documents
from builder.data.sample import make_sample

ARGS = ["--docs", "120", "--val-docs", "10", "--shard-tokens", "8000", "--seed", "3"]


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_same_bytes(tmp_path, capsys):
    assert main(["data", "sample", "--out", str(tmp_path / "a"), *ARGS]) == 0
    assert main(["data", "sample", "--out", str(tmp_path / "b"), *ARGS]) == 0
    first = _tree(tmp_path / "a")
    assert first == _tree(tmp_path / "b")
    assert "datasets/fineweb10B_sp1024/fineweb_val_000000.bin" in first
    assert "datasets/fineweb10B_sp1024/fineweb_train_000001.bin" in first
    assert "tokenizers/fineweb_1024_bpe.model" in first
    assert "tokenizers/fineweb_1024_bpe.vocab" in first
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"DATA_PATH={tmp_path / 'b' / 'datasets' / 'fineweb10B_sp1024'}"
    assert out[-1] == f"TOKENIZER_PATH={tmp_path / 'b' / 'tokenizers' / 'fineweb_1024_bpe.model'}"
    # a re-run into the same folder gives the same bytes and leaves no temporary files behind
    assert main(["data", "sample", "--out", str(tmp_path / "a"), *ARGS]) == 0
    assert _tree(tmp_path / "a") == first
    assert not [p for p in (tmp_path / "a").rglob(".*")]


def test_other_seed_other_text():
    assert list(generate_documents(5, seed=1)) != list(generate_documents(5, seed=2))
    assert list(generate_documents(3, seed=1, start=2)) == list(generate_documents(5, seed=1))[2:]


def test_bos_per_document_and_val_first(tmp_path):
    result = make_sample(tmp_path, docs=60, seed=5, val_docs=7, tokens_per_shard=3000)
    data = result.data_path
    processor = spm.SentencePieceProcessor(model_file=str(result.tokenizer_path))
    docs = list(generate_documents(60, seed=5))
    val = np.concatenate([shards.read_shard(p) for p in shards.list_shards(data, "val")])
    train = np.concatenate([shards.read_shard(p) for p in shards.list_shards(data, "train")])
    expected_val = np.concatenate([[1, *processor.encode(d)] for d in docs[:7]]).astype(np.uint16)
    expected_train = np.concatenate([[1, *processor.encode(d)] for d in docs[7:]]).astype(np.uint16)
    assert val.tolist() == expected_val.tolist()
    assert train.tolist() == expected_train.tolist()
    assert int((val == 1).sum()) == 7 and int((train == 1).sum()) == 53
    assert max(shards.read_header(p) for p in shards.list_shards(data, "train")) == 3000
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (entry,) = manifest["datasets"]
    assert entry["stats"]["docs_val"] == 7 and entry["stats"]["tokens_val"] == val.size
    assert entry["stats"]["tokens_train"] == train.size


def test_text_is_english_like():
    text = "\n\n".join(generate_documents(40, seed=0))
    assert any(ch.isdigit() for ch in text) and "," in text and "." in text and "?" in text
    assert "\n\n" in text and any(w[:1].isupper() for w in text.split())
    words = text.split()
    assert len(set(words)) > 300 and words.count("the") > 50


def test_sample_is_learnable(tmp_path):
    """A bigram model counted on train predicts val far better than token frequencies: there is structure to learn."""
    result = make_sample(tmp_path, docs=300, seed=0, val_docs=30)
    train = np.concatenate([shards.read_shard(p) for p in shards.list_shards(result.data_path, "train")])
    val = np.concatenate([shards.read_shard(p) for p in shards.list_shards(result.data_path, "val")])
    train, val = train.astype(np.int64), val.astype(np.int64)
    vocab = 1024
    assert int(train.max()) < vocab
    unigram = np.bincount(train, minlength=vocab) + 1.0
    unigram /= unigram.sum()
    bigram = np.full((vocab, vocab), 0.1)
    np.add.at(bigram, (train[:-1], train[1:]), 1.0)
    bigram /= bigram.sum(axis=1, keepdims=True)
    unigram_bits = float(-np.log2(unigram[val]).mean())
    bigram_bits = float(-np.log2(bigram[val[:-1], val[1:]]).mean())
    assert unigram_bits > 7.0
    assert bigram_bits < unigram_bits - 2.0, (unigram_bits, bigram_bits)


def test_variants_share_one_manifest_and_a_bad_one_is_refused(tmp_path):
    make_sample(tmp_path, docs=30, val_docs=3)
    make_sample(tmp_path, docs=30, val_docs=3, vocab_size=8192)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [d["name"] for d in manifest["datasets"]] == ["fineweb10B_sp1024", "fineweb10B_sp8192"]
    assert [t["model_path"] for t in manifest["tokenizers"]] == [
        "tokenizers/fineweb_1024_bpe.model",
        "tokenizers/fineweb_8192_bpe.model",
    ]
    (tmp_path / "manifest.json").write_text("{not json")
    before = {p: p.read_bytes() for p in (tmp_path / "datasets").rglob("*.bin")}
    with pytest.raises(UserError, match=r"manifest\.json: not valid JSON"):
        make_sample(tmp_path, docs=40, val_docs=3)
    assert {p: p.read_bytes() for p in (tmp_path / "datasets").rglob("*.bin")} == before
    assert not [p for p in tmp_path.rglob(".*")]


def test_default_val_split_scales_with_docs(tmp_path):
    from builder.data.sample import default_val_docs

    assert [default_val_docs(n) for n in (2, 300, 2560, 10_000)] == [1, 30, 256, 256]
    result = make_sample(tmp_path, docs=50)
    assert result.stats["docs_val"] == 5 and result.stats["docs_train"] == 45
