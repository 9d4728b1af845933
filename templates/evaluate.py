"""Scoring the validation split: every target token scored once, summed over ranks into loss and bits per byte.

Two ways to walk the split (EVAL_MODE):
  windows    non-overlapping windows of EVAL_SEQ_LEN tokens, each seen on its own (upstream's evaluation)
  stateful   each rank's range cut into EVAL_BATCH_SEQS contiguous streams, each stream scored window after
             window with the recurrent mixers' states carried over, so most tokens see far more context than
             one window at the cost of a single pass; windows left over at the end are scored on their own
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from templates.bpb import target_bytes


class Tally:
    """Running sums of nats, tokens and bytes (float64), reduced over ranks at the end."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, losses: torch.Tensor, x: torch.Tensor, y: torch.Tensor, tables: tuple) -> None:
        self.sums[0] += losses.double().sum()
        self.sums[1] += y.numel()
        self.sums[2] += target_bytes(x, y, tables).double().sum()

    def result(self, world_size: int) -> tuple[float, float]:
        if world_size > 1:
            dist.all_reduce(self.sums)
        nats, tokens, nbytes = self.sums.tolist()
        loss = nats / tokens
        return loss, loss / math.log(2.0) * tokens / nbytes


def rank_windows(tokens: torch.Tensor, seq_len: int, rank: int, world_size: int) -> tuple[int, int]:
    """[first, last) of the whole windows of `seq_len` targets that this rank scores (contiguous ranges)."""
    n_windows = (tokens.numel() - 1) // seq_len
    return n_windows * rank // world_size, n_windows * (rank + 1) // world_size


def window_batch(
    tokens: torch.Tensor, indices: list[int], seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and shifted targets of the given windows, [len(indices), seq_len] each, moved in one copy."""
    runs = torch.stack([tokens[i * seq_len : (i + 1) * seq_len + 1] for i in indices])
    runs = runs.to(device=device, dtype=torch.int64, non_blocking=True)
    return runs[:, :-1], runs[:, 1:]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seq_len: int,
    batch_seqs: int,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    stateful: bool = False,
    keep_losses: bool = False,
) -> tuple[float, float, torch.Tensor | None]:
    """(loss in nats per token, bits per byte, this rank's per-token losses in token order or None)."""
    first, last = rank_windows(tokens, seq_len, rank, world_size)
    tally = Tally(device)
    kept = torch.zeros(last - first, seq_len) if keep_losses else None
    was_training = model.training
    model.eval()

    def score(indices: list[int], states: dict | None) -> None:
        x, y = window_batch(tokens, indices, seq_len, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if states is None:
                losses = model(x, y, reduction="none").float()
            else:
                logits = core.logits(x, states)
                losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        tally.add(losses, x, y, tables)
        if kept is not None:
            kept[torch.tensor(indices) - first] = losses.cpu()

    core = getattr(model, "_orig_mod", model)  # under torch.compile, the module itself: states are Python objects
    streams = max(1, min(batch_seqs, last - first))
    rest = list(range(first, last))
    if stateful and rest:
        per_stream = len(rest) // streams
        states: dict = {}
        for step in range(per_stream):
            score([first + s * per_stream + step for s in range(streams)], states)
        rest = rest[streams * per_stream :]
    for start in range(0, len(rest), streams):
        score(rest[start : start + streams], None)
    model.train(was_training)
    loss, bpb = tally.result(world_size)
    return loss, bpb, kept.flatten() if kept is not None else None


def gather_token_losses(local: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """Every rank's per-token losses concatenated in rank order (each rank holds a contiguous range)."""
    if world_size == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([local.numel()], device=device))
    size = int(max(c.item() for c in counts))
    padded = torch.zeros(size, device=device)
    padded[: local.numel()] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())].cpu() for part, c in zip(parts, counts)])
