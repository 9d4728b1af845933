"""`builder data text`: a dataset from local text files, for proxy corpora where FineWeb cannot be downloaded.

Documents are whole files (`--split file`) or blank-line-separated blocks of each file (`--split blank`), in the
sorted order of the matched paths; empty documents are skipped. The tokenizer is trained on the first
`--tokenizer-docs` documents (or an existing model is reused), then all documents are encoded on `--workers`
processes, in order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from builder.cli import UserError
from builder.data import tokenizer as tok
from builder.data.export import UPSTREAM_SHARD_TOKENS, ExportResult, export_dataset

SPLIT_MODES = ("file", "blank")
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_TOKENIZER_DOCS = 100_000
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def find_inputs(patterns: list[str]) -> list[Path]:
    """The files matched by the glob patterns (or named directly), sorted, without repeats."""
    found: set[str] = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        found.update(match for match in matches if os.path.isfile(match))
    if not found:
        shown = " ".join(repr(p) for p in patterns)
        raise UserError(
            f"--input {shown}: no files match; check the path, and quote the pattern so the shell does not expand it"
        )
    return [Path(match) for match in sorted(found)]


def _read_text(path: Path, errors: str) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8 or pass --encoding-errors replace"
        ) from exc


def iter_documents(paths: list[Path], split: str = "file", errors: str = "strict") -> Iterator[str]:
    """The documents of the files, in order: one per file, or one per blank-line-separated block."""
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    for path in paths:
        text = _read_text(path, errors).replace("\r\n", "\n")
        blocks = [text] if split == "file" else _BLANK_LINES.split(text)
        for block in blocks:
            block = block.strip()
            if block:
                yield block


def make_text_dataset(
    patterns: list[str],
    out_dir: Path,
    *,
    vocab_size: int = 1024,
    split: str = "file",
    val_docs: int | None = None,
    tokens_per_shard: int = UPSTREAM_SHARD_TOKENS,
    workers: int = 1,
    tokenizer_docs: int = DEFAULT_TOKENIZER_DOCS,
    tokenizer_model: Path | None = None,
    errors: str = "strict",
) -> ExportResult:
    """Tokenize local text files into the upstream layout under `out_dir`."""
    try:
        tok.check_vocab_size(vocab_size)
    except tok.VocabSizeError as exc:
        raise UserError(str(exc)) from exc
    paths = find_inputs(patterns)
    total = sum(1 for _ in tqdm(iter_documents(paths, split, errors), desc="counting documents", unit="doc"))
    if total < 2:
        raise UserError(
            f"{paths[0]}: {total} non-empty document(s) in {len(paths)} file(s); need at least 2 (one val, one train)"
            + ("; try --split blank" if split == "file" else "")
        )
    if val_docs is None:
        val_docs = max(1, round(total * DEFAULT_VAL_FRACTION))
    if val_docs >= total:
        raise UserError(f"--val-docs {val_docs} leaves no train documents out of {total}; lower --val-docs")

    if tokenizer_model is not None:
        model_bytes = _load_model(Path(tokenizer_model), vocab_size)
        trained_on = None
    else:
        trained_on = min(total, tokenizer_docs)
        try:
            model_bytes = tok.train_model(islice(iter_documents(paths, split, errors), trained_on), vocab_size)
        except tok.VocabSizeError as exc:
            raise UserError(f"{paths[0]}: {exc}") from exc
    source = {
        "command": "text",
        "files": len(paths),
        "split": split,
        "tokenizer_docs": trained_on,
        "tokenizer_reused": tokenizer_model is not None,
    }
    return export_dataset(
        iter_documents(paths, split, errors),
        model_bytes=model_bytes,
        vocab_size=vocab_size,
        out_dir=out_dir,
        val_docs=val_docs,
        tokens_per_shard=tokens_per_shard,
        workers=workers,
        total_docs=total,
        source=source,
    )


def _load_model(path: Path, vocab_size: int) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: tokenizer model not found; pass an existing .model file or leave out --tokenizer")
    model_bytes = path.read_bytes()
    try:
        processor = tok.spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError as exc:
        raise UserError(f"{path}: not a SentencePiece model ({exc}); pass a .model file") from exc
    if processor.get_piece_size() > vocab_size:
        raise UserError(
            f"{path}: the model has {processor.get_piece_size()} pieces, more than --vocab {vocab_size}; "
            "pass the matching --vocab"
        )
    if processor.bos_id() != tok.BOS_ID:
        raise UserError(f"{path}: BOS id is {processor.bos_id()}, the shards need {tok.BOS_ID}; use another model")
    return model_bytes
