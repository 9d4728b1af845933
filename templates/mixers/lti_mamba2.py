"""kill-Mamba-2: a Mamba-2 block whose dt, B and C are learned constants (linear time-invariant), run as per-head
exponential moving averages on the scan core's LTI path.

Mamba-2 with time-constant dt_h, B and C: the SSD state h_t = a_h h_{t-1} + dt_h u_t B^T read out with C gives
y_t = (B . C) dt_h sum_{s <= t} a_h^(t - s) u_s, with a_h = exp(-exp(A_log_h) softplus(dt_bias_h)). The N-wide
state is therefore degenerate: one EMA per channel, decaying per head, with gain k dt_h (k = B . C, one scalar).
The block keeps everything else of Mamba-2: in_proj to (x, z), depthwise causal conv (K taps, bias) and SiLU on x,
the D skip, the SiLU(z) gate, out_proj (zero-initialised).

in_proj also has the rows Mamba-2 would use for B, C and dt (2 N + H of them). In kill mode they receive no
gradient and are never read, but they are part of the ternary tensor whose absmean scale the live rows share,
and of the parameter count of the origin (PR #1994); DEAD_ROWS=0 drops them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from templates.layers import LinearMaker
from templates.mixers.causal_conv import causal_conv, conv_init_
from templates.registry import register_mixer
from templates.scan.first_order import lti_scan


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


@register_mixer("lti_mamba2")
class LtiMamba2(nn.Module):
    OPTIONS = {
        "expand": ("SSM_EXPAND", 2),
        "head_dim": ("SSM_HEAD_DIM", 64),
        "state": ("SSM_STATE", 64),
        "conv": ("SSM_CONV", 4),
        "dead_rows": ("DEAD_ROWS", True),
        "scan_method": ("LTI_SCAN_METHOD", "toeplitz"),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        expand: int = 2,
        head_dim: int = 64,
        state: int = 64,
        conv: int = 4,
        dead_rows: bool = True,
        scan_method: str = "toeplitz",
    ) -> None:
        super().__init__()
        inner = expand * dim
        if inner % head_dim:
            raise ValueError(f"lti_mamba2: inner width {inner} is not a multiple of SSM_HEAD_DIM {head_dim}")
        if scan_method not in ("scan", "toeplitz"):
            raise ValueError(f"lti_mamba2: LTI_SCAN_METHOD must be scan or toeplitz, got {scan_method!r}")
        self.inner, self.heads, self.head_dim = inner, inner // head_dim, head_dim
        self.scan_config = {"method": scan_method}
        extra = 2 * state + self.heads if dead_rows else 0
        self.in_proj = linear(dim, 2 * inner + extra)
        self.conv_weight = nn.Parameter(torch.empty(inner, 1, conv))
        self.conv_bias = nn.Parameter(torch.empty(inner))
        conv_init_(self.conv_weight, self.conv_bias, zero_bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.heads))  # A = -1
        dt = torch.exp(torch.empty(self.heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(inverse_softplus(dt))
        self.D_skip = nn.Parameter(torch.ones(inner))
        self.B_const = nn.Parameter(torch.randn(state) / 8)
        self.C_const = nn.Parameter(torch.randn(state) / 8)
        self.out_proj = linear(inner, dim, zero_init=True)

    def decay_and_gain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log a_h, k dt_h), each (H,) fp32."""
        dt = F.softplus(self.dt_bias.float())
        log_a = -torch.exp(self.A_log.float()) * dt
        return log_a, torch.dot(self.B_const.float(), self.C_const.float()) * dt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(x)
        branch, z = xz[..., : self.inner], xz[..., self.inner : 2 * self.inner]
        u = F.silu(causal_conv(branch, self.conv_weight, self.conv_bias)[0])
        log_a, gain = self.decay_and_gain()
        scaled = u * gain.repeat_interleave(self.head_dim).to(u.dtype)
        shape = scaled.shape
        h = lti_scan(scaled.reshape(-1, shape[-2], shape[-1]), log_a, config=self.scan_config).view(shape)
        y = (h + self.D_skip.to(u.dtype) * u) * F.silu(z)
        return self.out_proj(y)
