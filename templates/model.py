"""The stack: token embedding, blocks with residual mixing and U-Net skips, tied output head with a logit softcap."""

import torch
import torch.nn.functional as F
from torch import nn

from templates.hparams import Hyperparameters
from templates.layers import CastedLinear, ReluSquaredMLP, RMSNorm, rms_norm
from templates.mixers.attention import CausalSelfAttention


class Block(nn.Module):
    """x <- mix(x, x0); x <- x + attn_scale * attn(norm x); x <- x + mlp_scale * mlp(norm x)."""

    def __init__(self, hp: Hyperparameters) -> None:
        super().__init__()
        dim = hp.model_dim
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, hp.num_heads, hp.num_kv_heads, hp.rope_base, hp.qk_gain_init)
        self.mlp = ReluSquaredMLP(dim, hp.mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.attn_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Blocks in two halves: the first half stores its outputs, the second half adds them back in reverse order."""

    def __init__(self, hp: Hyperparameters) -> None:
        super().__init__()
        if hp.logit_softcap <= 0:
            raise ValueError(f"LOGIT_SOFTCAP must be positive, got {hp.logit_softcap}")
        self.logit_softcap = hp.logit_softcap
        self.tie_embeddings = hp.tie_embeddings
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        self.num_encoder_layers = hp.num_layers // 2
        self.num_decoder_layers = hp.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, hp.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList(Block(hp) for _ in range(hp.num_layers))
        self.final_norm = RMSNorm()
        self.lm_head = None if hp.tie_embeddings else CastedLinear(hp.model_dim, hp.vocab_size, zero_init=True)
        with torch.no_grad():
            std = hp.tied_embed_init_std if hp.tie_embeddings else 1.0
            self.tok_emb.weight.normal_(mean=0.0, std=std)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        skips = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0)
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = self.blocks[self.num_encoder_layers + i](x, x0)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = F.linear(x, self.tok_emb.weight.to(x.dtype))
        else:
            logits = self.lm_head(x)
        return self.logit_softcap * torch.tanh(logits.float() / self.logit_softcap)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.logits(input_ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.reshape(target_ids.shape)
