"""`builder data sample`: a small English-like dataset made with no network, byte-identical for the same arguments."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from builder.cli import UserError
from builder.data import tokenizer as tok
from builder.data.corpus import generate_documents
from builder.data.export import ExportResult, export_dataset

# ~256 tokens per document with the 1024 vocabulary: 10,000 documents give ~2.5M train tokens (a few hundred
# steps of 8K tokens) and the first 256 documents a val split of ~65K tokens.
DEFAULT_DOCS = 10_000
DEFAULT_VAL_DOCS = 256  # at most: a small --docs keeps 9/10 of its documents for train
DEFAULT_SHARD_TOKENS = 1_000_000


def default_val_docs(docs: int) -> int:
    """The default size of the val split for `docs` documents."""
    return max(1, min(DEFAULT_VAL_DOCS, docs // 10))


def make_sample(
    out_dir: Path,
    *,
    docs: int = DEFAULT_DOCS,
    seed: int = 0,
    vocab_size: int = 1024,
    val_docs: int | None = None,
    tokens_per_shard: int = DEFAULT_SHARD_TOKENS,
    tokenizer_docs: int | None = None,
) -> ExportResult:
    """Generate `docs` documents, train the tokenizer on them (or on the first `tokenizer_docs`), write shards.

    The val split is the first `val_docs` documents; by default min(256, docs // 10), at least one.
    """
    if docs < 2:
        raise UserError(f"--docs {docs}: a dataset needs at least 2 documents (one val, one train); pass --docs 2+")
    if val_docs is None:
        val_docs = default_val_docs(docs)
    if val_docs >= docs:
        raise UserError(f"--val-docs {val_docs} leaves no train documents out of --docs {docs}; lower --val-docs")
    try:
        tok.check_vocab_size(vocab_size)
    except tok.VocabSizeError as exc:
        raise UserError(str(exc)) from exc
    documents = list(tqdm(generate_documents(docs, seed), total=docs, desc="generating", unit="doc"))
    train_docs = documents if tokenizer_docs is None else documents[: max(1, tokenizer_docs)]
    try:
        model_bytes = tok.train_model(train_docs, vocab_size)
    except tok.VocabSizeError as exc:
        raise UserError(str(exc)) from exc
    source = {
        "command": "sample",
        "generator": "builder.data.corpus",
        "seed": seed,
        "docs": docs,
        "tokenizer_docs": len(train_docs),
    }
    return export_dataset(
        documents,
        model_bytes=model_bytes,
        vocab_size=vocab_size,
        out_dir=out_dir,
        val_docs=val_docs,
        tokens_per_shard=tokens_per_shard,
        total_docs=docs,
        source=source,
    )
