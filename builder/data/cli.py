"""`builder data ...`: argument parsing and dispatch for the sample, text and fineweb subcommands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from builder.data import fineweb, sample, text
from builder.data.export import ExportResult
from builder.data.tokenizer import SMALL_VOCAB_MAX, SMALL_VOCAB_MIN

VOCAB_HELP = f"tokenizer vocabulary size: 1024 (default), 4096, 8192, or {SMALL_VOCAB_MIN}..{SMALL_VOCAB_MAX} for tests"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_sample(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sample", help="make a small English-like dataset from a seeded generator (no network)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (datasets/, tokenizers/, manifest)")
    parser.add_argument("--docs", type=_positive, default=sample.DEFAULT_DOCS, help="number of documents")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; same arguments give identical bytes")
    parser.add_argument("--vocab", type=int, default=1024, help=VOCAB_HELP)
    parser.add_argument(
        "--val-docs",
        type=_positive,
        default=None,
        help="the first N documents form the val split (default: min(256, docs/10))",
    )
    parser.add_argument(
        "--shard-tokens", type=_positive, default=sample.DEFAULT_SHARD_TOKENS, help="tokens per shard file"
    )
    parser.add_argument(
        "--tokenizer-docs", type=_positive, default=None, help="train the tokenizer on the first N documents only"
    )


def _add_text(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("text", help="make a dataset from local text files (proxy corpora)")
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="GLOB", help="files or quoted glob patterns ('**' recurses)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (datasets/, tokenizers/, manifest)")
    parser.add_argument("--vocab", type=int, default=1024, help=VOCAB_HELP)
    parser.add_argument(
        "--split", choices=text.SPLIT_MODES, default="file", help="one document per file, or per blank-line block"
    )
    parser.add_argument(
        "--val-docs", type=_positive, default=None, help="the first N documents form the val split (default: 1%%)"
    )
    parser.add_argument("--shard-tokens", type=_positive, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1), help="tokenisation processes")
    parser.add_argument(
        "--tokenizer-docs",
        type=_positive,
        default=text.DEFAULT_TOKENIZER_DOCS,
        help="train the tokenizer on the first N documents",
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="reuse this .model instead of training one")
    parser.add_argument(
        "--encoding-errors", choices=("strict", "replace"), default="strict", help="what to do with bad UTF-8"
    )


def _add_fineweb(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fineweb", help="download the published challenge FineWeb export (or copy a local one)")
    parser.add_argument("--variant", default="sp1024", help="tokenizer variant: sp1024 or sp8192")
    parser.add_argument(
        "--train-shards", type=int, default=80, help="how many train shards (100M tokens each) to fetch"
    )
    parser.add_argument(
        "--source",
        default=None,
        help="Hugging Face dataset repo id or local export folder (default: willdepueoai/parameter-golf for "
        "sp1024, kevclark/parameter-golf for sp8192)",
    )
    parser.add_argument(
        "--remote-root", default=fineweb.DEFAULT_REMOTE_ROOT, help="export root inside the repo (default: datasets)"
    )
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: ./data)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `sample`, `text` and `fineweb` subcommands to the `builder data` parser."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="{sample,text,fineweb}")
    _add_sample(sub)
    _add_text(sub)
    _add_fineweb(sub)


def _report(result: ExportResult) -> None:
    stats = result.stats
    if "docs_val" in stats:
        print(
            f"val: {stats['docs_val']} docs, {stats['tokens_val']} tokens in {stats['files_val']} shard(s); "
            f"train: {stats['docs_train']} docs, {stats['tokens_train']} tokens in {stats['files_train']} shard(s)"
        )
    elif stats:
        print(
            f"val: {stats['tokens_val']} tokens in {stats['files_val']} shard(s); "
            f"train: {stats['tokens_train']} tokens in {stats['files_train']} shard(s); all shards validated"
        )
    print(f"DATA_PATH={result.data_path}")
    print(f"TOKENIZER_PATH={result.tokenizer_path}")


def run(args: argparse.Namespace) -> int:
    """Run the chosen `builder data` subcommand; bad input raises UserError (exit 2)."""
    if args.data_command == "sample":
        result = sample.make_sample(
            args.out,
            docs=args.docs,
            seed=args.seed,
            vocab_size=args.vocab,
            val_docs=args.val_docs,
            tokens_per_shard=args.shard_tokens,
            tokenizer_docs=args.tokenizer_docs,
        )
    elif args.data_command == "text":
        result = text.make_text_dataset(
            args.input,
            args.out,
            vocab_size=args.vocab,
            split=args.split,
            val_docs=args.val_docs,
            tokens_per_shard=args.shard_tokens,
            workers=args.workers,
            tokenizer_docs=args.tokenizer_docs,
            tokenizer_model=args.tokenizer,
            errors=args.encoding_errors,
        )
    elif args.data_command == "fineweb":
        result = fineweb.fetch_fineweb(
            args.variant, args.train_shards, args.out, source=args.source, remote_root=args.remote_root
        )
    else:
        raise AssertionError(f"unknown data command {args.data_command}")
    _report(result)
    return 0
