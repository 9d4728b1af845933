"""Linear recurrent unit: a complex diagonal recurrence per channel, normalised as in the LRU paper, gated.

    u = in_proj x,  g = sigmoid(gate_proj x)                      (d channels)
    a = exp(-exp(nu) + i theta)                                   (d x n complex poles, |a| = exp(-exp(nu)) < 1)
    h_t = a h_{t-1} + gamma (B u_t),  gamma = sqrt(1 - |a|^2)      (n complex states per channel, B complex d x n)
    y_t = sum_n Re(C h_t) + D_skip u_t,   out = out_proj(g * y)
The poles start on the ring r_min <= |a| <= r_max with phases in [0, max_phase) (the paper's ring init); gamma is
derived from nu, so the input's energy is matched to each pole's memory and h stays of the size of B u whatever
the sequence length. The recurrence runs on the scan core's complex first-order scan (fp32 state), which is stable
at any length, unlike a global cumulative sum of log a. `forward_stateful` carries h across windows.
"""

import math

import torch
from torch import nn

from templates.layers import LinearMaker
from templates.registry import register_mixer
from templates.scan.first_order import first_order_scan_complex


def lru_ring_init(d: int, n: int, r_min: float, r_max: float, max_phase: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(nu, theta): |a| = exp(-exp(nu)) uniform in area on the ring [r_min, r_max], phase uniform in [0, max_phase)."""
    u = torch.rand(d, n)
    radius_sq = r_min**2 + u * (r_max**2 - r_min**2)
    nu = torch.log(-0.5 * torch.log(radius_sq))
    return nu, max_phase * torch.rand(d, n)


@register_mixer("lru")
class LRUMixer(nn.Module):
    OPTIONS = {
        "d_state": ("LRU_STATE", 2),
        "r_min": ("LRU_R_MIN", 0.9),
        "r_max": ("LRU_R_MAX", 0.999),
        "max_phase": ("LRU_MAX_PHASE", 2 * math.pi),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        d_state: int = 2,
        r_min: float = 0.9,
        r_max: float = 0.999,
        max_phase: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        if not 0.0 < r_min <= r_max < 1.0:
            raise ValueError(f"lru: need 0 < LRU_R_MIN ({r_min}) <= LRU_R_MAX ({r_max}) < 1")
        self.d_state = d_state
        self.in_proj = linear(dim, dim)
        self.gate_proj = linear(dim, dim)
        self.out_proj = linear(dim, dim, zero_init=True)
        nu, theta = lru_ring_init(dim, d_state, r_min, r_max, max_phase)
        self.nu_log = nn.Parameter(nu)
        self.pole_phase = nn.Parameter(theta)
        scale = 1.0 / math.sqrt(2 * d_state)
        self.B_re = nn.Parameter(torch.randn(dim, d_state) * scale)
        self.B_im = nn.Parameter(torch.randn(dim, d_state) * scale)
        self.C_re = nn.Parameter(torch.randn(dim, d_state) * scale)
        self.C_im = nn.Parameter(torch.randn(dim, d_state) * scale)
        self.D_skip = nn.Parameter(torch.ones(dim))

    def poles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Re a, Im a, gamma), each [d, n] fp32."""
        rate = torch.exp(self.nu_log.float())
        modulus = torch.exp(-rate)
        gamma = torch.sqrt(-torch.expm1(-2.0 * rate))  # sqrt(1 - |a|^2), accurate when |a| is near 1
        theta = self.pole_phase.float()
        return modulus * torch.cos(theta), modulus * torch.sin(theta), gamma

    def _run(self, x: torch.Tensor, state: tuple | None, keep_state: bool):
        batch, seq_len, dim = x.shape
        u = self.in_proj(x).float()
        a_re, a_im, gamma = self.poles()
        drive = u.unsqueeze(-1) * gamma  # [b, t, d, n]
        b_re = (drive * self.B_re.float()).flatten(2)
        b_im = (drive * self.B_im.float()).flatten(2)
        # the poles are constant in time: the scan reads one per channel and sums their gradient itself
        out = first_order_scan_complex(
            a_re.flatten(), a_im.flatten(), b_re, b_im, h0=state, return_final_state=keep_state
        )
        h_re, h_im = out[0].view(batch, seq_len, dim, -1), out[1].view(batch, seq_len, dim, -1)
        y = (h_re * self.C_re.float() - h_im * self.C_im.float()).sum(-1) + self.D_skip.float() * u
        g = torch.sigmoid(self.gate_proj(x))
        return self.out_proj(g * y.to(g.dtype)), (out[2] if keep_state else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, False)[0]

    def forward_stateful(self, x: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """The window's output and the complex state (re, im), each [batch, d * n] fp32, for the next window."""
        return self._run(x, state, True)
