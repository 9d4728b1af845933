"""kill-mamba2: the LTI mixer is the SSD form with constant dt, B, C; the full model's parameter count; a tiny
model trains, exports (ternary2 + brotli), reads back and reproduces its ternary forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from templates.config import model_config_from_env
from templates.layers import LinearMaker, TernaryLinear
from templates.mixers.causal_conv import causal_conv
from templates.mixers.lti_mamba2 import LtiMamba2
from templates.model import LanguageModel
from templates.scan.ssd import ssd_scan, ssd_scan_ref

from .conftest import build_model, fixed_batch, round_trip, spec_defaults, train_steps  # noqa: TID252

TINY = {
    "VOCAB_SIZE": "64",
    "MODEL_DIM": "32",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "NUM_LAYERS": "2",
    "NUM_LOOPS": "2",
    "MLP_MULT": "2",
    "SSM_HEAD_DIM": "16",
    "SSM_STATE": "8",
    "KEEP_FLOAT_MAX_NUMEL": "256",
}


def _random_mixer(seed: int = 0) -> LtiMamba2:
    torch.manual_seed(seed)
    m = LtiMamba2(32, LinearMaker("float"), head_dim=16, state=8)
    with torch.no_grad():
        m.out_proj.weight.normal_(0, 0.2)  # zero at init: give the comparison something to see
        m.A_log.uniform_(-1.0, 1.5)
        m.dt_bias.uniform_(-3.0, 1.0)
        m.D_skip.normal_(1.0, 0.3)
    return m


def _ssd_form(m: LtiMamba2, x: torch.Tensor, scan) -> torch.Tensor:
    """The same block through the general SSD scan: dt_raw = 0 plus dt_bias, B and C broadcast over time."""
    bsz, steps, _ = x.shape
    xz = m.in_proj(x)
    branch, z = xz[..., : m.inner], xz[..., m.inner : 2 * m.inner]
    u = F.silu(causal_conv(branch, m.conv_weight, m.conv_bias)[0])
    heads = (bsz, steps, m.heads, m.head_dim)
    const_b = m.B_const.view(1, 1, 1, -1).expand(bsz, steps, 1, -1)
    const_c = m.C_const.view(1, 1, 1, -1).expand(bsz, steps, 1, -1)
    y = scan(
        u.reshape(heads), torch.zeros(bsz, steps, m.heads), -torch.exp(m.A_log), const_b, const_c, chunk_size=16,
        D=m.D_skip.view(m.heads, m.head_dim), z=z.reshape(heads), dt_bias=m.dt_bias, dt_softplus=True,
    )  # fmt: skip
    return m.out_proj(y.reshape(bsz, steps, m.inner))


@pytest.mark.parametrize("scan", [ssd_scan_ref, ssd_scan])
def test_lti_mixer_equals_the_ssd_form(scan):
    m = _random_mixer()
    x = torch.randn(2, 45, 32)
    with torch.no_grad():
        ours, general = m(x), _ssd_form(m, x, scan)
    assert general.abs().max() > 1e-2
    torch.testing.assert_close(ours, general, rtol=1e-4, atol=1e-5)


def test_dead_rows_get_no_gradient_and_can_be_dropped():
    m = _random_mixer()
    m(torch.randn(2, 20, 32)).square().sum().backward()
    grad = m.in_proj.weight.grad
    assert grad[: 2 * m.inner].abs().sum() > 0
    assert grad[2 * m.inner :].abs().max() == 0  # 2 N + H rows: read by Mamba-2, not by the LTI form
    assert grad.shape[0] - 2 * m.inner == 2 * 8 + 4
    assert LtiMamba2(32, LinearMaker("float"), head_dim=16, state=8, dead_rows=False).in_proj.weight.shape[0] == 128


def test_full_size_parameter_count(variant_env):
    variant_env("kill-mamba2")
    with torch.device("meta"):
        model = LanguageModel(model_config_from_env())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 61_657_752) <= 0.005 * 61_657_752
    assert count == 61_657_752
    ternary = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert len(ternary) == 63 and not any(m.per_row for m in ternary)  # 9 projections x 7 blocks, per tensor
    assert sum(m.weight.numel() for m in ternary) == 61_071_360  # the origin's ternary weight count


def test_spec_recipe_is_the_seeds_shortened():
    d = spec_defaults("kill-mamba2")
    assert d["MUON_BACKEND_STEPS"] == "15" and d["EMA_DECAY"] == "0.999" and d["MATRIX_LR"] == "0.045"
    assert d["MAX_WALLCLOCK_SECONDS"] == "600" and d["QUANT_TERNARY"] == "ternary2" and d["COMPRESSOR"] == "brotli"


def test_tiny_train_export_read_back(variant_env, tmp_path):
    variant_env("kill-mamba2", **TINY)
    model = build_model()
    x, y = fixed_batch(64, 4, 32)
    losses = train_steps(model, x, y, steps=8)
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    with torch.no_grad():
        trained = model.logits(x)
        exact = round_trip(model, tmp_path / "exact.ptz", exact=True)
        torch.testing.assert_close(exact.logits(x), trained, rtol=1e-5, atol=1e-5)
        for ours, back in zip(model.modules(), exact.modules()):
            if isinstance(ours, TernaryLinear):
                torch.testing.assert_close(back.effective_weight(), ours.effective_weight(), rtol=1e-6, atol=1e-7)
        # the variant's whole plan: int8 embedding, fp16 small tensors, ternary2, brotli
        full = round_trip(model, tmp_path / "full.ptz", exact=False)
        assert full.tok_emb.weight.unique().numel() > 3
        loss_trained = F.cross_entropy(trained.flatten(0, 1), y.flatten())
        loss_back = F.cross_entropy(full.logits(x).flatten(0, 1), y.flatten())
        assert abs(loss_back.item() - loss_trained.item()) < 0.05
