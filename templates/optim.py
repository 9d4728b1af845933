"""Optimisers and schedules: Muon for the blocks' matrices, Adam for everything else, which tensor goes where
decided by the declaration (control-tensor name patterns); the wall-clock warmdown; an EMA of the weights.
"""

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor, nn

# quintic Newton-Schulz coefficients: x <- a x + (b G + c G^2) x with G = x x^T
NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


def orthogonalize(g: Tensor, steps: int) -> Tensor:
    """Approximate U V^T of each matrix in a stack [n, rows, cols] (g = U S V^T), iterated in bf16."""
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = NS_A * x + (NS_B * gram + NS_C * (gram @ gram)) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov), orthogonalised, scaled by sqrt(max(1, rows / cols)); decoupled weight decay.

    Matrices of one shape are stacked and orthogonalised as a batch. With several ranks each rank orthogonalises
    an equal slice of every stack and an all-gather hands every rank the whole stack. Gradients must already be
    averaged across ranks (DDP does this).
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        momentum: float,
        steps: int,
        weight_decay: float = 0.0,
        row_norm: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, steps=steps, weight_decay=weight_decay, row_norm=row_norm)
        super().__init__(params, defaults)
        self.orthogonalize = orthogonalize

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 (torch's signature)
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if ranks > 1 else 0
        for group in self.param_groups:
            stacks: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    stacks[tuple(p.shape)].append(p)
            for shape, params in stacks.items():
                state = self.state[params[0]]
                grads = torch.stack([p.grad for p in params])
                if "stack_momentum" not in state:
                    state["stack_momentum"] = torch.zeros_like(grads)
                velocity = state["stack_momentum"]
                velocity.mul_(group["momentum"]).add_(grads)
                direction = grads.add(velocity, alpha=group["momentum"])
                if group["row_norm"]:
                    direction = direction / (direction.norm(dim=-1, keepdim=True) + 1e-7)
                share = math.ceil(len(params) / ranks)
                if ranks > 1:
                    pad = share * ranks - len(params)
                    if pad:
                        direction = torch.cat((direction, direction.new_zeros(pad, *shape)))
                    mine = self.orthogonalize(direction[rank * share : (rank + 1) * share], group["steps"])
                    update = mine.new_empty(share * ranks, *shape)
                    dist.all_gather_into_tensor(update, mine.contiguous())
                else:
                    update = self.orthogonalize(direction, group["steps"])
                gain = max(1.0, shape[0] / shape[1]) ** 0.5
                for i, p in enumerate(params):
                    if group["weight_decay"]:
                        p.mul_(1.0 - group["lr"] * group["weight_decay"])
                    p.add_(update[i].to(p.dtype), alpha=-group["lr"] * gain)


def split_parameters(model: nn.Module, control_patterns: tuple[str, ...]) -> dict[str, list[Tensor]]:
    """{"muon": block matrices, "embed": embedding tables, "head": untied head, "scalar": the rest}.

    A matrix inside a block or an input feature goes to Muon unless its name contains a control pattern;
    embedding tables (the token embedding and any feature tables) go to the embedding group; vectors,
    convolutions, control tensors and the model's own top-level tensors go to the scalar group.
    """
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if head is not None else set()
    inside = ("blocks.", "features.")
    groups: dict[str, list[Tensor]] = {"muon": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if id(p) in tables:
            groups["embed"].append(p)
        elif id(p) in head_ids:
            groups["head"].append(p)
        elif p.ndim == 2 and name.startswith(inside) and not any(pattern in name for pattern in control_patterns):
            groups["muon"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def lr_scale(
    step: int,
    elapsed_ms: float,
    iterations: int,
    warmup_steps: int,
    warmdown_iters: int,
    cap_ms: float | None,
) -> float:
    """Learning-rate multiplier: a linear ramp over `warmup_steps`, flat, then a linear warmdown to zero.

    With a wall-clock cap the warmdown spans the last `warmdown_iters` steps' worth of time at the pace so far;
    without one it spans the last `warmdown_iters` of `iterations`.
    """
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if warmdown_iters <= 0:
        return ramp
    if cap_ms is None:
        left = (iterations - step) / warmdown_iters
    else:
        pace_ms = elapsed_ms / max(step, 1)
        left = (cap_ms - elapsed_ms) / max(warmdown_iters * pace_ms, 1e-9)
    return ramp * min(1.0, max(left, 0.0))


def past_cap(elapsed_ms: float, steps: int, cap_ms: float | None, ahead: int = 1) -> bool:
    """Whether `ahead` more steps at the pace so far would end past the wall-clock cap: training stops before it."""
    return cap_ms is not None and elapsed_ms + ahead * elapsed_ms / max(steps, 1) > cap_ms


def momentum_at(step: int, start: float, end: float, ramp_steps: int) -> float:
    """Muon momentum, linear from `start` to `end` over the first `ramp_steps` steps."""
    t = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return start + t * (end - start)


class WeightAverage:
    """An fp32 exponential moving average of the parameters from `start_step` on, bias-corrected like Adam's moments
    (zero start, divided by 1 - decay**n): a short run's average is not pulled toward its first weights."""

    def __init__(self, model: nn.Module, decay: float, start_step: int) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.decay, self.start_step, self.updates = decay, start_step, 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step >= self.start_step:
            self.updates += 1
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_into_model(self) -> str:
        for p, s in zip(self.params, self.shadow) if self.updates else ():  # nothing averaged: the weights stay
            p.copy_(s.div(1.0 - self.decay**self.updates).to(p.dtype))
        return f"ema:applied decay={self.decay} updates={self.updates}"
