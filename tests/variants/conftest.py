"""Shared helpers of the variant tests: a variant's recipe as the environment, the full-size model on the meta
device, and the tiny CPU path (train a few steps, export through the artifact, read back, score)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import templates.mixers.attention  # noqa: F401  (registers the mixers the variants name)
import templates.mixers.lru  # noqa: F401
import templates.mixers.mamba3  # noqa: F401
import templates.mixers.s6  # noqa: F401
from builder.variants import VariantSpec
from templates.config import model_config_from_env
from templates.export import choose_quantisers, encode_state, read_artifact, write_artifact
from templates.hparams import Hyperparameters
from templates.model import LanguageModel

SPECS = Path(__file__).resolve().parents[2] / "builder" / "specs"


def load_spec(name: str) -> VariantSpec:
    return VariantSpec.model_validate(json.loads((SPECS / f"{name}.json").read_text(encoding="utf-8")))


def use_recipe(patch: pytest.MonkeyPatch, name: str, track: str = "record", **overrides: object) -> VariantSpec:
    """The variant's defaults (and `overrides`) set as environment variables for the duration of the test."""
    spec = load_spec(name)
    for key, value in {**spec.defaults_as_strings(track), **{k: str(v) for k, v in overrides.items()}}.items():
        patch.setenv(key, value)
    return spec


def meta_parameter_count() -> int:
    """Parameters of the model the environment declares, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = LanguageModel(model_config_from_env())
    return sum(p.numel() for p in model.parameters())


def patterned_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable tokens: each sequence repeats a short random motif, so the next token is predictable."""
    gen = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, vocab, (batch, 5), generator=gen)
    run = motif.repeat(1, (seq_len + 1) // 5 + 1)[:, : seq_len + 1]
    return run[:, :-1], run[:, 1:]


def train_export_score(tmp_path: Path, steps: int = 12, lr: float = 3e-3) -> dict[str, float]:
    """Build from the environment, train `steps` Adam steps on one batch, export through the artifact, read back
    strictly and score; returns the losses at each stage and the artifact's size."""
    torch.manual_seed(0)
    cfg = model_config_from_env()
    hp = Hyperparameters()
    model = LanguageModel(cfg)
    x, y = patterned_batch(cfg.vocab_size, 2, hp.train_seq_len)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        trained = model(x, y).item()
    plan = choose_quantisers(
        model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, hp.keep_float_max_numel
    )
    path = tmp_path / hp.artifact_name
    file_bytes, _ = write_artifact(str(path), encode_state(model.state_dict(), plan), hp.compressor)
    restored = LanguageModel(cfg)
    restored.load_state_dict(read_artifact(str(path)), strict=True)
    restored.eval()
    with torch.no_grad():
        scored = restored(x, y).item()
    return {"first": losses[0], "last": losses[-1], "trained": trained, "scored": scored, "bytes": file_bytes}


def stateful_matches_whole(mixer: torch.nn.Module, dim: int, seq_len: int = 24, seed: int = 0) -> float:
    """Largest difference between the mixer over a whole sequence and over its two halves with the state carried."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, seq_len, dim, generator=gen)
    with torch.no_grad():
        whole = mixer(x)
        first, state = mixer.forward_stateful(x[:, : seq_len // 2], None)
        second, _ = mixer.forward_stateful(x[:, seq_len // 2 :], state)
    return (torch.cat((first, second), dim=1) - whole).abs().max().item() / whole.abs().max().clamp_min(1e-9).item()
