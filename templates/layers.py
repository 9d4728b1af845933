"""Building blocks shared by every variant: RMS norm, a linear layer kept in fp32 and cast at use, the ReLU^2 MLP."""

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class RMSNorm(nn.Module):
    """Weightless RMS norm over the last dimension."""

    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps)


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose master weight stays fp32 and is cast to the input's dtype at each call."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class ReluSquaredMLP(nn.Module):
    """x -> proj(relu(fc(x))^2); the output projection starts at zero so each block starts as the identity."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim)
        self.proj = CastedLinear(mult * dim, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


def keep_control_params_fp32(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """After a bf16 cast, put small and control parameters (gains, mixes, scales) back in fp32."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim < 2 or any(pat in name for pat in patterns)) and p.dtype != torch.float32:
                p.data = p.data.float()
