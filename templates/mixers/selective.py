"""TTSM's selective SSM (Mamba-1 style, PR #1999) on the scan core's `selective_scan`.

(u, z) = in_proj(x); per step dt_t = softplus(conv(dt_proj u)_t), B_t = conv(B_proj u)_t, C_t = conv(C_proj u)_t
(depthwise causal convs of K taps with zero-initialised biases, before the softplus), B and C L2-normalised over
the state; h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t with A = -exp(A_log) per (channel, state), A_log initialised
to log(n + 1); y_t = (C_t . h_t + D u_t) silu(z_t); out = out_proj(y) (zero-initialised). in_proj, B_proj,
C_proj and out_proj follow the variant's linear kind (ternary there); dt_proj (full rank, no bias), A_log, D and
the convolutions stay float. The state h is fp32 in the scan.

`forward_stateful(x, state)` continues a sequence: the state is the conv tails and the scan's final h, so
scoring two consecutive windows with the state carried equals scoring their concatenation.
"""

import torch
import torch.nn.functional as F
from torch import nn

from templates.layers import LinearMaker
from templates.mixers.causal_conv import causal_conv, conv_init_
from templates.registry import register_mixer
from templates.scan.selective import selective_scan

SelectiveState = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@register_mixer("selective")
class SelectiveSSM(nn.Module):
    OPTIONS = {
        "expand": ("SSM_EXPAND", 1),
        "state": ("SSM_STATE", 64),
        "conv": ("SSM_CONV", 4),
        "normalize_bc": ("SSM_NORMALIZE_BC", True),
    }

    def __init__(
        self, dim: int, linear: LinearMaker, expand: int = 1, state: int = 64, conv: int = 4, normalize_bc: bool = True
    ) -> None:
        super().__init__()
        inner = expand * dim
        self.inner, self.normalize_bc = inner, normalize_bc
        self.in_proj = linear(dim, 2 * inner)
        self.dt_proj = linear(inner, inner, body=False)
        self.B_proj = linear(inner, state)
        self.C_proj = linear(inner, state)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D_skip = nn.Parameter(torch.ones(inner))
        for name, width in (("dt", inner), ("B", state), ("C", state)):
            weight, bias = nn.Parameter(torch.empty(width, 1, conv)), nn.Parameter(torch.empty(width))
            conv_init_(weight, bias, zero_bias=True)
            self.register_parameter(f"{name}_conv_weight", weight)
            self.register_parameter(f"{name}_conv_bias", bias)
        self.out_proj = linear(inner, dim, zero_init=True)

    def _run(self, x: torch.Tensor, state: SelectiveState | None, want_state: bool):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        tails = state[0] if state is not None else (None, None, None)
        delta, dt_tail = causal_conv(self.dt_proj(u).float(), self.dt_conv_weight, self.dt_conv_bias, tails[0])
        b, b_tail = causal_conv(self.B_proj(u).float(), self.B_conv_weight, self.B_conv_bias, tails[1])
        c, c_tail = causal_conv(self.C_proj(u).float(), self.C_conv_weight, self.C_conv_bias, tails[2])
        if self.normalize_bc:
            b, c = F.normalize(b, dim=-1), F.normalize(c, dim=-1)
        A = -torch.exp(self.A_log.float())
        h0 = state[1] if state is not None else None
        out = selective_scan(
            u, delta, A, b, c, D=self.D_skip.float(), z=z, delta_softplus=True, h0=h0, return_final_state=want_state
        )
        if not want_state:
            return self.out_proj(out), None
        y, h = out
        return self.out_proj(y), ((dt_tail, b_tail, c_tail), h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, want_state=False)[0]

    def forward_stateful(self, x: torch.Tensor, state: SelectiveState | None) -> tuple[torch.Tensor, SelectiveState]:
        """(output, state to pass with the next window of the same sequences)."""
        return self._run(x, state, want_state=True)
