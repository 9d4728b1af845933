"""Quantisers: each turns one float tensor into a few small tensors (`encode`) and back (`decode`), with
everything `decode` needs stored among them. Registered by name; the export pipeline picks one per tensor.

  float16 / float32   the tensor as it is, in that dtype
  int8 / int6         per output row (1-D tensors: per tensor) symmetric integers with a clip at a high quantile
                      of |w|; the row scale never drops below 1/qmax, so rows whose clip is under 1 share the fixed
                      grid k/qmax, which compresses far better than a grid per row
(The ternary quantisers are in their own section, present only in the variants with ternary linears.)
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor

from templates.registry import QUANTISERS, register

CLIP_QUANTILE = 0.9999984


class Quantiser(NamedTuple):
    encode: Any  # (tensor, options) -> dict[str, Tensor]
    decode: Any  # dict[str, Tensor] -> float32 tensor


def _as_float(fields: dict[str, Tensor]) -> Tensor:
    return fields["w"].float()


register(QUANTISERS, "float16")(Quantiser(lambda t, opts: {"w": t.detach().to(torch.float16)}, _as_float))
register(QUANTISERS, "float32")(Quantiser(lambda t, opts: {"w": t.detach().to(torch.float32)}, _as_float))


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


register(QUANTISERS, "int8")(Quantiser(lambda t, opts: integer_encode(t, 127), integer_decode))
register(QUANTISERS, "int6")(Quantiser(lambda t, opts: integer_encode(t, 31), integer_decode))
