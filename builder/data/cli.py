"""`builder data ...`: argument parsing and dispatch for the sample, text and fineweb subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from builder.data import sample
from builder.data.export import ExportResult


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
    parser.add_argument("--vocab", type=int, choices=(1024, 8192), default=1024, help="tokenizer vocabulary size")
    parser.add_argument(
        "--val-docs", type=_positive, default=sample.DEFAULT_VAL_DOCS, help="the first N documents form the val split"
    )
    parser.add_argument(
        "--shard-tokens", type=_positive, default=sample.DEFAULT_SHARD_TOKENS, help="tokens per shard file"
    )
    parser.add_argument(
        "--tokenizer-docs", type=_positive, default=None, help="train the tokenizer on the first N documents only"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `sample`, `text` and `fineweb` subcommands to the `builder data` parser."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="{sample,text,fineweb}")
    _add_sample(sub)


def _report(result: ExportResult) -> None:
    stats = result.stats
    if stats:
        print(
            f"val: {stats['docs_val']} docs, {stats['tokens_val']} tokens in {stats['files_val']} shard(s); "
            f"train: {stats['docs_train']} docs, {stats['tokens_train']} tokens in {stats['files_train']} shard(s)"
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
    else:
        raise AssertionError(f"unknown data command {args.data_command}")
    _report(result)
    return 0
