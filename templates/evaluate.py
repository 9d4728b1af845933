"""Validation: non-overlapping windows over the validation stream, split across ranks; loss, bpb, token losses."""

import math

import torch
import torch.distributed as dist
from torch import nn

from templates.bpb import target_bytes


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_tokens: torch.Tensor,
    byte_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seq_len: int,
    batch_tokens: int,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    keep_token_losses: bool = False,
) -> tuple[float, float, torch.Tensor | None]:
    """(val_loss in nats per token, val_bpb, the per-token losses of this rank's windows in order, or None).

    `model(x, y, reduction="none")` must return per-token losses. Each rank scores a contiguous range of windows.
    """
    total_seqs = (val_tokens.numel() - 1) // seq_len
    first = total_seqs * rank // world_size
    last = total_seqs * (rank + 1) // world_size
    seqs_per_batch = max(1, batch_tokens // (world_size * seq_len))
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    token_count = torch.zeros((), device=device, dtype=torch.float64)
    byte_count = torch.zeros((), device=device, dtype=torch.float64)
    kept = []
    was_training = model.training
    model.eval()
    for s in range(first, last, seqs_per_batch):
        e = min(s + seqs_per_batch, last)
        chunk = val_tokens[s * seq_len : e * seq_len + 1].to(device=device, dtype=torch.int64, non_blocking=True)
        x = chunk[:-1].reshape(-1, seq_len)
        y = chunk[1:].reshape(-1, seq_len)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = model(x, y, reduction="none").float()
        loss_sum += losses.double().sum()
        token_count += y.numel()
        byte_count += target_bytes(x, y, byte_tables).double().sum()
        if keep_token_losses:
            kept.append(losses.reshape(-1).cpu())
    if world_size > 1:
        for t in (loss_sum, token_count, byte_count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    model.train(was_training)
    val_loss = (loss_sum / token_count).item()
    val_bpb = val_loss / math.log(2.0) * (token_count / byte_count).item()
    return val_loss, val_bpb, (torch.cat(kept) if kept else torch.zeros(0)) if keep_token_losses else None


def gather_token_losses(local: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's per-token losses in rank order (ranks hold contiguous ranges)."""
    if world_size == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float32, device=device)
    padded[: local.numel()] = local.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())].cpu() for p, n in zip(parts, sizes)])
