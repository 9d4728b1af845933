"""Mamba-3 SISO mixer on the scan core's `mamba3_siso_scan` (no mamba_ssm dependency).

One projection `in_proj` (dim -> 2 d_inner + 2 N + 3 H + R rows, d_inner = expand * dim, H = d_inner / head_dim
heads, N = d_state, R = N * rope_fraction / 2 rotary pairs) gives, per token,
    z (d_inner) | v (d_inner) | B (N) | C (N) | dd_dt (H) | dd_A (H) | trap (H) | angle (R)
and the mixer computes, per head h:
    DT = softplus(dd_dt + dt_bias)                    dt_bias: inverse softplus of log-uniform [dt_min, dt_max]
    A  = -max(softplus(dd_A), A_floor)                input-dependent decay rate, always negative
    k  = rms_norm(B) * B_norm_weight + B_bias[h]      q likewise from C (one group shared by all heads)
    theta_t = theta_{t-1} + pi tanh(angle_t) DT_t     data-dependent rotation of the first 2R state dims of q, k
    lambda = sigmoid(trap)                            trapezoidal mix of the current and the previous input
    S_t = e^{A DT} S_{t-1} + e^{A DT} DT (1-lambda) v_{t-1} k~_{t-1}^T + lambda DT v_t k~_t^T
    y_t = S_t q~_t + D_skip[h] v_t,   out = out_proj(y * silu(z))
The rows dd_dt and dd_A of in_proj (2 H rows) are the dynamics rows: `in_proj.wide_rows` names them so that the
export can give them a finer grid. `forward_stateful` carries (theta, S, k, v) across windows.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from templates.layers import LinearMaker
from templates.registry import register_mixer
from templates.scan.mamba3 import mamba3_siso_scan


def m3mix_dt_bias(n: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """Biases b with softplus(b) log-uniform in [dt_min, dt_max]: b = dt + log(1 - exp(-dt))."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))


@register_mixer("mamba3")
class Mamba3Mixer(nn.Module):
    OPTIONS = {
        "d_state": ("MAMBA3_D_STATE", 64),
        "expand": ("MAMBA3_EXPAND", 2),
        "head_dim": ("MAMBA3_HEADDIM", 64),
        "chunk_size": ("MAMBA3_CHUNK_SIZE", 64),
        "rope_fraction": ("MAMBA3_ROPE_FRACTION", 0.5),
        "a_floor": ("MAMBA3_A_FLOOR", 1e-4),
        "dt_min": ("MAMBA3_DT_MIN", 1e-3),
        "dt_max": ("MAMBA3_DT_MAX", 0.1),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        d_state: int = 64,
        expand: int = 2,
        head_dim: int = 64,
        chunk_size: int = 64,
        rope_fraction: float = 0.5,
        a_floor: float = 1e-4,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        d_inner = expand * dim
        if d_inner % head_dim or d_state % 2:
            raise ValueError(f"mamba3: d_inner {d_inner} must be a multiple of MAMBA3_HEADDIM {head_dim}, "
                             f"MAMBA3_D_STATE {d_state} even")  # fmt: skip
        self.d_inner, self.d_state, self.head_dim = d_inner, d_state, head_dim
        self.heads = d_inner // head_dim
        self.angles = max(1, int(d_state * rope_fraction) // 2)
        self.chunk_size, self.a_floor = chunk_size, a_floor
        self.split = (d_inner, d_inner, d_state, d_state, self.heads, self.heads, self.heads, self.angles)
        self.in_proj = linear(dim, sum(self.split))
        first = 2 * d_inner + 2 * d_state
        self.in_proj.wide_rows = (first, first + 2 * self.heads)  # dd_dt then dd_A
        self.out_proj = linear(d_inner, dim)
        self.dt_bias = nn.Parameter(m3mix_dt_bias(self.heads, dt_min, dt_max))
        self.B_bias = nn.Parameter(torch.ones(self.heads, d_state))
        self.C_bias = nn.Parameter(torch.ones(self.heads, d_state))
        self.B_norm_weight = nn.Parameter(torch.ones(d_state))
        self.C_norm_weight = nn.Parameter(torch.ones(d_state))
        self.D_skip = nn.Parameter(torch.ones(self.heads))

    def _scan(self, x: torch.Tensor, state: tuple | None, keep_state: bool):
        batch, seq_len, _ = x.shape
        z, v, b, c, dd_dt, dd_a, trap, angle = torch.split(self.in_proj(x), self.split, dim=-1)
        dt = F.softplus(dd_dt.float() + self.dt_bias.float())
        adt = -torch.clamp(F.softplus(dd_a.float()), min=self.a_floor) * dt
        k = F.rms_norm(b.unsqueeze(2), (self.d_state,), weight=self.B_norm_weight.to(b.dtype))
        q = F.rms_norm(c.unsqueeze(2), (self.d_state,), weight=self.C_norm_weight.to(c.dtype))
        angles = (math.pi * torch.tanh(angle.float())).unsqueeze(2).expand(batch, seq_len, self.heads, self.angles)
        heads = (batch, seq_len, self.heads, self.head_dim)
        out = mamba3_siso_scan(
            v.reshape(heads), dt, adt, trap, q, k, angles, q_bias=self.C_bias, k_bias=self.B_bias,
            D=self.D_skip, z=z.reshape(heads), chunk_size=self.chunk_size, initial_state=state,
            return_final_state=keep_state,
        )  # fmt: skip
        y, new_state = out if keep_state else (out, None)
        return self.out_proj(y.reshape(batch, seq_len, self.d_inner)), new_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scan(x, None, False)[0]

    def forward_stateful(self, x: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """The window's output and the state (theta, S, k, v) the next window of the same stream starts from."""
        return self._scan(x, state, True)
