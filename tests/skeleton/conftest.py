"""Fixtures of the skeleton tests: a tiny sample dataset and the tiny CPU settings of a training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.data.sample import make_sample

# Smallest settings that still run every stage: warm-up, training, a mid-run validation, the wall-clock stop,
# serialisation, read-back and scoring.
TINY_ENV = {
    "VOCAB_SIZE": "1024",
    "MODEL_DIM": "32",
    "NUM_LAYERS": "2",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "256",
    "GRAD_ACCUM_STEPS": "1",
    "ITERATIONS": "4",
    "WARMUP_STEPS": "1",
    "VAL_BATCH_SIZE": "2048",
    "VAL_TOKENS": "2048",
    "VAL_LOSS_EVERY": "2",
    "TRAIN_LOG_EVERY": "1",
    "MAX_WALLCLOCK_SECONDS": "0",
}


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(DATA_PATH, TOKENIZER_PATH) of a small generated dataset, made once per test session."""
    out = tmp_path_factory.mktemp("sample")
    make_sample(out, docs=300, val_docs=40, seed=0)
    data = out / "datasets" / "fineweb10B_sp1024"
    tokenizer = out / "tokenizers" / "fineweb_1024_bpe.model"
    assert data.is_dir() and tokenizer.is_file()
    return data, tokenizer
