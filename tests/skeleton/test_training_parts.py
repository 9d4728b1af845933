"""The training parts in isolation: schedules, Muon's orthogonalisation, the int8 export round trip, the model."""

from __future__ import annotations

import pytest
import torch

from templates.export import dequantize_state_dict_int8, quantize_state_dict_int8, read_artifact, serialize_artifact
from templates.hparams import Hyperparameters
from templates.model import GPT
from templates.optim import Muon, lr_multiplier, muon_momentum_at, newton_schulz_orthogonalize


def test_lr_multiplier_by_steps_and_by_wallclock():
    assert lr_multiplier(0, 0, 100, 20, None) == 1.0
    assert lr_multiplier(80, 0, 100, 20, None) == pytest.approx(1.0)
    assert lr_multiplier(90, 0, 100, 20, None) == pytest.approx(0.5)
    assert lr_multiplier(100, 0, 100, 20, None) == 0.0
    # 10 ms a step, warmdown of 20 steps = 200 ms: at 900 of 1000 ms, 100 ms remain -> 0.5
    assert lr_multiplier(90, 900.0, 10_000, 20, 1000.0) == pytest.approx(0.5)
    assert lr_multiplier(10, 100.0, 10_000, 20, 1000.0) == 1.0
    assert lr_multiplier(5, 0.0, 100, 0, None) == 1.0
    assert muon_momentum_at(0, 0.85, 0.95, 500) == pytest.approx(0.85)
    assert muon_momentum_at(250, 0.85, 0.95, 500) == pytest.approx(0.90)
    assert muon_momentum_at(9999, 0.85, 0.95, 500) == pytest.approx(0.95)


def test_newton_schulz_flattens_the_spectrum():
    g = torch.randn(64, 32) @ torch.diag(torch.logspace(-2, 1, 32))
    before = torch.linalg.svdvals(g)
    s = torch.linalg.svdvals(newton_schulz_orthogonalize(g, steps=5).float())
    assert before.max() / before.min() > 500
    assert s.max() < 1.3 and s.max() / s.min() < 10  # the spread of singular values collapses towards 1


def test_muon_reduces_a_quadratic():
    w = torch.nn.Parameter(torch.randn(16, 8))
    target = torch.randn(16, 8)
    opt = Muon([w], lr=0.1, momentum=0.9, backend_steps=5)
    start = (w - target).square().sum().item()
    for _ in range(40):
        loss = (w - target).square().sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert (w - target).square().sum().item() < 0.3 * start


def test_int8_round_trip(tmp_path):
    state = {
        "big": torch.randn(300, 256),
        "zero_rows": torch.zeros(260, 256),
        "flat": torch.randn(70_000),
        "small": torch.randn(10, 10),
        "resid_mix": torch.randn(2, 8),
        "steps": torch.tensor([3], dtype=torch.int64),
    }
    obj = quantize_state_dict_int8(state, ("resid_mix",))
    assert obj["quantized"]["big"].dtype == torch.int8 and obj["passthrough"]["small"].dtype == torch.float16
    assert obj["passthrough"]["resid_mix"].dtype == torch.float32
    blob, _ = serialize_artifact(obj)
    path = tmp_path / "a.ptz"
    path.write_bytes(blob)
    back = read_artifact(str(path))
    assert back.keys() == state.keys()
    assert torch.equal(back["zero_rows"], state["zero_rows"]) and torch.equal(back["steps"], state["steps"])
    rel = (back["big"] - state["big"]).norm() / state["big"].norm()
    assert rel < 0.01
    assert (back["flat"] - state["flat"]).norm() / state["flat"].norm() < 0.02
    assert torch.equal(back["resid_mix"], state["resid_mix"])
    assert dequantize_state_dict_int8(obj)["big"].dtype == torch.float32
    path.write_bytes(b"not an artifact")
    with pytest.raises(ValueError, match="not a zlib-compressed artifact"):
        read_artifact(str(path))


def test_model_shapes_and_per_token_losses(monkeypatch):
    for k, v in dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=3, NUM_HEADS=4, NUM_KV_HEADS=2).items():
        monkeypatch.setenv(k, str(v))
    model = GPT(Hyperparameters())
    assert len(model.blocks) == 3 and model.skip_weights.shape == (1, 32)
    x = torch.randint(0, 64, (2, 16))
    per_token = model(x, x, reduction="none")
    assert per_token.shape == (2, 16)
    assert model(x, x).item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    # zero-initialised output projections: every block starts as the identity, so the loss is near ln(vocab)
    assert abs(model(x, x).item() - torch.log(torch.tensor(64.0)).item()) < 0.5
