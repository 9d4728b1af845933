"""Optimisers and schedules: the warmdown, Muon's orthogonalisation, Muon on a toy problem, parameter routing, EMA."""

from __future__ import annotations

import pytest
import torch

import templates.mixers.attention  # noqa: F401 (registers the mixer)
from templates.config import model_config_from_env
from templates.model import LanguageModel
from templates.optim import Muon, WeightAverage, lr_scale, momentum_at, orthogonalize, past_cap, split_parameters


def test_lr_scale_ramp_flat_and_warmdown():
    assert lr_scale(0, 0, 100, 0, 20, None) == 1.0
    assert lr_scale(80, 0, 100, 0, 20, None) == pytest.approx(1.0)
    assert lr_scale(90, 0, 100, 0, 20, None) == pytest.approx(0.5)
    assert lr_scale(100, 0, 100, 0, 20, None) == 0.0
    # 10 ms a step, a warmdown of 20 steps = 200 ms: at 900 of 1000 ms, 100 ms remain -> 0.5
    assert lr_scale(90, 900.0, 10_000, 0, 20, 1000.0) == pytest.approx(0.5)
    assert lr_scale(10, 100.0, 10_000, 0, 20, 1000.0) == 1.0
    assert lr_scale(4, 0.0, 100, 10, 0, None) == pytest.approx(0.5)  # linear ramp: (4 + 1) / 10
    assert momentum_at(0, 0.85, 0.95, 500) == pytest.approx(0.85)
    assert momentum_at(250, 0.85, 0.95, 500) == pytest.approx(0.90)
    assert momentum_at(9999, 0.85, 0.95, 500) == pytest.approx(0.95)


def test_training_stops_before_the_cap_not_after_it():
    # 99 steps in 594 s (6 s a step): a 100th would end at 600 s, inside a 600 s cap; a 101st at 606 s would not
    assert not past_cap(594_000.0, 99, 600_000.0)
    assert past_cap(600_000.0, 100, 600_000.0)
    assert past_cap(595_000.0, 99, 600_000.0)  # the pace so far (6.01 s a step) ends the next one at 601 s
    assert not past_cap(10**9, 1, None)  # no cap: never
    assert past_cap(588_001.0, 98, 600_000.0, ahead=2) and not past_cap(588_000.0, 98, 600_000.0, ahead=2)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_orthogonalize_flattens_each_spectrum_of_a_stack(shape):
    g = torch.randn(3, *shape) * torch.logspace(-2, 1, shape[1])  # condition numbers in the hundreds
    out = orthogonalize(g, steps=5).float()
    assert out.shape == g.shape
    for i in range(3):
        s = torch.linalg.svdvals(out[i])
        assert s.max() < 1.3 and s.max() / s.min() < 10


def test_muon_reduces_a_quadratic_with_mixed_shapes_and_decay():
    ws = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((16, 8), (16, 8), (8, 4))]
    targets = [torch.randn_like(w) for w in ws]
    opt = Muon(ws, lr=0.1, momentum=0.9, steps=5, weight_decay=0.01)
    start = sum((w - t).square().sum().item() for w, t in zip(ws, targets))
    for _ in range(40):
        sum((w - t).square().sum() for w, t in zip(ws, targets)).backward()
        opt.step()
        opt.zero_grad()
    assert sum((w - t).square().sum().item() for w, t in zip(ws, targets)) < 0.3 * start


def test_parameters_are_routed_by_the_declaration(monkeypatch):
    for k, v in dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=3, NUM_HEADS=4, NUM_KV_HEADS=2).items():
        monkeypatch.setenv(k, str(v))
    model = LanguageModel(model_config_from_env())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = split_parameters(model, ("branch_scales", "mlp_scale", "resid_mix", "q_gain", "skip_weights"))
    muon = {names[id(p)] for p in groups["muon"]}
    assert all(n.startswith("blocks.") and n.endswith(".weight") for n in muon) and len(muon) == 3 * 6
    assert {names[id(p)] for p in groups["embed"]} == {"tok_emb.weight"}
    assert "skip_weights" in {names[id(p)] for p in groups["scalar"]}
    # a control pattern keeps a matrix out of Muon
    groups = split_parameters(model, ("q_proj",))
    assert not any("q_proj" in names[id(p)] for p in groups["muon"])


def test_weight_average_is_a_bias_corrected_average_of_the_steps_it_saw():
    w = torch.nn.Parameter(torch.zeros(4))
    model = torch.nn.Module()
    model.w = w
    avg = WeightAverage(model, decay=0.5, start_step=2)
    with torch.no_grad():
        w.fill_(2.0)
    avg.update(1)  # before the start step: not averaged
    assert avg.updates == 0 and avg.shadow[0].tolist() == [0.0] * 4
    with torch.no_grad():
        w.fill_(4.0)
    avg.update(2)
    with torch.no_grad():
        w.fill_(8.0)
    avg.update(3)
    # weights 0.5 * 4 and 0.5 * 8 after one more step (0.25 * 4 + 0.5 * 8), divided by 1 - 0.5**2: the step-1
    # weights (2.0) have no share, as they would in an average that started as their copy
    assert avg.copy_into_model() == "ema:applied decay=0.5 updates=2"
    assert torch.allclose(w, torch.full((4,), (0.25 * 4 + 0.5 * 8) / 0.75))


def test_weight_average_keeps_the_weights_when_it_averaged_nothing():
    w = torch.nn.Parameter(torch.full((3,), 5.0))
    model = torch.nn.Module()
    model.w = w
    avg = WeightAverage(model, decay=0.999, start_step=30)
    avg.update(10)
    assert avg.copy_into_model().endswith("updates=0") and w.tolist() == [5.0] * 3


def test_weight_average_of_constant_weights_is_those_weights_after_any_number_of_steps():
    w = torch.nn.Parameter(torch.full((2,), 3.0))
    model = torch.nn.Module()
    model.w = w
    avg = WeightAverage(model, decay=0.999, start_step=0)
    for step in range(7):  # a 0.999 average of 7 steps: without the correction it would be 0.7% of the weights
        avg.update(step)
    avg.copy_into_model()
    assert torch.allclose(w, torch.full((2,), 3.0), rtol=1e-5)
