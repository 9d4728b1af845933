"""Dataset tooling: sample corpora, tokenizers, shards in the challenge format, FineWeb download."""
