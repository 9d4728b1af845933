"""Shared helpers of the variant tests: a variant's recipe as the environment (with tiny overrides), the full-size
model on the meta device, a few optimiser steps on a fixed batch, and the tiny CPU path through the artifact."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import templates.brotli_codec  # noqa: F401 (registers brotli)
import templates.features.ngram_hash  # noqa: F401 (registers the n-gram features)
import templates.mixers.attention  # noqa: F401 (registers the mixers)
import templates.mixers.lru  # noqa: F401
import templates.mixers.lti_mamba2  # noqa: F401
import templates.mixers.mamba3  # noqa: F401
import templates.mixers.s6  # noqa: F401
import templates.mixers.selective  # noqa: F401
import templates.quant_ternary  # noqa: F401 (registers ternary2 / ternary5)
from builder.variants import VariantSpec
from templates.config import model_config_from_env
from templates.export import choose_quantisers, encode_state, read_artifact, write_artifact
from templates.hparams import Hyperparameters
from templates.model import LanguageModel
from templates.optim import Muon, split_parameters

SPECS = Path(__file__).resolve().parents[2] / "builder" / "specs"


def spec_defaults(name: str) -> dict[str, str]:
    """The record defaults of builder/specs/<name>.json as environment strings."""
    spec = json.loads((SPECS / f"{name}.json").read_text(encoding="utf-8"))
    return {k: str(v) for k, v in spec["defaults"].items()}


@pytest.fixture
def variant_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """variant_env("ttsm", MODEL_DIM="32", ...): the spec's defaults, then the overrides, as the environment."""

    def apply(name: str, **overrides: str) -> None:
        for key, value in {**spec_defaults(name), **overrides}.items():
            monkeypatch.setenv(key, value)

    return apply


def build_model(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(model_config_from_env())


def wake_zero_weights(model: torch.nn.Module, std: float) -> None:
    """Draw N(0, std) into every all-zero matrix (the zero-initialised output projections), which would otherwise
    hide the gradients and the context behind them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.abs().sum():
                p.normal_(0.0, std)


def fixed_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable batch: each row repeats a short random phrase."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (batch, 7), generator=g)
    run = phrase.repeat(1, (seq_len + 1) // 7 + 1)[:, : seq_len + 1]
    return run[:, :-1].contiguous(), run[:, 1:].contiguous()


def train_steps(model: LanguageModel, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """`steps` optimiser steps on (x, y) with the run's optimiser split (Muon + Adam, the environment's rates)."""
    hp = Hyperparameters()
    groups = split_parameters(model, hp.control_patterns)
    opts: list[torch.optim.Optimizer] = [
        Muon(groups["muon"], hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, 0.0, hp.muon_row_norm)
    ]
    for key, lr in (("embed", hp.tied_embed_lr), ("scalar", hp.scalar_lr), ("head", hp.head_lr)):
        if groups[key]:
            opts.append(torch.optim.Adam(groups[key], lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.adam_eps))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        if hp.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip_norm)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def round_trip(model: LanguageModel, path: Path, exact: bool) -> LanguageModel:
    """Export through the pipeline and read back into a fresh model (strict). exact: the variant's ternary quantiser
    and compressor but float32 for every other tensor and absmean export scales, so that the only lossy step is
    the ternary one; otherwise the variant's whole plan (QUANT, overrides, TERNARY_LSTSQ, ...)."""
    hp = Hyperparameters()
    if exact:
        plan = choose_quantisers(model, "float32", hp.quant_ternary, (), ("",), hp.keep_float_max_numel, False)
    else:
        plan = choose_quantisers(
            model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, hp.keep_float_max_numel,
            hp.ternary_lstsq,
        )  # fmt: skip
    file_bytes, _ = write_artifact(str(path), encode_state(model.state_dict(), plan), hp.compressor)
    assert path.stat().st_size == file_bytes
    assert path.read_bytes().startswith(b"SSMG1 " + hp.compressor.encode() + b"\n")
    fresh = build_model(seed=123)
    fresh.load_state_dict(read_artifact(str(path)), strict=True)
    return fresh.eval()


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


def train_export_score(
    tmp_path: Path, steps: int = 12, lr: float = 3e-3, export: Callable[..., dict] | None = None
) -> dict:
    """Build from the environment, train `steps` Adam steps on one batch, export through the artifact (with
    `export(model, plan, hp)`, by default the plain encoding of the plan), read back strictly and score; returns the
    losses at each stage, the artifact's size and the exported container."""
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
    container = export(model, plan, hp) if export else encode_state(model.state_dict(), plan)
    file_bytes, _ = write_artifact(str(path), container, hp.compressor)
    restored = LanguageModel(cfg)
    restored.load_state_dict(read_artifact(str(path)), strict=True)
    restored.eval()
    with torch.no_grad():
        scored = restored(x, y).item()
    return {
        "first": losses[0], "last": losses[-1], "trained": trained, "scored": scored, "bytes": file_bytes,
        "container": container,
    }  # fmt: skip


def stateful_matches_whole(mixer: torch.nn.Module, dim: int, seq_len: int = 24, seed: int = 0) -> float:
    """Largest difference between the mixer over a whole sequence and over its two halves with the state carried."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, seq_len, dim, generator=gen)
    with torch.no_grad():
        whole = mixer(x)
        first, state = mixer.forward_stateful(x[:, : seq_len // 2], None)
        second, _ = mixer.forward_stateful(x[:, seq_len // 2 :], state)
    return (torch.cat((first, second), dim=1) - whole).abs().max().item() / whole.abs().max().clamp_min(1e-9).item()
