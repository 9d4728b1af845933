"""hybrid-3to1: the origin's count and the fitted count on the meta device, the tiny CPU path, the S6 state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import templates.gptq  # noqa: F401 (registers the GPTQ export stage)
from templates.config import model_config_from_env
from templates.layers import LinearMaker
from templates.mixers.causal_conv import causal_conv
from templates.mixers.s6 import S6Mixer
from templates.registry import STAGES

from .conftest import (  # noqa: TID252
    meta_parameter_count,
    stateful_matches_whole,
    train_export_score,
    use_recipe,
)

TINY = dict(
    VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, NUM_LAYERS=4, S6_DT_RANK=4, TRAIN_SEQ_LEN=20,
    KEEP_FLOAT_MAX_NUMEL=256,
)  # fmt: skip


def test_origin_mixer_reproduces_the_origins_count(monkeypatch):
    use_recipe(monkeypatch, "hybrid-3to1", S6_DT_RANK=0, S6_EXPAND=2)
    assert meta_parameter_count() == 30_299_152


def test_record_shape_count_and_size_estimate(monkeypatch):
    use_recipe(monkeypatch, "hybrid-3to1")
    count = meta_parameter_count()
    assert count == 21_934_992
    assert count * 0.70 < 16_000_000 - 200_000  # int6 + lzma, pessimistic bytes per parameter


def test_attention_at_depths_3_and_7(monkeypatch):
    use_recipe(monkeypatch, "hybrid-3to1")

    names = [spec.mixers[0] for spec in model_config_from_env().layers]
    assert [i for i, n in enumerate(names) if n == "attention"] == [3, 7] and names.count("s6") == 7


def test_low_rank_and_full_rank_dt_shapes():
    low = S6Mixer(64, LinearMaker(), dt_rank=8, expand=2)
    full = S6Mixer(64, LinearMaker(), dt_rank=0, expand=2)
    assert tuple(low.x_proj.weight.shape) == (8 + 32, 128) and tuple(low.dt_proj.weight.shape) == (128, 8)
    assert tuple(full.x_proj.weight.shape) == (32, 128) and tuple(full.dt_proj.weight.shape) == (128, 128)
    x = torch.randn(2, 12, 64)
    for m in (low, full):
        torch.nn.init.normal_(m.out_proj.weight)
        assert m(x).shape == x.shape


def test_tiny_model_trains_exports_and_scores(monkeypatch, tmp_path):
    use_recipe(monkeypatch, "hybrid-3to1", **TINY)
    r = train_export_score(tmp_path)
    assert r["last"] < r["first"] - 0.3
    assert abs(r["scored"] - r["trained"]) < 0.25


def test_state_carried_across_windows_equals_one_pass():
    torch.manual_seed(1)
    mixer = S6Mixer(16, LinearMaker(), dt_rank=4, d_state=4)
    torch.nn.init.normal_(mixer.out_proj.weight)
    assert stateful_matches_whole(mixer, 16) < 1e-4


def test_s6_convolution_is_the_depthwise_causal_conv1d():
    """The S6 mixer's shifted multiply-adds (causal_conv) against torch's grouped conv1d on the left-padded input."""
    torch.manual_seed(0)
    m = S6Mixer(16, LinearMaker("float"), d_state=4, expand=2.0, conv=4)
    with torch.no_grad():
        m.conv_bias.normal_()
    x = torch.randn(2, 11, m.d_inner)
    ours, tail = causal_conv(x, m.conv_weight, m.conv_bias)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), m.conv_weight, m.conv_bias, groups=m.d_inner).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(tail, x[:, -3:])


def test_gptq_option_exports_a_model_that_scores_like_the_trained_one(monkeypatch, tmp_path):
    """USE_GPTQ=1 (assembled in, off in the record recipe): GPTQ on self-generated tokens keeps the int8 overrides
    (x_proj, dt_proj) at int8 and the rest at int6, reads back strictly, and scores near the trained model."""
    use_recipe(monkeypatch, "hybrid-3to1", **TINY, USE_GPTQ="1", GPTQ_CALIB_SEQS="2", GPTQ_CALIB_LEN="20")
    lines: list[str] = []
    r = train_export_score(
        tmp_path, export=lambda model, plan, hp: STAGES["export"](model, plan, 1000, hp, None, lines.append)
    )
    assert any(line.startswith("gptq:quantization complete") for line in lines)
    container = r["container"]
    fields = container["tensors"]
    s6 = "blocks.0.mixers.0"
    # rows below 1 sit on the grid of the scale floor 1/qmax (upstream's and the origin's convention), so the row
    # scales say which width each weight got: int6 for in_proj, the int8 override for x_proj and dt_proj
    for name, qmax in (("in_proj", 31), ("x_proj", 127), ("dt_proj", 127)):
        entry = fields[f"{s6}.{name}.weight"]
        assert entry["quantiser"] == "rows_int" and entry["fields"]["q"].abs().max() <= qmax
        torch.testing.assert_close(
            entry["fields"]["scale"].float(),
            torch.full_like(entry["fields"]["scale"].float(), 1 / qmax),
            rtol=1e-3,
            atol=0,
        )
    assert abs(r["scored"] - r["trained"]) < 0.25
