"""Legal score-first test-time training: the validation split is walked in chunks of windows, and each chunk is
first scored (no gradients, the model as it stands) and only then trained on, so no token is ever scored by a model
that has seen it. Training is plain SGD with momentum on the chunk's mean loss for TTT_EPOCHS passes; the adapted
weights carry on to the next chunk. Each rank walks its own contiguous share with its own copy of the adaptation
(no gradient exchange), so the rule holds per rank; the sums of nats, tokens and bytes are reduced at the end.
The model is changed in place: score a copy if the original is needed afterwards.
"""

import torch
from torch import nn

from templates.evaluate import Tally, rank_windows, window_batch
from templates.hparams import env_float, env_int
from templates.registry import STAGES, register


def ttt_evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seq_len: int,
    chunk_seqs: int,
    epochs: int,
    lr: float,
    momentum: float,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    keep_losses: bool = False,
) -> tuple[float, float, torch.Tensor | None]:
    """(loss in nats per token, bits per byte, this rank's per-token losses in token order or None)."""
    first, last = rank_windows(tokens, seq_len, rank, world_size)
    tally = Tally(device)
    kept = torch.zeros(last - first, seq_len) if keep_losses else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    was_training = model.training

    for start in range(first, last, chunk_seqs):
        stop = min(start + chunk_seqs, last)
        x, y = window_batch(tokens, list(range(start, stop)), seq_len, device)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = model(x, y, reduction="none").float()
        tally.add(losses, x, y, tables)
        if kept is not None:
            kept[start - first : stop - first] = losses.cpu()
        if stop == last:
            break  # nothing left to score with what this chunk would teach
        model.train()
        for _ in range(epochs):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.train(was_training)
    loss, bpb = tally.result(world_size)
    return loss, bpb, kept.flatten() if kept is not None else None


@register(STAGES, "ttt")
def ttt_stage(model: nn.Module, tokens: torch.Tensor, tables: tuple, seq_len: int, chunk_seqs: int, rank: int,
              world_size: int, device: torch.device, autocast_dtype: torch.dtype | None, stateful: bool = False,
              keep_losses: bool = False) -> tuple[float, float, torch.Tensor | None]:  # fmt: skip
    """EVAL_MODE=ttt, called like `evaluate` (`stateful` unused): `ttt_evaluate` with TTT_EPOCHS (2), TTT_LR (0.01)
    and TTT_MOMENTUM (0.9) from the environment."""
    epochs, lr, momentum = env_int("TTT_EPOCHS", 2), env_float("TTT_LR", 0.01), env_float("TTT_MOMENTUM", 0.9)
    return ttt_evaluate(model, tokens, tables, seq_len, chunk_seqs, epochs, lr, momentum, rank, world_size, device,
                        autocast_dtype, keep_losses)  # fmt: skip
