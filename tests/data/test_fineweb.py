"""`builder data fineweb`: from a local fake export in the published layout, and through a stand-in hub."""

from __future__ import annotations

import json

import huggingface_hub
import numpy as np
import pytest

from builder.cli import UserError
from builder.data import fineweb, shards
from builder.data import tokenizer as tok
from builder.data.corpus import generate_documents

NAME = "fineweb10B_sp1024"


def make_export(root, train_files=3, val_files=1):
    """A tiny export in the layout under the published repo's datasets/ folder, written with our shard writer."""
    rng = np.random.default_rng(0)
    for split, count in (("val", val_files), ("train", train_files)):
        for index in range(count):
            tokens = rng.integers(0, 1024, size=500 + index, dtype=np.uint16)
            tokens[0] = tok.BOS_ID
            shards.write_shard(root / "datasets" / NAME / shards.shard_name(split, index), tokens)
    model_bytes = tok.train_model(generate_documents(40, seed=2), 1024)
    tok.save_model(model_bytes, root / "tokenizers" / "fineweb_1024_bpe.model")
    manifest = {
        "version": "10B",
        "datasets": [
            {"name": NAME, "tokenizer_name": "sp_bpe_1024", "vocab_size": 1024,
             "stats": {"files_val": val_files, "files_train": train_files}},
        ],
        "tokenizers": [
            {"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
             "model_path": "tokenizers/fineweb_1024_bpe.model", "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"},
        ],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("export"))


def test_local_export_prefix_of_train_shards(export, tmp_path):
    result = fineweb.fetch_fineweb("sp1024", 2, tmp_path / "data", source=str(export))
    data = tmp_path / "data" / "datasets" / NAME
    assert result.data_path == data
    assert result.tokenizer_path == tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    assert sorted(p.name for p in data.iterdir()) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_val_000000.bin",
    ]
    for path in data.iterdir():
        assert path.read_bytes() == (export / "datasets" / NAME / path.name).read_bytes()
    assert (tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.vocab").is_file()
    assert (tmp_path / "data" / "manifest.json").read_bytes() == (export / "manifest.json").read_bytes()
    assert result.stats == {"files_val": 1, "files_train": 2, "tokens_val": 500, "tokens_train": 1001}


def test_repo_shaped_folder_is_accepted(export, tmp_path):
    repo = tmp_path / "repo"
    (repo / "datasets").mkdir(parents=True)
    for item in export.iterdir():
        (repo / "datasets" / item.name).symlink_to(item)
    result = fineweb.fetch_fineweb("sp1024", 1, tmp_path / "out", source=str(repo))
    assert shards.read_header(result.data_path / "fineweb_train_000000.bin") == 500


def test_missing_shard(tmp_path):
    export = make_export(tmp_path / "export")
    (export / "datasets" / NAME / "fineweb_train_000001.bin").unlink()
    with pytest.raises(UserError, match=r"fineweb_train_000001\.bin: missing from the export"):
        fineweb.fetch_fineweb("sp1024", 3, tmp_path / "out", source=str(export))
    assert not (tmp_path / "out").exists()


def test_bad_shards_are_refused(tmp_path):
    export = make_export(tmp_path / "export")
    bad = export / "datasets" / NAME / "fineweb_train_000000.bin"
    bad.write_bytes(b"\0" * 2000)
    with pytest.raises(shards.ShardError, match=r"fineweb_train_000000\.bin: bad magic 0"):
        fineweb.fetch_fineweb("sp1024", 1, tmp_path / "out", source=str(export))
    shards.write_shard(bad, np.array([1, 5000], dtype=np.uint16))
    with pytest.raises(shards.ShardError, match=r"token id 5000 is outside the vocabulary of 1024"):
        fineweb.fetch_fineweb("sp1024", 1, tmp_path / "out", source=str(export))
    assert not (tmp_path / "out" / "datasets" / NAME / bad.name).exists()


def test_manifest_errors(export, tmp_path):
    with pytest.raises(UserError, match=r"manifest\.json: .* has 3 train shards, --train-shards 4"):
        fineweb.fetch_fineweb("sp1024", 4, tmp_path / "out", source=str(export))
    with pytest.raises(UserError, match=r"no dataset fineweb10B_sp8192 \(it has: fineweb10B_sp1024\)"):
        fineweb.fetch_fineweb("sp8192", 1, tmp_path / "out", source=str(export))
    with pytest.raises(UserError, match=r"--variant byte260: expected sp<VOCAB>"):
        fineweb.fetch_fineweb("byte260", 1, tmp_path / "out", source=str(export))
    with pytest.raises(UserError, match=r"manifest\.json: missing"):
        fineweb.fetch_fineweb("sp1024", 1, tmp_path / "out", source=str(tmp_path))
    with pytest.raises(UserError, match=r"no such folder"):
        fineweb.fetch_fineweb("sp1024", 1, tmp_path / "out", source=str(tmp_path / "absent"))


class FakeHub:
    """Serves files of a repo-shaped folder the way hf_hub_download / snapshot_download return them."""

    def __init__(self, repo_folder):
        self.repo_folder = repo_folder
        self.calls = []

    def hf_hub_download(self, *, repo_id, filename, repo_type):
        self.calls.append(("file", repo_id, repo_type, filename))
        return str(self.repo_folder / filename)

    def snapshot_download(self, *, repo_id, repo_type, allow_patterns):
        self.calls.append(("snapshot", repo_id, repo_type, tuple(allow_patterns)))
        return str(self.repo_folder)


def test_hub_source(export, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "datasets").symlink_to(export)
    hub = FakeHub(repo)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    result = fineweb.fetch_fineweb("sp1024", 1, tmp_path / "out")
    assert hub.calls[0] == ("file", "willdepueoai/parameter-golf", "dataset", "datasets/manifest.json")
    requested = {name for call in hub.calls[1:] for name in call[3]}
    assert requested == {
        "datasets/tokenizers/fineweb_1024_bpe.model",
        "datasets/tokenizers/fineweb_1024_bpe.vocab",
        f"datasets/datasets/{NAME}/fineweb_val_000000.bin",
        f"datasets/datasets/{NAME}/fineweb_train_000000.bin",
    }
    assert all(call[1] == "willdepueoai/parameter-golf" and call[2] == "dataset" for call in hub.calls)
    assert shards.read_header(result.data_path / "fineweb_val_000000.bin") == 500


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise ConnectionError("could not reach huggingface.co\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError) as caught:
        fineweb.fetch_fineweb("sp8192", 1, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("kevclark/parameter-golf:datasets/manifest.json: download failed (ConnectionError")


def test_sample_output_is_a_local_export(tmp_path):
    from builder.data.sample import make_sample

    made = make_sample(tmp_path / "made", docs=40, val_docs=4, tokens_per_shard=2000)
    fetched = fineweb.fetch_fineweb("sp1024", 2, tmp_path / "copy", source=str(tmp_path / "made"))
    names = sorted(p.name for p in fetched.data_path.iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    for name in names:
        assert (fetched.data_path / name).read_bytes() == (made.data_path / name).read_bytes()
