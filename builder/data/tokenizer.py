"""SentencePiece BPE tokenizers trained with the challenge's upstream settings, deterministically.

Upstream settings: model_type bpe, byte_fallback, split_digits, nmt_nfkc normalisation, no dummy prefix,
pad 0 / bos 1 / eos 2 / unk 3, character_coverage 0.999, hard_vocab_limit false. Determinism: the trainer runs
on one thread with a fixed random seed, reads the sentences we give it in our order (input_sentence_size 0, so
it samples nothing), and writes the model through `model_writer`, so no temporary path ends up inside the
model; the `.vocab` file is written from the trained model the way SentencePiece writes it (piece, tab, score).

Vocabulary sizes: upstream's 1024, 4096 and 8192 with exactly those settings, and small sizes from 64 to 1023 for
tests. The 256 byte-fallback pieces would not fit or would take most of a small vocabulary, so a small size
trains without byte fallback and with character coverage 1.0: every character of the training text gets a piece
of its own (the size must be at least the number of distinct characters plus the four special pieces), and a
character never seen in training encodes to unk.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from builder.data.files import atomic_write_bytes

UPSTREAM_VOCAB_SIZES = (1024, 4096, 8192)
SMALL_VOCAB_MIN, SMALL_VOCAB_MAX = 64, 1023  # test sizes: below upstream's smallest
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TRAINER_SEED = 1337
# SentencePiece skips training sentences longer than this many bytes; longer lines are cut at spaces first.
MAX_SENTENCE_BYTES = 4096

# upstream's trainer settings (a compatibility fact): BPE, byte fallback, digits split, NFKC, no dummy prefix
UPSTREAM_SETTINGS = dict(
    model_type="bpe",
    normalization_rule_name="nmt_nfkc",
    character_coverage=0.999,
    hard_vocab_limit=False,
    add_dummy_prefix=False,
    split_digits=True,
    byte_fallback=True,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=PAD_ID,
)


# what a small vocabulary changes (see the module docstring)
SMALL_VOCAB_SETTINGS = {"byte_fallback": False, "character_coverage": 1.0}
_REQUIRED_CHARS = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class VocabSizeError(ValueError):
    """The vocabulary size is not supported, or too small for the training text; the message says what fits."""


def check_vocab_size(vocab_size: int) -> int:
    """`vocab_size` if supported (upstream's sizes or a small test size); VocabSizeError otherwise."""
    if vocab_size in UPSTREAM_VOCAB_SIZES or SMALL_VOCAB_MIN <= vocab_size <= SMALL_VOCAB_MAX:
        return vocab_size
    sizes = ", ".join(str(v) for v in UPSTREAM_VOCAB_SIZES)
    small = f"{SMALL_VOCAB_MIN}..{SMALL_VOCAB_MAX}"
    raise VocabSizeError(f"--vocab {vocab_size}: supported sizes are upstream's {sizes}, or {small} for tests")


def is_small_vocab(vocab_size: int) -> bool:
    """True for the test sizes, which train without byte fallback."""
    return vocab_size < min(UPSTREAM_VOCAB_SIZES)


def settings_for(vocab_size: int) -> dict:
    """The trainer settings of a vocabulary size: upstream's, with the small-vocabulary changes below 1024."""
    check_vocab_size(vocab_size)
    return {**UPSTREAM_SETTINGS, **(SMALL_VOCAB_SETTINGS if is_small_vocab(vocab_size) else {})}


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
    """Train a BPE model on `documents` with the settings of `vocab_size`; return the serialized model.

    Raises VocabSizeError when the size is unsupported or smaller than the text's characters need.
    """
    settings = settings_for(vocab_size)
    spm.set_random_generator_seed(TRAINER_SEED)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(documents),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
            **settings,
        )
    except RuntimeError as exc:
        found = _REQUIRED_CHARS.search(str(exc))
        if not found:
            raise
        need = int(found.group(2))
        byte_pieces = "" if is_small_vocab(vocab_size) else " and the 256 byte pieces"
        raise VocabSizeError(
            f"--vocab {vocab_size}: the training text needs at least {need} pieces (its characters plus the special "
            f"ones{byte_pieces}); {fitting_vocab_hint(vocab_size, need)}"
        ) from exc
    return model.getvalue()


def fitting_vocab_hint(vocab_size: int, need: int) -> str:
    """What to pass when the training text needs `need` pieces: a supported size that holds them, and for upstream's
    sizes more tokenizer text (coverage 0.999 leaves the rarest 0.1% of characters to byte fallback, so a few files
    dense in rare characters, such as Unicode tables, stop needing pieces once enough ordinary text surrounds them)."""
    if is_small_vocab(vocab_size):
        if need <= SMALL_VOCAB_MAX:
            return f"pass --vocab {need} or more"
        return f"pass --vocab {min(UPSTREAM_VOCAB_SIZES)} or more (byte fallback covers rare characters there)"
    more_text = "train the tokenizer on more documents (--tokenizer-docs) to push rare characters under coverage 0.999"
    fits = [size for size in UPSTREAM_VOCAB_SIZES if size >= need]
    return f"pass --vocab {fits[0]}, or {more_text}" if fits else more_text


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
