"""Quantisers: each turns one float tensor into a few small tensors (`encode`) and back (`decode`), with
everything `decode` needs stored among them. Registered by name; the export pipeline picks one per tensor.

  float16 / float32   the tensor as it is, in that dtype
  int8 / int6         per output row (1-D tensors: per tensor) symmetric integers with a clip at a high quantile
                      of |w|; the row scale never drops below 1/qmax, so rows whose clip is under 1 share the fixed
                      grid k/qmax, which compresses far better than a grid per row
  ternary2 / ternary5 codes in {-1, 0, +1} (absmean codes; scale absmean or least squares, per tensor or per row)
                      packed 4 codes per byte (2 bits each, first code in the low bits) or 5 per byte (base 3)
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor

from templates.layers import ternarize, ternary_scale
from templates.registry import register_quantiser

CLIP_QUANTILE = 0.9999984


class Quantiser(NamedTuple):
    encode: Any  # (tensor, options) -> dict[str, Tensor]
    decode: Any  # dict[str, Tensor] -> float32 tensor


def _as_float(fields: dict[str, Tensor]) -> Tensor:
    return fields["w"].float()


register_quantiser("float16")(Quantiser(lambda t, opts: {"w": t.detach().to(torch.float16)}, _as_float))
register_quantiser("float32")(Quantiser(lambda t, opts: {"w": t.detach().to(torch.float32)}, _as_float))


def clip_values(w: Tensor) -> Tensor:
    """|w| at CLIP_QUANTILE, per row of a matrix ([rows, 1]) or of the whole tensor (a scalar)."""
    a = w.abs()
    if w.ndim == 2 and w.size(1) > 1:
        return torch.quantile(a, CLIP_QUANTILE, dim=1, keepdim=True)
    flat = a.flatten()
    if flat.numel() > 1 << 24:  # torch.quantile's input limit: use the k-th value
        k = max(1, int(round(CLIP_QUANTILE * flat.numel())))
        return flat.kthvalue(k).values
    return torch.quantile(flat, CLIP_QUANTILE)


def integer_encode(t: Tensor, qmax: int) -> dict[str, Tensor]:
    w = t.detach().float()
    if w.numel() == 0:
        return {"q": torch.zeros(w.shape, dtype=torch.int8), "scale": torch.ones(1, dtype=torch.float16)}
    clip = clip_values(w)
    scale = torch.maximum(clip / qmax, torch.full_like(clip, 1.0 / qmax)).to(torch.float16)
    bound = clip if w.ndim == 2 else clip.reshape(())
    q = torch.round(w.clamp(-bound, bound) / scale.float()).clamp(-qmax, qmax).to(torch.int8)
    return {"q": q, "scale": scale}


def integer_decode(fields: dict[str, Tensor]) -> Tensor:
    return fields["q"].float() * fields["scale"].float()


register_quantiser("int8")(Quantiser(lambda t, opts: integer_encode(t, 127), integer_decode))
register_quantiser("int6")(Quantiser(lambda t, opts: integer_encode(t, 31), integer_decode))


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


register_quantiser("ternary2")(
    Quantiser(lambda t, o: ternary_encode(t, o, pack_2bit), lambda f: ternary_decode(f, unpack_2bit))
)
register_quantiser("ternary5")(
    Quantiser(lambda t, o: ternary_encode(t, o, pack_base3), lambda f: ternary_decode(f, unpack_base3))
)
