"""SentencePiece BPE tokenizers trained with the challenge's upstream settings, deterministically.

Upstream settings: model_type bpe, byte_fallback, split_digits, nmt_nfkc normalisation, no dummy prefix,
pad 0 / bos 1 / eos 2 / unk 3, character_coverage 0.999, hard_vocab_limit false. Determinism: the trainer runs
on one thread with a fixed random seed, reads the sentences we give it in our order (input_sentence_size 0, so
it samples nothing), and writes the model through `model_writer`, so no temporary path ends up inside the
model; the `.vocab` file is written from the trained model the way SentencePiece writes it (piece, tab, score).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from builder.data.files import atomic_write_bytes

VOCAB_SIZES = (1024, 8192)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TRAINER_SEED = 1337
# SentencePiece skips training sentences longer than this many bytes; longer lines are cut at spaces first.
MAX_SENTENCE_BYTES = 4096

UPSTREAM_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": PAD_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "unk_id": UNK_ID,
    "hard_vocab_limit": False,
}


def tokenizer_stem(vocab_size: int) -> str:
    """`fineweb_<V>_bpe`, the upstream file stem of the tokenizer for vocabulary size V."""
    return f"fineweb_{vocab_size}_bpe"


def dataset_name(vocab_size: int) -> str:
    """`fineweb10B_sp<V>`, the upstream dataset folder name for vocabulary size V."""
    return f"fineweb10B_sp{vocab_size}"


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """The lines of the documents, without blank ones, cut at spaces into pieces SentencePiece will not skip."""
    for document in documents:
        for line in document.replace("\x00", " ").splitlines():
            line = line.strip()
            while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                cut = line.rfind(" ", 0, MAX_SENTENCE_BYTES // 4)
                cut = cut if cut > 0 else MAX_SENTENCE_BYTES // 4
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


def train_model(documents: Iterable[str], vocab_size: int) -> bytes:
    """Train a BPE model on `documents` with the upstream settings; return the serialized model."""
    spm.set_random_generator_seed(TRAINER_SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(documents),
        model_writer=model,
        vocab_size=vocab_size,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
        **UPSTREAM_SETTINGS,
    )
    return model.getvalue()


def vocab_text(processor: spm.SentencePieceProcessor) -> str:
    """The `.vocab` file of a model: one `piece<TAB>score` line per id."""
    lines = []
    for token_id in range(processor.get_piece_size()):
        lines.append(f"{processor.id_to_piece(token_id)}\t{processor.get_score(token_id):g}\n")
    return "".join(lines)


def save_model(model_bytes: bytes, model_path: Path) -> spm.SentencePieceProcessor:
    """Write `<stem>.model` and `<stem>.vocab` atomically; return the loaded processor."""
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    model_path = Path(model_path)
    atomic_write_bytes(model_path, model_bytes)
    atomic_write_bytes(model_path.with_suffix(".vocab"), vocab_text(processor).encode("utf-8"))
    return processor


def load_processor(model_path: Path) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file."""
    return spm.SentencePieceProcessor(model_file=str(model_path))
