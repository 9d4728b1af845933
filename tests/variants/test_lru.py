"""lru: the counts in the origin's shape and the record shape, the tiny CPU path, stability at 4096 tokens."""

from __future__ import annotations

import torch

from templates.layers import LinearMaker
from templates.mixers.lru import LRUMixer

from .conftest import meta_parameter_count, stateful_matches_whole, train_export_score, use_recipe  # noqa: TID252

TINY = dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=2, TRAIN_SEQ_LEN=32, KEEP_FLOAT_MAX_NUMEL=256)


def test_origin_shape_count_and_its_difference(monkeypatch):
    use_recipe(monkeypatch, "lru", track="non-record", ORTHO_INIT=0)
    count = meta_parameter_count()
    # the origin's 7,890,960 minus its 16 scalars plus the stack's 4 x 256 per-channel scales in each of 8 blocks
    assert count == 7_890_960 - 16 + 8 * 4 * 256 == 7_899_136


def test_record_shape_uses_the_budget(monkeypatch):
    use_recipe(monkeypatch, "lru")
    count = meta_parameter_count()
    assert count == 16_382_912
    estimate = count * 0.93  # int8 + zlib bytes per parameter on the baseline
    assert 14_000_000 < estimate < 16_000_000 - 200_000


def test_poles_inside_the_unit_circle_and_normalised():
    mixer = LRUMixer(16, LinearMaker(), d_state=2, r_min=0.5, r_max=0.999)
    a_re, a_im, gamma = mixer.poles()
    modulus = torch.sqrt(a_re**2 + a_im**2)
    assert (modulus < 1).all() and (modulus >= 0.5 - 1e-6).all() and (modulus <= 0.999 + 1e-6).all()
    assert torch.allclose(gamma**2 + modulus**2, torch.ones_like(gamma), atol=1e-5)


def test_4096_tokens_stay_finite_for_fastest_and_slowest_poles():
    torch.manual_seed(0)
    x = torch.randn(1, 4096, 8) * 3.0
    for r_min, r_max in ((1e-4, 1e-3), (0.99999, 0.999999)):
        mixer = LRUMixer(8, LinearMaker(), d_state=2, r_min=r_min, r_max=r_max)
        torch.nn.init.normal_(mixer.out_proj.weight)
        with torch.no_grad():
            y = mixer(x)
        assert torch.isfinite(y).all() and y.abs().max() < 1e3
        x_req = x[:, :256].clone().requires_grad_(True)  # gradients through the same poles, shorter for speed
        mixer(x_req).square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())
        assert torch.isfinite(x_req.grad).all()


def test_tiny_model_trains_exports_and_scores(monkeypatch, tmp_path):
    use_recipe(monkeypatch, "lru", **TINY)
    r = train_export_score(tmp_path)
    assert r["last"] < r["first"] - 0.3
    assert abs(r["scored"] - r["trained"]) < 0.1


def test_state_carried_across_windows_equals_one_pass():
    torch.manual_seed(1)
    mixer = LRUMixer(16, LinearMaker(), d_state=2)
    torch.nn.init.normal_(mixer.out_proj.weight)
    assert stateful_matches_whole(mixer, 16) < 1e-4
