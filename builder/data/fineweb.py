"""`builder data fineweb`: fetch the published challenge FineWeb export (or a local copy of it) and validate it.

The published export is a Hugging Face dataset repo whose export root (`datasets/` by default) holds
`manifest.json`, `datasets/fineweb10B_sp<V>/fineweb_{val,train}_NNNNNN.bin` and `tokenizers/fineweb_<V>_bpe.*`.
The manifest says how many val and train shards a variant has and which tokenizer files belong to it. All val
shards are fetched, and the first `--train-shards` train shards. `--source` is a repo id or a local folder with
the same layout (the export root itself, or a folder holding it). Every shard is validated (header, size, ids
below the tokenizer's vocabulary) before it is placed, by hard link or copy, under a temporary name and renamed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from builder.cli import UserError
from builder.data import tokenizer as tok
from builder.data.export import ExportResult
from builder.data.files import atomic_link_or_copy
from builder.data.shards import shard_name, validate_shard

DEFAULT_REMOTE_ROOT = "datasets"
# sp1024 is published in the challenge's own repo; the sp8192 export the records use lives in kevclark's.
DEFAULT_SOURCES = {"sp1024": "willdepueoai/parameter-golf", "sp8192": "kevclark/parameter-golf"}
VARIANT_PATTERN = re.compile(r"sp(\d+)")
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Source:
    """Where export files come from: a local export root, or a repo id and the export root inside it."""

    local_root: Path | None = None
    repo_id: str | None = None
    remote_root: str = DEFAULT_REMOTE_ROOT

    def describe(self, relative: str) -> str:
        if self.local_root is not None:
            return str(self.local_root / relative)
        prefix = f"{self.remote_root}/" if self.remote_root else ""
        return f"{self.repo_id}:{prefix}{relative}"

    def fetch(self, relatives: list[str]) -> dict[str, Path]:
        """Local paths of the given export-relative files (downloaded into the Hugging Face cache if remote)."""
        if self.local_root is not None:
            found = {rel: self.local_root / rel for rel in relatives}
        else:
            found = self._download(relatives)
        for rel, path in found.items():
            if not path.is_file():
                raise UserError(
                    f"{self.describe(rel)}: missing from the export; check --source/--remote-root, "
                    "or fetch fewer --train-shards"
                )
        return found

    def _download(self, relatives: list[str]) -> dict[str, Path]:
        from huggingface_hub import hf_hub_download, snapshot_download

        prefix = f"{self.remote_root}/" if self.remote_root else ""
        try:
            if len(relatives) == 1:
                path = hf_hub_download(repo_id=self.repo_id, filename=prefix + relatives[0], repo_type="dataset")
                return {relatives[0]: Path(path)}
            folder = snapshot_download(
                repo_id=self.repo_id, repo_type="dataset", allow_patterns=[prefix + rel for rel in relatives]
            )
        except UserError:
            raise
        except Exception as exc:  # network, authentication, missing repo or file: all end the command
            first_line = (str(exc).strip().splitlines() or [""])[0]
            shown = self.describe(relatives[0]) if len(relatives) == 1 else f"{self.repo_id} ({len(relatives)} files)"
            raise UserError(
                f"{shown}: download failed ({type(exc).__name__}: {first_line}); "
                "check the network and --source, or pass a local export folder as --source"
            ) from exc
        return {rel: Path(folder) / (prefix + rel) for rel in relatives}


def resolve_source(source: str, remote_root: str = DEFAULT_REMOTE_ROOT) -> Source:
    """A local folder if `source` names one, else a Hugging Face dataset repo id."""
    path = Path(source).expanduser()
    if path.is_dir():
        for root in (path, path / remote_root) if remote_root else (path,):
            if (root / "manifest.json").is_file():
                return Source(local_root=root)
        raise UserError(
            f"{path / 'manifest.json'}: missing; a local export holds manifest.json, datasets/ and tokenizers/ "
            "(the layout under the published repo's datasets/ folder)"
        )
    if REPO_ID_PATTERN.fullmatch(source) and not source.startswith((".", "~")):
        return Source(repo_id=source, remote_root=remote_root.strip("/"))
    raise UserError(
        f"{source}: no such folder; pass a local export folder or a Hugging Face dataset repo id such as "
        f"{DEFAULT_SOURCES['sp1024']}"
    )


def _load_manifest(path: Path, where: str) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: not valid JSON ({exc}); fetch it again or fix --source") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise UserError(f"{where}: not an export manifest (no 'datasets' list); check --source")
    return manifest


def _plan(manifest: dict, where: str, variant: str, train_shards: int) -> tuple[str, int, list[str], list[str]]:
    """(dataset name, vocabulary size, shard paths, tokenizer paths) to fetch, all export-relative."""
    name = f"fineweb10B_{variant}"
    datasets = {entry.get("name"): entry for entry in manifest["datasets"] if isinstance(entry, dict)}
    if name not in datasets:
        known = ", ".join(sorted(str(n) for n in datasets)) or "none"
        raise UserError(f"{where}: no dataset {name} (it has: {known}); pick another --variant or --source")
    entry = datasets[name]
    stats = entry.get("stats") or {}
    try:
        files_val, files_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: dataset {name} has no stats.files_val/files_train; check --source") from exc
    if train_shards > files_train:
        raise UserError(
            f"{where}: {name} has {files_train} train shards, --train-shards {train_shards} asks for more; "
            f"pass --train-shards {files_train} or fewer"
        )
    tokenizers = {t.get("name"): t for t in manifest.get("tokenizers", []) if isinstance(t, dict)}
    tokenizer = tokenizers.get(entry.get("tokenizer_name"))
    if tokenizer is None or not tokenizer.get("model_path"):
        raise UserError(f"{where}: no tokenizer model listed for {name}; check --source")
    tokenizer_files = [str(tokenizer[key]) for key in ("model_path", "vocab_path") if tokenizer.get(key)]
    for rel in tokenizer_files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise UserError(f"{where}: tokenizer path {rel!r} is not inside the export; fix the manifest or --source")
    vocab_size = int(entry.get("vocab_size") or tokenizer.get("vocab_size") or VARIANT_PATTERN.fullmatch(variant)[1])
    shard_files = [f"datasets/{name}/{shard_name('val', i)}" for i in range(files_val)]
    shard_files += [f"datasets/{name}/{shard_name('train', i)}" for i in range(train_shards)]
    return name, vocab_size, shard_files, tokenizer_files


def fetch_fineweb(
    variant: str,
    train_shards: int,
    out_dir: Path,
    *,
    source: str | None = None,
    remote_root: str = DEFAULT_REMOTE_ROOT,
) -> ExportResult:
    """Fetch a variant's val shards, its first `train_shards` train shards and its tokenizer into `out_dir`."""
    match = VARIANT_PATTERN.fullmatch(variant)
    if match is None:
        raise UserError(f"--variant {variant}: expected sp<VOCAB>, e.g. sp1024 or sp8192")
    if train_shards < 0:
        raise UserError(f"--train-shards {train_shards}: must be 0 or more")
    origin = resolve_source(source or DEFAULT_SOURCES.get(variant, DEFAULT_SOURCES["sp1024"]), remote_root)
    out_dir = Path(out_dir)

    manifest_path = origin.fetch(["manifest.json"])["manifest.json"]
    where = origin.describe("manifest.json")
    manifest = _load_manifest(manifest_path, where)
    name, vocab_size, shard_files, tokenizer_files = _plan(manifest, where, variant, train_shards)

    tokenizer_paths = origin.fetch(tokenizer_files)
    model_rel = tokenizer_files[0]
    try:
        processor = tok.load_processor(tokenizer_paths[model_rel])
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{origin.describe(model_rel)}: not a SentencePiece model ({exc}); fetch it again") from exc
    vocab_size = max(vocab_size, processor.get_piece_size())

    shard_paths = origin.fetch(shard_files)
    tokens = {"val": 0, "train": 0}
    for rel in tqdm(shard_files, desc=f"validating {name}", unit="shard"):
        split = "val" if "/fineweb_val_" in rel else "train"
        tokens[split] += validate_shard(shard_paths[rel], vocab_size=vocab_size)
        atomic_link_or_copy(shard_paths[rel], out_dir / rel)
    for rel, path in tokenizer_paths.items():
        atomic_link_or_copy(path, out_dir / rel)
    atomic_link_or_copy(manifest_path, out_dir / "manifest.json")

    stats = {
        "files_val": sum("/fineweb_val_" in rel for rel in shard_files),
        "files_train": train_shards,
        "tokens_val": tokens["val"],
        "tokens_train": tokens["train"],
    }
    return ExportResult(data_path=out_dir / "datasets" / name, tokenizer_path=out_dir / model_rel, stats=stats)
