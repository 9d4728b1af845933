"""The parts every block is made of: the weightless RMS norm, the two linear kinds (float and ternary) and the MLPs.

A mixer asks for its projections through a `LinearMaker`, so the same mixer is float in one variant and ternary in
another: `linear(d_in, d_out)` follows the variant's LINEAR_KIND, `linear(d_in, d_out, body=False)` stays float
(dynamics projections, small tables).
"""

import torch
import torch.nn.functional as F
from torch import nn

from templates.registry import MLPS, register


def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class RMSNorm(nn.Module):
    """RMS norm over the last dimension, without a learned gain."""

    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps)


class CastedLinear(nn.Linear):
    """Bias-free linear map; the master weight stays fp32 and meets the input in the input's dtype."""

    def __init__(self, d_in: int, d_out: int, zero_init: bool = False) -> None:
        super().__init__(d_in, d_out, bias=False)
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def ternary_scale(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The absmean scale of a weight: one per tensor, or one per output row (shape [rows, 1])."""
    a = w.abs()
    scale = a.mean(dim=1, keepdim=True) if per_row else a.mean()
    return scale.clamp_min(1e-8)


def ternarize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, +1}: w / scale rounded and clipped."""
    return torch.clamp(torch.round(w / scale), -1.0, 1.0)


class TernaryLinear(CastedLinear):
    """BitNet-b1.58 linear map: the forward sees scale * ternary(w / scale); gradients pass straight through.

    `quant_mix` (a buffer, 0..1) blends the float and ternary weights, so a warm start can train float first and
    ramp into ternary without recompiling.
    """

    def __init__(self, d_in: int, d_out: int, zero_init: bool = False, per_row: bool = False) -> None:
        super().__init__(d_in, d_out, zero_init)
        self.per_row = per_row
        self.register_buffer("quant_mix", torch.ones(()), persistent=False)

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        scale = ternary_scale(w.detach(), self.per_row)
        q = ternarize(w.detach(), scale) * scale
        return w + self.quant_mix * (q - w.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype))


class LinearMaker:
    """Makes a block's projections of the variant's kind: "float" or "ternary" (absmean per tensor or per row)."""

    def __init__(self, kind: str = "float", ternary_per_row: bool = False) -> None:
        if kind not in ("float", "ternary"):
            raise ValueError(f"LINEAR_KIND must be float or ternary, got {kind!r}")
        self.kind = kind
        self.ternary_per_row = ternary_per_row

    def __call__(self, d_in: int, d_out: int, zero_init: bool = False, body: bool = True) -> CastedLinear:
        if body and self.kind == "ternary":
            return TernaryLinear(d_in, d_out, zero_init, self.ternary_per_row)
        return CastedLinear(d_in, d_out, zero_init)


@register(MLPS, "relu2")
class ReluSquaredMLP(nn.Module):
    """down(relu(up x)^2); `down` starts at zero so a fresh block adds nothing."""

    def __init__(self, dim: int, hidden: int, linear: LinearMaker) -> None:
        super().__init__()
        self.up = linear(dim, hidden)
        self.down = linear(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)).square())


@register(MLPS, "leaky_relu2")
class LeakyReluSquaredMLP(ReluSquaredMLP):
    """down(leaky_relu(up x, 0.5)^2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.leaky_relu(self.up(x), negative_slope=0.5).square())


@register(MLPS, "swiglu")
class SwiGLUMLP(nn.Module):
    """down(silu(gate x) * up x)."""

    def __init__(self, dim: int, hidden: int, linear: LinearMaker) -> None:
        super().__init__()
        self.gate = linear(dim, hidden)
        self.up = linear(dim, hidden)
        self.down = linear(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
