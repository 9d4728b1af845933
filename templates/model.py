"""The stack, built from a ModelConfig: token embedding (plus optional input features), blocks of mixers and MLPs
with per-branch learned scales, depth recurrence, U-Net skips between the halves, and a tied or separate output
head with a logit softcap.

Stateful scoring: `logits(ids, states)` carries each mixer's recurrent state across calls where the mixer supports
it (a `forward_stateful(x, state) -> (y, state)` method); mixers without one see each window on its own.
"""

import torch
import torch.nn.functional as F
from torch import nn

from templates.config import LayerSpec, ModelConfig
from templates.layers import CastedLinear, LinearMaker, rms_norm
from templates.registry import FEATURES, MIXERS, MLPS, lookup


class Block(nn.Module):
    """x <- mix(x, x0); then each mixer branch (parallel: on one normed input; serial: one after the other),
    each added with its own per-channel scale; then the MLP, added with its scale."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig, linear: LinearMaker) -> None:
        super().__init__()
        dim = cfg.dim
        self.parallel = spec.parallel
        self.mixers = nn.ModuleList(
            lookup(MIXERS, "mixer", name)(dim, linear, **cfg.mixer_options.get(name, {})) for name in spec.mixers
        )
        self.branch_scales = nn.Parameter(torch.ones(len(spec.mixers), dim))
        self.mlp = None
        if spec.mlp != "none":
            self.mlp = lookup(MLPS, "MLP", spec.mlp)(dim, int(round(cfg.mlp_mult * dim)), linear)
            self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim)))) if cfg.x0_mix else None

    def _mix(self, i: int, h: torch.Tensor, states: dict | None) -> torch.Tensor:
        mixer = self.mixers[i]
        if states is None or not hasattr(mixer, "forward_stateful"):
            return mixer(h)
        y, states[id(mixer)] = mixer.forward_stateful(h, states.get(id(mixer)))
        return y

    def forward(self, x: torch.Tensor, x0: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        if self.resid_mix is not None:
            w = self.resid_mix.to(x.dtype)
            x = w[0] * x + w[1] * x0
        scales = self.branch_scales.to(x.dtype)
        if self.parallel:
            h = rms_norm(x)
            x = x + sum(scales[i] * self._mix(i, h, states) for i in range(len(self.mixers)))
        else:
            for i in range(len(self.mixers)):
                x = x + scales[i] * self._mix(i, rms_norm(x), states)
        if self.mlp is not None:
            x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))
        return x


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.logit_softcap <= 0:
            raise ValueError(f"LOGIT_SOFTCAP must be positive, got {cfg.logit_softcap}")
        if not cfg.layers:
            raise ValueError("the model has no layers: set LAYER_PATTERN and NUM_LAYERS")
        self.cfg = cfg
        linear = LinearMaker(cfg.linear_kind, cfg.ternary_per_row)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.features = nn.ModuleList(
            lookup(FEATURES, "input feature", name)(cfg.vocab_size, cfg.dim, **cfg.feature_options.get(name, {}))
            for name in cfg.features
        )
        self.blocks = nn.ModuleList(Block(spec, cfg, linear) for spec in cfg.layers)
        self.n_encoder = len(cfg.layers) // 2 if cfg.unet_skips else 0
        n_skips = min(self.n_encoder, len(cfg.layers) - self.n_encoder)
        self.skip_weights = nn.Parameter(torch.ones(cfg.loops, n_skips, cfg.dim)) if n_skips else None
        self.loop_pos = nn.Parameter(0.02 * torch.randn(cfg.loops, cfg.dim)) if cfg.loop_embedding else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.dim, cfg.vocab_size, zero_init=True)
        with torch.no_grad():
            self.tok_emb.weight.normal_(0.0, cfg.embed_init_std)
            if cfg.orthogonal_init:
                for m in self.modules():
                    if isinstance(m, CastedLinear) and not m.zero_init and min(m.weight.shape) >= 16:
                        nn.init.orthogonal_(m.weight)

    def embed(self, ids: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        x = self.tok_emb(ids)
        for f in self.features:  # a feature that looks back gets the previous window's tokens when scoring with state
            if states is None or not hasattr(f, "forward_stateful"):
                x = x + f(ids)
                continue
            out, states[id(f)] = f.forward_stateful(ids, states.get(id(f)))
            x = x + out
        x = rms_norm(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def hidden(self, ids: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        x = x0 = self.embed(ids, states)
        for loop in range(self.cfg.loops):
            if self.loop_pos is not None:
                x = x + self.loop_pos[loop].to(x.dtype)
            skips = []
            for depth, block in enumerate(self.blocks):
                if depth >= self.n_encoder and skips:
                    x = x + self.skip_weights[loop, depth - self.n_encoder].to(x.dtype) * skips.pop()
                x = block(x, x0, states)
                if depth < self.n_encoder:
                    skips.append(x)
        return rms_norm(x)

    def logits(self, ids: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        x = self.hidden(ids, states)
        raw = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(raw.float() / cap)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Mean training loss, or (reduction="none") the per-token losses shaped like `targets`."""
        logits = self.logits(ids)
        flat = logits.view(-1, logits.size(-1))
        losses = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
        if reduction == "none":
            return losses.view(targets.shape)
        loss = losses.mean()
        if self.cfg.z_loss > 0 and self.training:
            loss = loss + self.cfg.z_loss * torch.logsumexp(flat, dim=-1).square().mean()
        return loss
