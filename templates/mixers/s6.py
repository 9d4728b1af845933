"""S6, the Mamba-1 selective state-space mixer, on the scan core's `selective_scan`.

    x, z = in_proj(h)                                          (d_inner = expand * dim each)
    x = silu(causal depthwise conv_k(x) + conv_bias)           (causal_conv: shifted multiply-adds that fuse)
    dt = softplus(dt_proj(r) + dt_bias),  B, C from x_proj(x)  (r: the first dt_rank outputs of x_proj, or x itself
                                                               when dt is full-rank, S6_DT_RANK=0)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,  A = -exp(A_log)  (d_inner x d_state, A_log = log(1..d_state))
    y = C_t h_t + D_skip x_t,  out = out_proj(y * silu(z))
The dynamics projections (x_proj, dt_proj) stay float whatever LINEAR_KIND says. `forward_stateful` carries the
convolution's last inputs and the scan state across windows.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from templates.layers import LinearMaker
from templates.mixers.causal_conv import causal_conv
from templates.registry import register_mixer
from templates.scan.selective import selective_scan


@register_mixer("s6")
class S6Mixer(nn.Module):
    OPTIONS = {
        "d_state": ("S6_D_STATE", 16),
        "expand": ("S6_EXPAND", 2.0),
        "dt_rank": ("S6_DT_RANK", 0),
        "conv": ("S6_CONV", 4),
        "dt_min": ("S6_DT_MIN", 1e-3),
        "dt_max": ("S6_DT_MAX", 0.1),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int = 0,
        conv: int = 4,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        d_inner = int(round(expand * dim))
        self.d_inner, self.d_state, self.dt_rank, self.conv = d_inner, d_state, dt_rank, conv
        self.in_proj = linear(dim, 2 * d_inner)
        self.conv_weight = nn.Parameter(torch.empty(d_inner, 1, conv).uniform_(-1.0, 1.0) / math.sqrt(conv))
        self.conv_bias = nn.Parameter(torch.zeros(d_inner))
        self.x_proj = linear(d_inner, dt_rank + 2 * d_state, body=False)
        self.dt_proj = linear(dt_rank or d_inner, d_inner, body=False)
        with torch.no_grad():
            bound = (dt_rank or d_inner) ** -0.5
            self.dt_proj.weight.uniform_(-bound, bound)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D_skip = nn.Parameter(torch.ones(d_inner))
        self.out_proj = linear(d_inner, dim, zero_init=True)

    def _run(self, h: torch.Tensor, state: tuple | None, keep_state: bool):
        x, z = self.in_proj(h).chunk(2, dim=-1)
        tail, h0 = state if state is not None else (None, None)
        xc, new_tail = causal_conv(x, self.conv_weight, self.conv_bias, tail)
        x = F.silu(xc)
        r, b, c = torch.split(self.x_proj(x), (self.dt_rank, self.d_state, self.d_state), dim=-1)
        delta = self.dt_proj(r if self.dt_rank else x)
        out = selective_scan(
            x.contiguous(), delta.contiguous(), -torch.exp(self.A_log.float()), b.contiguous(), c.contiguous(),
            D=self.D_skip.float(), z=z.contiguous(), delta_bias=self.dt_bias.float(), delta_softplus=True, h0=h0,
            return_final_state=keep_state,
        )  # fmt: skip
        y, h_last = out if keep_state else (out, None)
        return self.out_proj(y), ((new_tail, h_last) if keep_state else None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._run(h, None, False)[0]

    def forward_stateful(self, h: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """The window's output and (conv tail [b, conv-1, d_inner], scan state [b, d_inner, d_state])."""
        return self._run(h, state, True)
