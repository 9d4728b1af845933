"""Hashed n-gram input features (TTSM, PR #1999): small tables indexed by a hash of the current and previous
tokens, projected to the model width and added to the token embedding with a learned scale.

  bigram_hash    one table of BIGRAM_BUCKETS rows: bucket (36313 t_i XOR 27191 t_{i-1}) mod (buckets - 1);
                 the first position of a window, which has no previous token, takes the last bucket
  trigram_hash   two tables of TRIGRAM_BUCKETS rows, concatenated before the projection: the bigram hash
                 mod buckets, and the same XOR 12979 t_{i-2}; positions without enough history take bucket 0
In stateful scoring the previous window's last tokens are the history of a window's first positions.

The tables are float (never ternary; the artifact stores them as float or int8). The projection starts at zero
and the tables at N(0, NGRAM_INIT_STD^2): were both zero, as in the origin, neither would ever get a gradient.
"""

import torch
from torch import nn

from templates.layers import CastedLinear
from templates.registry import register_feature

HASH_CURRENT, HASH_PREVIOUS, HASH_SECOND = 36313, 27191, 12979


def ngram_mix(ids: torch.Tensor, order: int) -> torch.Tensor:
    """The XOR mix of the last `order` tokens at every position (int64, same shape as ids); positions with fewer
    than order - 1 predecessors give -1."""
    ids = ids.long()
    mixed = ids * HASH_CURRENT
    for back, mult in ((1, HASH_PREVIOUS), (2, HASH_SECOND))[: order - 1]:
        previous = torch.zeros_like(ids)
        previous[..., back:] = ids[..., :-back] * mult
        mixed = mixed ^ previous
    mixed[..., : order - 1] = -1
    return mixed


def bigram_buckets(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    mixed = ngram_mix(ids, 2)
    return torch.where(mixed < 0, buckets - 1, mixed % (buckets - 1))


def trigram_buckets(ids: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    pair, triple = ngram_mix(ids, 2), ngram_mix(ids, 3)
    return pair.clamp_min(0) % buckets, triple.clamp_min(0) % buckets


class _HashedTables(nn.Module):
    def __init__(self, dim: int, tables: int, buckets: int, width: int, scale: float, init_std: float) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(buckets, width) for _ in range(tables))
        for table in self.tables:
            nn.init.normal_(table.weight, 0.0, init_std)
        self.proj = CastedLinear(tables * width, dim, zero_init=True)
        self.feature_scale = nn.Parameter(torch.tensor(float(scale)))
        self.buckets = buckets

    def forward_stateful(self, ids: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of a window with the previous window's last two tokens as history (state: those tokens)."""
        if state is None:
            return self(ids), ids[:, -2:]
        joined = torch.cat((state, ids), dim=1)
        return self(joined)[:, state.size(1) :], joined[:, -2:]

    def project(self, indices: tuple[torch.Tensor, ...]) -> torch.Tensor:
        rows = torch.cat([table(i) for table, i in zip(self.tables, indices)], dim=-1)
        out = self.proj(rows)
        return self.feature_scale.to(out.dtype) * out


@register_feature("bigram_hash")
class BigramHash(_HashedTables):
    OPTIONS = {
        "buckets": ("BIGRAM_BUCKETS", 3072),
        "width": ("BIGRAM_DIM", 16),
        "scale": ("BIGRAM_SCALE_INIT", 0.05),
        "init_std": ("NGRAM_INIT_STD", 0.02),
    }

    def __init__(
        self, vocab_size: int, dim: int, buckets: int = 3072, width: int = 16, scale: float = 0.05, init_std=0.02
    ) -> None:
        super().__init__(dim, 1, buckets, width, scale, init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project((bigram_buckets(ids, self.buckets),))


@register_feature("trigram_hash")
class TrigramHash(_HashedTables):
    OPTIONS = {
        "buckets": ("TRIGRAM_BUCKETS", 8192),
        "width": ("TRIGRAM_DIM", 16),
        "scale": ("TRIGRAM_SCALE_INIT", 0.1),
        "init_std": ("NGRAM_INIT_STD", 0.02),
    }

    def __init__(
        self, vocab_size: int, dim: int, buckets: int = 8192, width: int = 16, scale: float = 0.1, init_std=0.02
    ) -> None:
        super().__init__(dim, 2, buckets, width, scale, init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project(trigram_buckets(ids, self.buckets))
