"""Every SSM variant at tiny size on the CPU (the scans' PyTorch reference path, no interpreter): one backward
reaches every parameter of its mixers through the scan. The reference path's backward runs inside a custom op,
below the autograd keys; when it recorded nothing there, the scans' inputs got zero gradients and the SSM branches
of CPU runs never trained, while their losses still fell through the other parameters."""

from __future__ import annotations

import pytest

from .conftest import build_model, fixed_batch, use_recipe, wake_zero_weights  # noqa: TID252

TINY = {
    "kill-mamba2": dict(VOCAB_SIZE=64, MODEL_DIM=64, NUM_LAYERS=2, NUM_LOOPS=1, NUM_HEADS=2, NUM_KV_HEADS=1),
    "ttsm": dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=2),
    "lru": dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=2),
    "hybrid-3to1": dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=2, LAYER_PATTERN="s6"),
    "mamba3-hybrid": dict(VOCAB_SIZE=64, MODEL_DIM=64, NUM_LAYERS=2, LAYER_PATTERN="mamba3"),
}
MIXER_NAMES = ("ssm", "mixer", "lru", "s6", "mamba")


@pytest.mark.parametrize("variant", sorted(TINY))
def test_backward_reaches_every_mixer_parameter(monkeypatch, variant):
    use_recipe(monkeypatch, variant, TRAIN_SEQ_LEN=32, **TINY[variant])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_model()
    wake_zero_weights(model, 0.02)
    x, y = fixed_batch(64, 2, 32)
    model.train()
    model(x, y).backward()
    mixer = {n: p for n, p in model.named_parameters() if any(k in n for k in MIXER_NAMES) and "attn" not in n}
    assert mixer, f"{variant}: no mixer parameters found by name in {[n for n, _ in model.named_parameters()][:8]}"
    dead = [n for n, p in mixer.items() if p.grad is None or not p.grad.abs().sum()]
    assert not dead, f"{variant}: no gradient through the scan for {dead}"
