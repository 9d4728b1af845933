"""The scan core as PyTorch custom operators (namespace `ssm_golf`): each scan is one opaque node for torch.compile,
forward and backward, so that a model compiles with fullgraph=True around its scans.

Every scan is a pair of ops, the forward and its backward, tied together with `register_autograd`; each op's
implementation picks the path itself (Triton on CUDA or under TRITON_INTERPRET=1, the PyTorch reference otherwise,
whose backward is autograd through the reference), and a fake implementation gives the output shapes for tracing.
Schemas hold no dicts and no None results: configs travel as strings ("BT=16,method=toeplitz") and absent tensors
come back as empty placeholders that the Python wrappers drop.

An op is defined once per process. A module imported again (importlib.reload in the interpreter tests, an assembled
script run beside the templates) swaps its own functions in behind the existing definition, through a registry
kept in sys.modules, so the newest import's kernels are the ones that run.
"""

import sys
import types
from collections.abc import Callable

import torch

SCAN_OP_NAMESPACE = "ssm_golf"
_SOP_REGISTRY = "_ssm_golf_scan_op_registry"


def _sop_registry() -> dict:
    """Process-wide {op name: (impl, fake, backward, setup_context)}, shared by every copy of this module."""
    holder = sys.modules.get(_SOP_REGISTRY)
    if holder is None:
        holder = types.ModuleType(_SOP_REGISTRY)
        holder.impls = {}
        sys.modules[_SOP_REGISTRY] = holder
    return holder.impls


def scan_op(
    name: str,
    schema: str,
    impl: Callable,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> torch._ops.OpOverload:
    """Define ssm_golf::<name> with `schema` (positional arguments only) on first use, else point the existing
    definition at these functions; returns the op."""
    impls = _sop_registry()
    first = name not in impls
    impls[name] = (impl, fake, backward, setup_context)
    if first:
        op = torch.library.custom_op(
            f"{SCAN_OP_NAMESPACE}::{name}", lambda *args: impls[name][0](*args), mutates_args=(), schema=schema
        )
        op.register_fake(lambda *args: impls[name][1](*args))
        if backward is not None:
            op.register_autograd(
                lambda ctx, *grads: impls[name][2](ctx, *grads),
                setup_context=lambda ctx, inputs, output: impls[name][3](ctx, inputs, output),
            )
    return getattr(getattr(torch.ops, SCAN_OP_NAMESPACE), name).default


def scan_config_str(config: dict | None) -> str:
    """A config dict of ints and strings as the op's string argument (traceable: only constants are formatted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) if config else ""


def scan_config_dict(text: str) -> dict:
    """The inverse of `scan_config_str`: integers back as int, anything else as str."""
    out: dict = {}
    for item in text.split(","):
        if item:
            key, value = item.split("=", 1)
            out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def scan_none(ref: torch.Tensor) -> torch.Tensor:
    """The placeholder for an absent tensor result (op schemas cannot return None)."""
    return ref.new_empty(0)


def scan_opt(t: torch.Tensor | None) -> torch.Tensor | None:
    """A placeholder back to None."""
    return None if t is None or t.numel() == 0 and t.dim() == 1 else t


def _autograd_on() -> torch._C._ForceDispatchKeyGuard:
    """Autograd recording back on inside an op's implementation. The dispatcher runs an implementation below the
    autograd keys (it excludes them): there, even under enable_grad, no operation records a graph and every gradient
    taken would be zero. This guard takes them off the excluded set for its block."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def scan_ref_vjp(fn: Callable, inputs: list, grads: list) -> list[torch.Tensor]:
    """Gradients of fn(*inputs) (a tuple of tensors) against `grads`, by autograd through fn: the backward of the
    reference path, run inside a backward op's implementation (so with autograd switched back on there). Returns one
    tensor per input, a placeholder for None or non-float inputs."""
    with _autograd_on(), torch.enable_grad():
        leaves = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x for x in inputs]
        outs = fn(*leaves)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and g.numel() and o.requires_grad]
        wrt = [x for x in leaves if x is not None and x.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    found = iter(got)
    res = []
    for x in leaves:
        if x is None or not x.requires_grad:
            res.append(scan_none(grads[0]))
        else:
            g = next(found)
            # a clone: autograd may hand back an incoming gradient itself, and op results must not alias inputs
            res.append(torch.zeros_like(x) if g is None else g.clone())
    return res
