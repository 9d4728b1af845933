"""Optimisers and schedules: Muon (orthogonalised momentum) for matrices, Adam for the rest, wall-clock warmdown."""

import torch
import torch.distributed as dist
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz_orthogonalize(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T of g = U S V^T by a quintic Newton-Schulz iteration, in bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised per matrix; matrices are shared round-robin between ranks.

    Each rank orthogonalises its share of the parameters into one flat buffer; an all-reduce sums the buffers so
    every rank applies every update. The update is scaled by sqrt(max(1, rows / cols)).
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.orthogonalize = newton_schulz_orthogonalize

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            total = sum(p.numel() for p in params)
            flat = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=group["momentum"])
                    else:
                        g = buf
                    update = self.orthogonalize(g, group["backend_steps"])
                    update = update * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = update.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def lr_multiplier(
    step: int, elapsed_ms: float, iterations: int, warmdown_iters: int, max_wallclock_ms: float | None
) -> float:
    """1 until the warmdown, then linear to 0: by steps, or by wall-clock when a cap is set."""
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_ms is None:
        start = max(iterations - warmdown_iters, 0)
        return max((iterations - step) / warmdown_iters, 0.0) if step >= start else 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end
