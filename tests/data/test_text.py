"""`builder data text`: documents per file or per blank-line block, multiprocess encoding, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

from builder.cli import UserError, main
from builder.data import shards
from builder.data.corpus import generate_documents
from builder.data.text import find_inputs, iter_documents, make_text_dataset

DOCS = list(generate_documents(40, seed=4))


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "zdeep").mkdir(parents=True)
    for index, doc in enumerate(DOCS[:30]):
        (folder / f"doc{index:02d}.txt").write_text(doc + "\n", encoding="utf-8")
    (folder / "zdeep" / "rest.txt").write_text("\n\n".join(DOCS[30:]) + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("not matched", encoding="utf-8")
    return folder


def _ids(data_path, split):
    return np.concatenate([shards.read_shard(p) for p in shards.list_shards(data_path, split)])


def test_split_modes(corpus):
    paths = find_inputs([str(corpus / "**" / "*.txt")])
    assert len(paths) == 31 and paths == sorted(paths)
    per_file = list(iter_documents(paths, "file"))
    assert per_file == DOCS[:30] + ["\n\n".join(DOCS[30:])]
    blocks = list(iter_documents(paths, "blank"))
    assert blocks == [b for d in DOCS for b in d.split("\n\n")] and "" not in blocks


def test_file_mode_dataset_and_workers_agree(corpus, tmp_path):
    pattern = str(corpus / "**" / "*.txt")
    one = make_text_dataset([pattern], tmp_path / "one", val_docs=3, tokens_per_shard=2000, workers=1)
    two = make_text_dataset([pattern], tmp_path / "two", val_docs=3, tokens_per_shard=2000, workers=2)
    files_one = sorted(p.name for p in one.data_path.iterdir())
    assert files_one == sorted(p.name for p in two.data_path.iterdir())
    for name in files_one:
        assert (one.data_path / name).read_bytes() == (two.data_path / name).read_bytes()
    processor = spm.SentencePieceProcessor(model_file=str(one.tokenizer_path))
    val = _ids(one.data_path, "val")
    assert val.tolist() == [t for d in DOCS[:3] for t in [1, *processor.encode(d)]]
    assert int((_ids(one.data_path, "train") == 1).sum()) == 28
    assert one.stats["docs_val"] == 3 and one.stats["docs_train"] == 28


def test_blank_mode_and_default_val_split(corpus, tmp_path, capsys):
    code = main(["data", "text", "--input", str(corpus / "*.txt"), str(corpus / "zdeep" / "rest.txt"),
                 "--split", "blank", "--out", str(tmp_path / "out"), "--workers", "2"])  # fmt: skip
    assert code == 0
    blocks = [b for d in DOCS for b in d.split("\n\n")]
    data = tmp_path / "out" / "datasets" / "fineweb10B_sp1024"
    assert int((_ids(data, "val") == 1).sum()) == max(1, round(len(blocks) * 0.01))
    assert int((_ids(data, "val") == 1).sum()) + int((_ids(data, "train") == 1).sum()) == len(blocks)
    assert capsys.readouterr().out.splitlines()[-2] == f"DATA_PATH={data}"


def test_reuse_tokenizer(corpus, tmp_path):
    first = make_text_dataset([str(corpus / "*.txt")], tmp_path / "a", val_docs=2)
    rest = str(corpus / "zdeep" / "*.txt")
    second = make_text_dataset([rest], tmp_path / "b", val_docs=1, split="blank", tokenizer_model=first.tokenizer_path)
    assert second.tokenizer_path.read_bytes() == first.tokenizer_path.read_bytes()


def test_empty_glob(tmp_path):
    with pytest.raises(UserError, match=r"no files match"):
        find_inputs([str(tmp_path / "*.txt")])


def test_bad_inputs(tmp_path):
    (tmp_path / "one.txt").write_text("only one document", encoding="utf-8")
    with pytest.raises(UserError, match=r"one\.txt: 1 non-empty document.*--split blank"):
        make_text_dataset([str(tmp_path / "one.txt")], tmp_path / "out")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n\nsecond")
    with pytest.raises(UserError, match=r"bad\.txt: not UTF-8 text.*--encoding-errors replace"):
        make_text_dataset([str(tmp_path / "bad.txt")], tmp_path / "out", split="blank")
    (tmp_path / "two.txt").write_text("a\n\nb", encoding="utf-8")
    with pytest.raises(UserError, match=r"--val-docs 2 leaves no train documents"):
        make_text_dataset([str(tmp_path / "two.txt")], tmp_path / "out", split="blank", val_docs=2)
    assert not (tmp_path / "out").exists()
