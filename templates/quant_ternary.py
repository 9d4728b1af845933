"""Ternary quantisers: codes in {-1, 0, +1} of the weights of ternary linears, packed densely.

  ternary2   4 codes per byte, 2 bits each (code + 1), the first code in the low bits
  ternary5   5 codes per byte in base 3: sum of (code_k + 1) * 3^k, padded with the zero code
Codes come from the absmean scale, as in the forward; the stored scale is absmean or, with TERNARY_LSTSQ=1, the
least-squares fit of the float weights by scale * codes; per tensor or per row, as the linear itself. A warm start
(TERNARY_WARMSTART_FRAC of the time in float, then a ramp over TERNARY_RAMP_FRAC of the rest) is a step stage.
"""

from typing import Any

import torch
from torch import Tensor

from templates.layers import TernaryLinear, ternarize, ternary_scale
from templates.quant import Quantiser
from templates.registry import QUANTISERS, STAGES, register


def pack_2bit(codes: Tensor) -> Tensor:
    """Codes in {0, 1, 2} (flat) -> uint8, four per byte, the first in the low two bits; padded with 0."""
    c = codes.to(torch.uint8).flatten()
    c = torch.cat((c, c.new_zeros(-c.numel() % 4))).view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_2bit(packed: Tensor, n: int) -> Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 3).flatten()[:n]


def pack_base3(codes: Tensor) -> Tensor:
    """Codes in {0, 1, 2} (flat) -> uint8, five per byte as sum(code_k * 3^k); padded with 1 (the zero trit)."""
    c = codes.to(torch.int16).flatten()
    c = torch.cat((c, c.new_ones(-c.numel() % 5))).view(-1, 5)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
    return (c * powers).sum(dim=1).to(torch.uint8)


def unpack_base3(packed: Tensor, n: int) -> Tensor:
    v = packed.to(torch.int16)[:, None]
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
    return ((v // powers) % 3).flatten()[:n].to(torch.uint8)


def ternary_encode(t: Tensor, opts: dict, pack: Any) -> dict[str, Tensor]:
    """Codes from the absmean scale (the forward's); the stored scale is absmean or, with opts["lstsq"], the least-
    squares fit of the float weights by scale * codes (per row or per tensor, as opts["per_row"])."""
    w = t.detach().float()
    per_row = bool(opts.get("per_row")) and w.ndim == 2
    rows = w.reshape(w.size(0), -1) if per_row else w.reshape(1, -1)
    trits = ternarize(rows, ternary_scale(rows, per_row=True))
    if opts.get("lstsq"):
        scale = (rows * trits).sum(dim=1) / (trits * trits).sum(dim=1).clamp_min(1.0)
    else:
        scale = rows.abs().mean(dim=1).clamp_min(1e-8)
    shape = torch.tensor(list(w.shape), dtype=torch.int64)
    return {"codes": pack(trits + 1), "scale": scale.float(), "shape": shape}


def ternary_decode(fields: dict[str, Tensor], unpack: Any) -> Tensor:
    """Weights a TernaryLinear maps back to scale * codes: a TernaryLinear re-derives its scale as mean |w|, so
    each nonzero code is stored as scale / (share of nonzero codes), whose mean |w| is the scale again."""
    shape = [int(d) for d in fields["shape"].tolist()]
    scale = fields["scale"].float().view(-1, 1)
    n = 1
    for d in shape:
        n *= d
    trits = unpack(fields["codes"], n).float().view(scale.size(0), -1) - 1.0
    share = (trits != 0).float().mean(dim=1, keepdim=True)
    alpha = torch.where(share > 0, scale / share.clamp_min(1e-12), torch.zeros_like(share))
    return (trits * alpha).view(shape)


register(QUANTISERS, "ternary2")(
    Quantiser(lambda t, o: ternary_encode(t, o, pack_2bit), lambda f: ternary_decode(f, unpack_2bit))
)
register(QUANTISERS, "ternary5")(
    Quantiser(lambda t, o: ternary_encode(t, o, pack_base3), lambda f: ternary_decode(f, unpack_base3))
)


def ternary_mix(elapsed_ms: float, cap_ms: float | None, warmstart_frac: float, ramp_frac: float) -> float:
    """How ternary the ternary linears are now: 0 during the float warm start, then a linear ramp to 1."""
    if warmstart_frac <= 0 or cap_ms is None:
        return 1.0
    start_ms = warmstart_frac * cap_ms
    return min(1.0, max(0.0, (elapsed_ms - start_ms) / max(ramp_frac * (cap_ms - start_ms), 1e-9)))


@register(STAGES, "step:ternary_ramp")
def ternary_ramp(
    model: torch.nn.Module, hp: Any, lr_scale: float, elapsed_ms: float, cap_ms: float | None, log
) -> None:
    """Before each step: set every ternary linear's quant_mix for the time elapsed."""
    mix = ternary_mix(elapsed_ms, cap_ms, hp.ternary_warmstart_frac, hp.ternary_ramp_frac)
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.quant_mix.fill_(mix)
