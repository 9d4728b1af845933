"""The export pipeline: each quantiser round-trips, the row-scale floor, which tensor gets which quantiser, the
artifact file (header, compressors, damaged files) and ternary packing."""

from __future__ import annotations

import io
import lzma
import zlib

import brotli
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import templates.brotli_codec  # noqa: F401 (registers brotli)
import templates.mixers.attention  # noqa: F401
import templates.quant_ternary  # noqa: F401 (registers ternary2 / ternary5)
from templates.config import model_config_from_env
from templates.export import (
    FORMAT,
    ArtifactError,
    choose_quantisers,
    decode_state,
    encode_state,
    read_artifact,
    write_artifact,
)
from templates.layers import TernaryLinear
from templates.model import LanguageModel
from templates.quant import integer_encode
from templates.quant_ternary import pack_2bit, pack_base3, unpack_2bit, unpack_base3
from templates.registry import QUANTISERS


@pytest.mark.parametrize(
    "name, tol, qmax", [("float16", 1e-3, None), ("float32", 0.0, None), ("int8", 0.008, 127), ("int6", 0.03, 31)]
)
def test_each_quantiser_round_trips(name, tol, qmax):
    """Round-trip error within what each format allows (measured 0.006 and 0.024 for int8 and int6: rounding, not
    truncation, at the format's own range), and the integer formats use exactly their range."""
    t = torch.randn(96, 70)
    q = QUANTISERS[name]
    fields = q.encode(t, {})
    back = q.decode(fields)
    assert back.shape == t.shape and back.dtype == torch.float32
    assert ((back - t).norm() / t.norm()).item() <= tol + 1e-7
    if qmax is not None:
        assert fields["q"].abs().max().item() == qmax  # int6 is 6 bits: codes in [-31, 31]


def test_row_scale_floor_puts_small_rows_on_the_fixed_grid():
    w = torch.randn(8, 512) * 0.02  # clip far below 1
    fields = integer_encode(w, 127)
    assert torch.all(fields["scale"].float() == torch.tensor(1 / 127, dtype=torch.float16).float())
    assert fields["q"].abs().max() <= 127 * w.abs().max() + 1
    big = integer_encode(torch.randn(4, 512) * 10, 127)  # clip above 1: a scale of its own
    assert torch.all(big["scale"].float() > 1 / 127)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=0, max_size=97))
def test_ternary_packings_round_trip_exactly(codes):
    c = torch.tensor(codes, dtype=torch.uint8)
    assert unpack_2bit(pack_2bit(c), len(codes)).tolist() == codes
    assert unpack_base3(pack_base3(c), len(codes)).tolist() == codes
    assert pack_2bit(c).numel() == -(-len(codes) // 4) and pack_base3(c).numel() == -(-len(codes) // 5)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("quantiser", ["ternary2", "ternary5"])
def test_ternary_read_back_reproduces_the_ternary_forward(per_row, quantiser):
    layer = TernaryLinear(33, 21, per_row=per_row)
    x = torch.randn(5, 33)
    want = layer(x)
    q = QUANTISERS[quantiser]
    with torch.no_grad():
        layer.weight.copy_(q.decode(q.encode(layer.weight, {"per_row": per_row})))
    assert torch.allclose(layer(x), want, atol=1e-5, rtol=1e-5)


def _tiny_model(monkeypatch, **extra) -> LanguageModel:
    env = dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=2, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=4, **extra)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    return LanguageModel(model_config_from_env())


def test_quantiser_choice_follows_the_rules(monkeypatch):
    model = _tiny_model(monkeypatch, LINEAR_KIND="ternary")
    plan = choose_quantisers(model, "int8", "ternary5", ("tok_emb=int6",), ("resid_mix",), 100)
    assert plan["tok_emb.weight"][0] == "int6"  # an override wins
    assert plan["blocks.0.mixers.0.q_proj.weight"][0] == "ternary5"  # ternary linears
    assert plan["blocks.0.resid_mix"][0] == "float32" and plan["blocks.0.mlp_scale"][0] == "float16"
    float_model = _tiny_model(monkeypatch, LINEAR_KIND="float")
    assert choose_quantisers(float_model, "int8", "ternary2", (), (), 100)["blocks.0.mlp.up.weight"][0] == "int8"
    with pytest.raises(ValueError, match="only for the weights of ternary linears"):
        choose_quantisers(float_model, "int8", "ternary2", ("mlp.up=ternary2",), (), 100)
    with pytest.raises(ValueError, match="unknown quantiser 'int3'"):
        choose_quantisers(float_model, "int3", "ternary2", (), (), 100)


@pytest.mark.parametrize("compressor", ["zlib", "lzma", "brotli"])
def test_artifact_round_trip_and_damage(monkeypatch, tmp_path, compressor):
    model = _tiny_model(monkeypatch)
    plan = choose_quantisers(model, "int8", "ternary2", (), ("resid_mix",), 100)
    container = encode_state(model.state_dict(), plan)
    path = tmp_path / "final_model.ptz"
    size, raw = write_artifact(str(path), container, compressor)
    blob = path.read_bytes()
    assert size == len(blob) and blob.startswith(f"SSMG1 {compressor}\n".encode()) and raw > 0
    # the named codec really is the one applied: the body decompresses with that library itself, to the container
    body = blob.split(b"\n", 1)[1]
    unpacked = {"zlib": zlib.decompress, "lzma": lzma.decompress, "brotli": brotli.decompress}[compressor](body)
    assert len(body) < raw == len(unpacked)
    assert torch.load(io.BytesIO(unpacked), weights_only=True)["format"] == FORMAT
    back = read_artifact(str(path))
    model.load_state_dict(back, strict=True)
    decoded = decode_state(container)
    assert back.keys() == decoded.keys()
    for name, tensor in decoded.items():  # the bytes on disk decode to exactly what the container held
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ArtifactError, match="damaged or truncated") as info:
        read_artifact(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    path.write_bytes(zlib.compress(b"an older artifact"))
    with pytest.raises(ArtifactError, match="not an ssm-golf artifact"):
        read_artifact(str(path))
    with pytest.raises(ArtifactError, match="cannot read"):
        read_artifact(str(tmp_path / "missing.ptz"))


def test_ternary_warm_start_ramp_is_a_step_stage(monkeypatch):
    from templates.quant_ternary import ternary_mix
    from templates.registry import STAGES

    assert ternary_mix(0.0, None, 0.1, 0.1) == 1.0  # no cap: ternary from the start
    assert ternary_mix(50.0, 1000.0, 0.1, 0.1) == 0.0  # inside the float warm start (the first 100 ms)
    assert ternary_mix(145.0, 1000.0, 0.1, 0.1) == pytest.approx(0.5)  # halfway through the 90 ms ramp
    assert ternary_mix(900.0, 1000.0, 0.1, 0.1) == 1.0
    model = _tiny_model(monkeypatch, LINEAR_KIND="ternary", TERNARY_WARMSTART_FRAC=0.1)
    from templates.hparams import Hyperparameters

    STAGES["step:ternary_ramp"](model, Hyperparameters(), 1.0, 50.0, 1000.0, print)
    mixes = [m.quant_mix.item() for m in model.modules() if isinstance(m, TernaryLinear)]
    assert mixes and all(v == 0.0 for v in mixes)
