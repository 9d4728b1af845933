"""Causal self-attention: grouped-query heads, rotary positions, RMS-normed queries and keys with a learned gain
per query head, optionally SiLU on the values; flash attention through PyTorch's SDPA.
"""

import torch
import torch.nn.functional as F
from torch import nn

from templates.layers import LinearMaker, rms_norm
from templates.registry import register_mixer


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, each [seq_len, head_dim] (the half-dim table written twice)."""
    freqs = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (i, i + d/2) of the last dimension by the tables' angles."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((second, -first), dim=-1) * sin


@register_mixer("attention")
class CausalSelfAttention(nn.Module):
    OPTIONS = {
        "heads": ("NUM_HEADS", 8),
        "kv_heads": ("NUM_KV_HEADS", 4),
        "rope_base": ("ROPE_BASE", 10_000.0),
        "qk_gain": ("QK_GAIN_INIT", 1.5),
        "value_silu": ("ATTN_VALUE_SILU", False),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        heads: int = 8,
        kv_heads: int = 4,
        rope_base: float = 10_000.0,
        qk_gain: float = 1.5,
        value_silu: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads or heads % kv_heads or (dim // heads) % 2:
            raise ValueError(f"attention: MODEL_DIM {dim}, NUM_HEADS {heads}, NUM_KV_HEADS {kv_heads} do not divide")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.rope_base = rope_base
        self.value_silu = value_silu
        self.q_proj = linear(dim, dim)
        self.k_proj = linear(dim, kv_heads * self.head_dim)
        self.v_proj = linear(dim, kv_heads * self.head_dim)
        self.out_proj = linear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((heads,), float(qk_gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape

        def heads_first(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, seq_len, n, self.head_dim).transpose(1, 2)

        q = rms_norm(heads_first(self.q_proj(x), self.heads))
        k = rms_norm(heads_first(self.k_proj(x), self.kv_heads))
        v = heads_first(self.v_proj(x), self.kv_heads)
        if self.value_silu:
            v = F.silu(v)
        cos, sin = rotary_tables(seq_len, self.head_dim, self.rope_base, x.device)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = rotate(q, cos, sin) * self.q_gain.to(q.dtype).view(1, -1, 1, 1)
        k = rotate(k, cos, sin)
        grouped = self.kv_heads != self.heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq_len, dim))
