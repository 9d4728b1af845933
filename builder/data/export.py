"""Documents -> tokenizer + shards in the upstream data layout, shared by `builder data sample` and `text`.

Layout under the output folder (as upstream's cached_challenge_fineweb data folder):
`datasets/fineweb10B_sp<V>/fineweb_{val,train}_NNNNNN.bin`, `tokenizers/fineweb_<V>_bpe.{model,vocab}` and a
`manifest.json` in the upstream shape (datasets and tokenizers with their stats), merged with entries of other
vocabulary sizes already there. Every document is encoded, prefixed with BOS (id 1) and appended to the stream
of its split; the first `val_docs` documents are the val split. The dataset folder is built beside its final
place and swapped in at the end, so a failed run leaves the previous output untouched.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from builder.cli import UserError
from builder.data import tokenizer as tok
from builder.data.files import atomic_write_bytes, make_staging_dir, replace_dir
from builder.data.shards import ShardWriter

UPSTREAM_SHARD_TOKENS = 100_000_000
ENCODE_BATCH_DOCS = 256


@dataclass
class ExportResult:
    """Where the dataset landed and what it holds."""

    data_path: Path
    tokenizer_path: Path
    stats: dict[str, int] = field(default_factory=dict)


_worker_processor = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_processor
    _worker_processor = tok.spm.SentencePieceProcessor(model_proto=model_bytes)


def _encode_batch(documents: list[str]) -> list[np.ndarray]:
    """Each document's ids with BOS in front, as uint16."""
    encoded = _worker_processor.encode(documents, out_type=int)
    out = []
    for ids in encoded:
        array = np.empty(len(ids) + 1, dtype=np.uint16)
        array[0] = tok.BOS_ID
        array[1:] = ids
        out.append(array)
    return out


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(documents)
    while batch := list(islice(iterator, size)):
        yield batch


def encode_documents(documents: Iterable[str], model_bytes: bytes, workers: int = 1) -> Iterator[np.ndarray]:
    """Encode documents in order (BOS first in each), on `workers` processes when more than one."""
    batches = _batches(documents, ENCODE_BATCH_DOCS)
    if workers <= 1:
        _init_worker(model_bytes)
        for batch in batches:
            yield from _encode_batch(batch)
        return
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(model_bytes,)) as pool:
        for encoded in pool.imap(_encode_batch, batches, chunksize=1):
            yield from encoded


def _read_manifest(path: Path) -> dict:
    """The manifest already in the output folder (empty when there is none); refuse one that is not JSON."""
    if not path.is_file():
        return {"datasets": [], "tokenizers": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); delete it or choose another --out") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object; delete it or choose another --out")
    return manifest


def _merge_manifest(path: Path, manifest: dict, dataset_entry: dict, tokenizer_entry: dict) -> None:
    """Write `manifest.json`, replacing entries of the same names and keeping those of other variants."""
    for key, entry in (("datasets", dataset_entry), ("tokenizers", tokenizer_entry)):
        kept = [item for item in manifest.get(key, []) if isinstance(item, dict) and item.get("name") != entry["name"]]
        manifest[key] = sorted([*kept, entry], key=lambda item: str(item.get("name")))
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def export_dataset(
    documents: Iterable[str],
    *,
    model_bytes: bytes,
    vocab_size: int,
    out_dir: Path,
    val_docs: int,
    tokens_per_shard: int = UPSTREAM_SHARD_TOKENS,
    workers: int = 1,
    total_docs: int | None = None,
    source: dict | None = None,
) -> ExportResult:
    """Save the tokenizer, encode `documents` into val then train shards, and write the manifest."""
    if val_docs < 1:
        raise UserError(f"--val-docs {val_docs}: the val split needs at least one document; pass --val-docs 1 or more")
    if tokens_per_shard < 1:
        raise UserError(f"--shard-tokens {tokens_per_shard}: must be positive; pass e.g. {UPSTREAM_SHARD_TOKENS}")
    out_dir = Path(out_dir)
    name = tok.dataset_name(vocab_size)
    stem = tok.tokenizer_stem(vocab_size)
    datasets_dir = out_dir / "datasets"
    model_path = out_dir / "tokenizers" / f"{stem}.model"
    processor = tok.spm.SentencePieceProcessor(model_proto=model_bytes)
    piece_count = processor.get_piece_size()
    manifest = _read_manifest(out_dir / "manifest.json")

    staging = make_staging_dir(datasets_dir, name)
    try:
        writers = {split: ShardWriter(staging, split, tokens_per_shard) for split in ("val", "train")}
        docs = {"val": 0, "train": 0}
        encoded = encode_documents(documents, model_bytes, workers)
        for index, ids in enumerate(tqdm(encoded, total=total_docs, desc=f"encoding {name}", unit="doc")):
            split = "val" if index < val_docs else "train"
            writers[split].add(ids)
            docs[split] += 1
        if docs["train"] == 0:
            raise UserError(
                f"{out_dir}: only {docs['val']} documents, all taken by the val split (--val-docs {val_docs}); "
                "lower --val-docs or give more documents"
            )
        paths = {split: writer.close() for split, writer in writers.items()}
        stats = {
            "docs_total": docs["val"] + docs["train"],
            "docs_val": docs["val"],
            "docs_train": docs["train"],
            "files_val": len(paths["val"]),
            "files_train": len(paths["train"]),
            "tokens_val": writers["val"].tokens_written,
            "tokens_train": writers["train"].tokens_written,
        }
        tok.save_model(model_bytes, model_path)
        replace_dir(staging, datasets_dir / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    tokenizer_name = f"sp_bpe_{vocab_size}"
    dataset_entry = {
        "name": name,
        "tokenizer_name": tokenizer_name,
        "tokenizer_kind": "sentencepiece_bpe",
        "path": f"datasets/{name}",
        "train_glob": f"datasets/{name}/fineweb_train_*.bin",
        "val_glob": f"datasets/{name}/fineweb_val_*.bin",
        "vocab_size": vocab_size,
        "bos_id": tok.BOS_ID,
        "eos_id": tok.EOS_ID,
        "append_eos": False,
        "shard_size": tokens_per_shard,
        "stats": stats,
        "source": source or {},
    }
    tokenizer_entry = {
        "name": tokenizer_name,
        "kind": "sentencepiece_bpe",
        "vocab_size": vocab_size,
        "pieces": piece_count,
        "bos_id": tok.BOS_ID,
        "eos_id": tok.EOS_ID,
        "model_path": f"tokenizers/{stem}.model",
        "vocab_path": f"tokenizers/{stem}.vocab",
        "settings": tok.settings_for(vocab_size),
    }
    _merge_manifest(out_dir / "manifest.json", manifest, dataset_entry, tokenizer_entry)
    return ExportResult(data_path=datasets_dir / name, tokenizer_path=model_path, stats=stats)
