"""Ternary packing (2 bits, 4 per byte; base 3, 5 per byte) round-trips exactly for any length and shape, and a
decoded ternary weight makes a TernaryLinear reproduce the trained ternary forward."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from templates.layers import TernaryLinear, ternarize, ternary_scale
from templates.quant_ternary import pack_2bit, pack_base3, unpack_2bit, unpack_base3
from templates.registry import QUANTISERS

codes = st.lists(st.integers(0, 2), min_size=0, max_size=301)
shapes = st.lists(st.integers(1, 13), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(codes)
def test_2bit_packing_round_trips(values):
    c = torch.tensor(values, dtype=torch.uint8)
    packed = pack_2bit(c)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) / 4)
    assert torch.equal(unpack_2bit(packed, len(values)), c)
    if values:
        assert int(packed[0]) & 3 == values[0]  # the first code sits in the low bits


@settings(max_examples=200, deadline=None)
@given(codes)
def test_base3_packing_round_trips(values):
    c = torch.tensor(values, dtype=torch.uint8)
    packed = pack_base3(c)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(values) / 5)
    assert torch.equal(unpack_base3(packed, len(values)), c)
    if values:
        assert int(packed[0]) % 3 == values[0]


@settings(max_examples=150, deadline=None)
@given(
    shape=shapes,
    quantiser=st.sampled_from(["ternary2", "ternary5"]),
    per_row=st.booleans(),
    lstsq=st.booleans(),
    seed=st.integers(0, 2**16),
    zero_rows=st.booleans(),
)
def test_quantiser_round_trip_any_shape(shape, quantiser, per_row, lstsq, seed, zero_rows):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if zero_rows:
        w[0] = 0.0
    q = QUANTISERS[quantiser]
    fields = q.encode(w, {"per_row": per_row, "lstsq": lstsq})
    back = q.decode(fields)
    assert back.shape == w.shape and back.dtype == torch.float32
    row_wise = per_row and w.ndim == 2
    rows = w.reshape(w.shape[0], -1) if row_wise else w.reshape(1, -1)
    trits = ternarize(rows, ternary_scale(rows, per_row=True))
    back_rows = back.reshape(rows.shape)
    assert torch.equal(torch.sign(back_rows), trits)  # the codes survive exactly
    # the scale a TernaryLinear re-derives from the decoded weight is the stored one, and its codes the same
    stored = fields["scale"].float().view(-1, 1)
    nonzero = (trits != 0).any(dim=1, keepdim=True)
    rederived = back_rows.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(torch.where(nonzero, rederived, stored * 0), torch.where(nonzero, stored, stored * 0))
    assert torch.equal(ternarize(back_rows, ternary_scale(back_rows, per_row=True)), trits)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 11),
    per_row=st.booleans(),
    quantiser=st.sampled_from(["ternary2", "ternary5"]),
)
def test_decoded_linear_reproduces_the_ternary_forward(rows, cols, per_row, quantiser):
    torch.manual_seed(rows * 100 + cols)
    layer = TernaryLinear(cols, rows, per_row=per_row)
    back = TernaryLinear(cols, rows, per_row=per_row)
    q = QUANTISERS[quantiser]
    back.weight.data = q.decode(q.encode(layer.weight, {"per_row": per_row, "lstsq": False}))
    x = torch.randn(5, cols)
    torch.testing.assert_close(back(x), layer(x), rtol=1e-6, atol=1e-6)
