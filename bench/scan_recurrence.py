#!/usr/bin/env python3
"""GPU benchmark and correctness check of the first-order scans (time-varying, LTI) and the selective scan.

At the reference layer shape (64 x 1024 tokens, 1024 channels; selective N = 16) it times forward and
forward+backward, reports GB/s against a minimal-bytes model and the speedup over the PyTorch references, beside
fla's chunk_hgrn / fused_recurrent_hgrn (when a git-ignored `.anchors/` folder is importable), an SDPA attention
layer and a device copy. `recurrence_cases(device)` is what bench/scan.py imports.

  python bench/scan_recurrence.py            # table (and JSON to $OUT/scan_recurrence.json when OUT is set)
  python bench/scan_recurrence.py --check    # kernel vs float64 reference on the GPU, for every swept config
  python bench/scan_recurrence.py --sweep    # time each candidate block config and use the fastest in the table
  python bench/scan_recurrence.py --graphs   # also time each op replayed from a CUDA graph (device time only)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.timing import eager_ms, measure, measured_line  # noqa: E402
from templates.scan.first_order import (  # noqa: E402
    first_order_scan,
    first_order_scan_complex,
    first_order_scan_complex_ref,
    first_order_scan_ref,
    lti_scan,
    lti_scan_ref,
)
from templates.scan.selective import selective_scan, selective_scan_ref  # noqa: E402

BATCH, SEQ, CHANNELS, HEADS, STATE = 64, 1024, 1024, 16, 16
BF16, F32 = 2, 4
SEL_REF_BATCH = 8  # the PyTorch selective reference is timed at batch 8 and scaled x8 (it is launch-bound)

FO_CONFIGS = [
    {"BT": 64, "BD": 64, "num_warps": 4},
    {"BT": 32, "BD": 128, "num_warps": 4},
    {"BT": 128, "BD": 32, "num_warps": 4},
    {"BT": 16, "BD": 256, "num_warps": 4},
    {"BT": 64, "BD": 32, "num_warps": 2},
]
LTC_CONFIGS = [  # first = the default of the Toeplitz LTI path (per-head decays): 64 channels, 4 warps (one warpgroup)
    {"BT": 32, "BP": 64},
    {"BT": 16, "BP": 64},
    {"BT": 64, "BP": 64},
    {"BT": 32, "BP": 32},  # 2 warps, 2,048 programs (no sm_90 MMA of M 64)
    {"BT": 32, "BP": 64, "num_stages": 2},
    {"BT": 32, "BP": 64, "num_stages": 4},
]
SEL_CONFIGS = [  # first = the default of templates/scan/selective.py (channels per program and warps of the forward
    # and of the backward, CK-step chunks between checkpoints; SEG 0 = segments chosen from the shape)
    {},
    {"CK": 64},
    {"FWD_BD": 64},
]
TTSM_SHAPE = (2, 2048, 576, 64)  # ttsm: 4,096 tokens per GPU step as batch 2 x 2048, D 576 (expand 1), N 64
LRU_SHAPE = (32, 2048, 896)  # lru: 65,536 tokens per GPU step as 32 x 2048, 448 channels x 2 complex states
TTSM_CONFIGS = [  # first = the default (8 channels per warp at N 64, segments from the shape: 8 of 256 steps here)
    {},
    {"SEG": 1},
    {"SEG": 16},
    {"CK": 64, "SEG": 32},
    {"BD": 16, "FWD_BD": 16},
    {"BD": 4},
]


def _grad_fn(forward, inputs: list[torch.Tensor], cot):
    """A closure running forward then the backward of sum(out * cot) into fresh gradients (no accumulation)."""

    def run():
        out = forward()
        torch.autograd.grad(out, inputs, cot)

    return run


def _fo_inputs(device, dtype=torch.bfloat16, batch=BATCH, seq=SEQ, ch=CHANNELS):
    g = F.logsigmoid(torch.randn(batch, seq, ch, device=device, dtype=torch.float32))
    a = g.exp().to(dtype).requires_grad_()
    x = torch.randn(batch, seq, ch, device=device, dtype=dtype, requires_grad=True)
    return a, x, g.to(dtype)


def _sel_inputs(device, batch=BATCH, seq=SEQ, ch=CHANNELS, n=STATE, dtype=torch.bfloat16):
    def r(*s, dt=dtype):
        return torch.randn(*s, device=device, dtype=dt)

    return {
        "u": r(batch, seq, ch).requires_grad_(),
        "delta": (r(batch, seq, ch, dt=torch.float32) * 0.5 - 2.0).to(dtype).requires_grad_(),
        "A": (-torch.exp(torch.rand(ch, n, device=device) * 3)).requires_grad_(),
        "B": r(batch, seq, n).requires_grad_(),
        "C": r(batch, seq, n).requires_grad_(),
        "D": torch.ones(ch, device=device, requires_grad=True),
        "z": r(batch, seq, ch).requires_grad_(),
        "delta_bias": (torch.rand(ch, device=device) - 4.0).requires_grad_(),
    }


def first_order_case(device, config=None) -> dict:
    a, x, _ = _fo_inputs(device)
    cot = torch.randn_like(x)
    elems = a.numel()
    return {
        "name": "ours first_order_scan (time-varying a)",
        "fwd": lambda: first_order_scan(a.detach(), x.detach(), config=config),
        "fwd_bwd": _grad_fn(lambda: first_order_scan(a, x, config=config), [a, x], cot),
        "bytes_min": 3 * elems * BF16,
        "bytes_min_fwd_bwd": 8 * elems * BF16,
    }


def lti_toeplitz_case(device, config=None) -> dict:
    case = lti_case(device, {"method": "toeplitz", **(config or {})})
    case["name"] = f"ours lti_scan toeplitz ({HEADS} head decays)"
    return case


def lti_case(device, config=None) -> dict:
    _, x, _ = _fo_inputs(device)
    log_a = (-torch.rand(HEADS, device=device) * 0.5).requires_grad_()
    cot = torch.randn_like(x)
    elems = x.numel()
    return {
        "name": f"ours lti_scan ({HEADS} head decays)",
        "fwd": lambda: lti_scan(x.detach(), log_a.detach(), config=config),
        "fwd_bwd": _grad_fn(lambda: lti_scan(x, log_a, config=config), [x, log_a], cot),
        "bytes_min": 2 * elems * BF16,
        "bytes_min_fwd_bwd": 5 * elems * BF16,
    }


def lti_kernel_case(device) -> dict:
    """The Toeplitz LTI kernels alone (forward launch, then forward + backward launches), without the op around
    them (the sum of the d log_a partials, autograd, the custom-op wrappers): what the op's overhead is."""
    from templates.scan.lti_chunked import _ltc_launch, lti_toeplitz_config

    _, x, _ = _fo_inputs(device)
    x = x.detach()
    log_a = -torch.rand(HEADS, device=device) * 0.5
    cfg = lti_toeplitz_config(CHANNELS, HEADS, {})
    dh = torch.randn_like(x)

    def fwd():
        return _ltc_launch(x, log_a, None, False, cfg, torch.float32)[0]

    def fwd_bwd():
        h = fwd()
        _ltc_launch(dh, log_a, None, True, cfg, None, hp=h)

    return {
        "name": f"ours lti toeplitz kernels alone ({HEADS} head decays)",
        "fwd": fwd,
        "fwd_bwd": fwd_bwd,
        "bytes_min": 2 * x.numel() * BF16,
        "bytes_min_fwd_bwd": 5 * x.numel() * BF16,
    }


def _sel_bytes(batch, seq, ch, n) -> tuple[int, int]:
    fwd = BF16 * (4 * batch * seq * ch + 2 * batch * seq * n)
    bwd = BF16 * (7 * batch * seq * ch + 4 * batch * seq * n)
    return fwd, fwd + bwd


def selective_case(device, config=None, shape: tuple | None = None, label: str = "") -> dict:
    """Our selective scan; shape (batch, seq, channels, N) defaults to the reference layer's."""
    batch, seq, ch, n = shape or (BATCH, SEQ, CHANNELS, STATE)
    ins = _sel_inputs(device, batch=batch, seq=seq, ch=ch, n=n)
    cot = torch.randn_like(ins["u"])
    leaves = list(ins.values())
    fwd_b, all_b = _sel_bytes(batch, seq, ch, n)

    def fwd():
        with torch.no_grad():
            return selective_scan(**ins, config=config)

    return {
        "name": f"ours selective_scan (N={n}, z, D, bias){label}",
        "fwd": fwd,
        "fwd_bwd": _grad_fn(lambda: selective_scan(**ins, config=config), leaves, cot),
        "bytes_min": fwd_b,
        "bytes_min_fwd_bwd": all_b,
    }


def reference_cases(device) -> list[dict]:
    """The PyTorch sequential references (the seeds' path). The selective one runs at batch 8, scaled x8."""
    a, x, _ = _fo_inputs(device)
    cot = torch.randn_like(x)
    log_a = (-torch.rand(HEADS, device=device) * 0.5).requires_grad_()
    ins = _sel_inputs(device, batch=SEL_REF_BATCH)
    sel_cot = torch.randn_like(ins["u"])
    scale = BATCH // SEL_REF_BATCH
    fwd_b, _ = _sel_bytes(BATCH, SEQ, CHANNELS, STATE)

    def sel_fwd():
        with torch.no_grad():
            return selective_scan_ref(**ins)

    return [
        {
            "name": "torch ref first_order (sequential loop)",
            "fwd": lambda: first_order_scan_ref(a.detach(), x.detach()),
            "fwd_bwd": _grad_fn(lambda: first_order_scan_ref(a, x), [a, x], cot),
            "bytes_min": 3 * a.numel() * BF16,
            "ref_for": "ours first_order_scan (time-varying a)",
        },
        {
            "name": "torch ref lti (sequential loop)",
            "fwd": lambda: lti_scan_ref(x.detach(), log_a.detach()),
            "fwd_bwd": _grad_fn(lambda: lti_scan_ref(x, log_a), [x, log_a], cot),
            "bytes_min": 2 * x.numel() * BF16,
            "ref_for": f"ours lti_scan ({HEADS} head decays)",
        },
        {
            "name": f"torch ref selective (batch {SEL_REF_BATCH}, time x{scale})",
            "fwd": sel_fwd,
            "fwd_bwd": _grad_fn(lambda: selective_scan_ref(**ins), list(ins.values()), sel_cot),
            "bytes_min": fwd_b,
            "scale": scale,
            "slow": True,
            "ref_for": f"ours selective_scan (N={STATE}, z, D, bias)",
        },
    ]


def anchor_cases(device) -> list[dict]:
    """fla's HGRN first-order kernels on the same tokens, when `.anchors/` (git-ignored) is importable."""
    anchor_dir = os.environ.get("ANCHOR_DIR", str(REPO / ".anchors"))
    if anchor_dir not in sys.path:
        sys.path.insert(0, anchor_dir)
    try:
        from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
    except Exception as exc:  # the anchors are optional: report and go on
        print(f"fla anchors not importable ({type(exc).__name__}: {exc}); skipping them", flush=True)
        return []
    cases = []
    for name, fn in (("fla chunk_hgrn", chunk_hgrn), ("fla fused_recurrent_hgrn", fused_recurrent_hgrn)):
        _, x, g = _fo_inputs(device)
        g = g.detach().requires_grad_()
        cot = torch.randn_like(x)

        def fwd(fn=fn, x=x, g=g):
            with torch.no_grad():
                return fn(x, g)[0]

        cases.append(
            {
                "name": name,
                "fwd": fwd,
                "fwd_bwd": _grad_fn(lambda fn=fn, x=x, g=g: fn(x, g)[0], [x, g], cot),
                "bytes_min": 3 * x.numel() * BF16,
                "bytes_min_fwd_bwd": 8 * x.numel() * BF16,
                "anchor": True,
            }
        )
    return cases


def recurrence_cases(device, configs: dict | None = None, refs: bool = True) -> list[dict]:
    """Cases for bench/scan.py: our three ops, the PyTorch references, and the fla anchors when present.

    Each dict: name, fwd, fwd_bwd (callables), bytes_min (minimal bytes moved forward), optional
    bytes_min_fwd_bwd, anchor (bool), scale (multiply the measured time by it: the selective reference runs at
    batch 8 of 64), slow (time with few repetitions), ref_for (the name of the op it is the reference of)."""
    configs = configs or {}
    cases = [
        first_order_case(device, configs.get("first_order")),
        lti_case(device, configs.get("lti")),
        lti_toeplitz_case(device, configs.get("lti_toeplitz")),
        selective_case(device, configs.get("selective")),
    ]
    return [c for c in cases if _runs(c)] + (reference_cases(device) if refs else []) + anchor_cases(device)


def complex_case(device, shape: tuple = LRU_SHAPE, label: str = " at 32 x 2048, 896 channels (lru)") -> dict:
    """The complex first-order scan as lru runs it: constant poles inside the unit circle, one per channel, fp32."""
    batch, seq, ch = shape
    modulus = 0.9 + 0.099 * torch.rand(ch, device=device)
    phase = torch.rand(ch, device=device) * 2 * math.pi
    a_re = (modulus * torch.cos(phase)).requires_grad_()
    a_im = (modulus * torch.sin(phase)).requires_grad_()
    b_re, b_im = (torch.randn(batch, seq, ch, device=device, requires_grad=True) for _ in range(2))
    cot = (torch.randn_like(b_re), torch.randn_like(b_im))
    elems = b_re.numel()

    def run(a_re=a_re, a_im=a_im, b_re=b_re, b_im=b_im):
        return first_order_scan_complex(a_re, a_im, b_re, b_im)

    return {
        "name": f"ours first_order_scan_complex (constant poles){label}",
        "fwd": lambda: run(a_re.detach(), a_im.detach(), b_re.detach(), b_im.detach()),
        "fwd_bwd": _grad_fn(run, [a_re, a_im, b_re, b_im], cot),
        "grad_of": (run, [a_re, a_im, b_re, b_im], cot),
        "bytes_min": 4 * elems * F32,  # read b (re, im), write h (re, im)
        "bytes_min_fwd_bwd": 10 * elems * F32,  # and read dh, h (for the poles' gradient), write db
    }


def variant_rows(device, config: dict | None = None) -> list[dict]:
    """The selective scan at ttsm's shape (batch 2 x 2048, D 576, N 64), as it is chosen and as one segment (the
    step-sequential walk without the parallel split), the LTI kernels without the op around them, and the complex
    first-order scan at lru's shape."""
    label = " D 576 at 2 x 2048 (ttsm)"
    cases = [selective_case(device, config, shape=TTSM_SHAPE, label=label)]
    one = selective_case(device, {**(config or {}), "SEG": 1}, shape=TTSM_SHAPE, label=label + ", one segment")
    cases += [one, lti_kernel_case(device), complex_case(device)]
    return [c for c in cases if _runs(c)]


def _runs(case: dict) -> bool:
    """Run a case's fwd+bwd once (compiling it); a case that fails is reported and left out, not fatal."""
    try:
        case["fwd_bwd"]()
        return True
    except Exception as exc:
        print(f"case {case['name']!r} left out: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return False


def context_cases(device) -> list[dict]:
    """An SDPA causal attention layer (GQA 8q/4kv x 64) and a device copy of 64K x 1024 bf16, same tokens."""
    q = torch.randn(BATCH, 8, SEQ, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(BATCH, 4, SEQ, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(BATCH, 4, SEQ, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    cot = torch.randn_like(q)

    def attn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def attn_fwd():
        with torch.no_grad():
            return attn()

    src = torch.randn(BATCH * SEQ, CHANNELS, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return [
        {"name": "sdpa causal attention", "fwd": attn_fwd, "fwd_bwd": _grad_fn(attn, [q, k, v], cot), "anchor": True},
        {
            "name": "device copy (floor)",
            "fwd": lambda: dst.copy_(src),
            "fwd_bwd": None,
            "bytes_min": 2 * src.numel() * BF16,
            "anchor": True,
        },
    ]


def sweep(device, ops: str = "") -> dict:
    """Time every candidate config of each op (fwd+bwd) and return the fastest per op (ops: a comma list of names
    to sweep, all when empty)."""
    best = {}
    wanted = {o for o in ops.split(",") if o}
    for op, make, candidates in (
        ("first_order", first_order_case, FO_CONFIGS),
        ("lti", lti_case, FO_CONFIGS),
        ("lti_toeplitz", lti_toeplitz_case, LTC_CONFIGS),
        ("selective", selective_case, SEL_CONFIGS),
        ("selective_ttsm", lambda d, c: selective_case(d, c, shape=TTSM_SHAPE), TTSM_CONFIGS),
    ):
        if wanted and op not in wanted:
            continue
        timings = []
        for cfg in candidates:
            case = make(device, cfg)
            try:
                fwd, fb = eager_ms(case["fwd"], 50), eager_ms(case["fwd_bwd"], 50)
            except Exception as exc:  # a config may not compile (registers, shared memory): report it
                print(f"sweep {op} {cfg}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            timings.append((fb, fwd, cfg))
            print(f"sweep {op} {cfg}: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
            del case
            torch.cuda.empty_cache()
        if timings:
            best[op] = min(timings, key=lambda x: x[0])[2]
            print(f"sweep {op}: best {best[op]}", flush=True)
    return best


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return math.inf
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _compare(kernel, reference, inputs: list[torch.Tensor], cot_shapes: list[tuple]) -> dict:
    """Relative errors of every output and input gradient of kernel against a float64 reference ({} on a crash)."""
    try:
        return _compare_unguarded(kernel, reference, inputs, cot_shapes)
    except Exception as exc:  # a kernel that fails to compile or run is a failed check, reported, not fatal
        print(f"check crashed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return {}


def _compare_unguarded(kernel, reference, inputs: list[torch.Tensor], cot_shapes: list[tuple]) -> dict:
    cots = [torch.randn(s, device=inputs[0].device, dtype=torch.float64) for s in cot_shapes]
    results = []
    for fn, cast in ((kernel, lambda x: x), (reference, lambda x: x.double())):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        outs = fn(*[cast(x) for x in leaves])
        loss = sum((o.double() * c).sum() for o, c in zip(outs, cots))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append([o.detach() for o in outs] + [g if g is not None else torch.zeros(1) for g in grads])
    return {f"t{i}": _rel(k, r) for i, (k, r) in enumerate(zip(*results))}


def check(device, small: bool = False, fo: bool = True) -> bool:
    """Kernel vs float64 reference on the GPU: odd shapes, bf16 for every config and fp32 for the first one,
    initial and final states. `small` shrinks the shapes (a CPU smoke run under TRITON_INTERPRET=1)."""
    torch.manual_seed(0)
    ok = True

    def report(label, errs, tol):
        nonlocal ok
        worst = max(errs.values()) if errs else math.inf
        status = "ok" if worst < tol else "FAIL"
        ok &= worst < tol
        print(f"check {label}: worst rel err {worst:.2e} (tol {tol:.0e}) {status}", flush=True)

    Bsz, T, D = (2, 19, 40) if small else (3, 333, 300)
    sel_shape = (2, 21, 6, 4) if small else (2, 515, 100, STATE)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        fo_configs = (FO_CONFIGS if dtype == torch.bfloat16 else FO_CONFIGS[:1]) if fo else []
        sel_configs = SEL_CONFIGS if dtype == torch.bfloat16 else SEL_CONFIGS[:1]
        a = (torch.rand(Bsz, T, D, device=device) * 1.1 - 0.05).to(dtype)
        b = torch.randn(Bsz, T, D, device=device).to(dtype)
        h0 = torch.randn(Bsz, D, device=device)
        for cfg in fo_configs:
            errs = _compare(
                lambda a, b, h0, cfg=cfg: first_order_scan(a, b, h0, True, config=cfg),
                lambda a, b, h0: first_order_scan_ref(a, b, h0, True),
                [a, b, h0],
                [(Bsz, T, D), (Bsz, D)],
            )
            report(f"first_order {dtype} {cfg}", errs, tol)
            log_a = -torch.rand(D // 20, device=device) * 0.3
            errs = _compare(
                lambda x, la, h0, cfg=cfg: lti_scan(x, la, h0, True, config=cfg),
                lambda x, la, h0: lti_scan_ref(x, la, h0, True),
                [b, log_a, h0],
                [(Bsz, T, D), (Bsz, D)],
            )
            report(f"lti {dtype} {cfg}", errs, tol)
        width = 32 if small else 256  # 4 heads of 64 channels (the Toeplitz path needs heads of >= 16)
        log_a = -torch.rand(4, device=device) * 0.3
        for cfg in LTC_CONFIGS if dtype == torch.bfloat16 else LTC_CONFIGS[:1]:
            errs = _compare(
                lambda x, la, h0, cfg=cfg: lti_scan(x, la, h0, True, config={"method": "toeplitz", **cfg}),
                lambda x, la, h0: lti_scan_ref(x, la, h0, True),
                [b[..., :width], log_a, h0[:, :width]],
                [(Bsz, T, width), (Bsz, width)],
            )
            report(f"lti toeplitz {dtype} {cfg}", errs, tol)
        parts = [(torch.rand(Bsz, T, D, device=device) * 0.9).to(dtype) for _ in range(2)]
        parts += [torch.randn(Bsz, T, D, device=device).to(dtype) for _ in range(2)]
        parts += [torch.randn(Bsz, D, device=device), torch.randn(Bsz, D, device=device)]

        def cplx(ar, ai, br, bi, hr, hi):
            yr, yi, (fr, fi) = first_order_scan_complex(ar, ai, br, bi, (hr, hi), True)
            return yr, yi, fr, fi

        def cplx_ref(ar, ai, br, bi, hr, hi):
            yr, yi, (fr, fi) = first_order_scan_complex_ref(ar, ai, br, bi, (hr, hi), True)
            return yr, yi, fr, fi

        if fo:
            errs = _compare(cplx, cplx_ref, parts, [(Bsz, T, D), (Bsz, T, D), (Bsz, D), (Bsz, D)])
            report(f"first_order_complex {dtype}", errs, tol)

        # the table's selective shape with its configs, then N 64 at batch 2 (ttsm's kind of shape): 8 channels per
        # warp, the length split into segments
        ttsm_shape = (2, 21, 6, 8) if small else (2, 515, 40, 64)
        ttsm_configs = TTSM_CONFIGS if dtype == torch.bfloat16 else TTSM_CONFIGS[:1]
        for (sb, st, sd, sn), configs, named in ((sel_shape, sel_configs, False), (ttsm_shape, ttsm_configs, True)):
            ins = _sel_inputs(device, batch=sb, seq=st, ch=sd, n=sn, dtype=dtype)
            ins["h0"] = torch.randn(sb, sd, sn, device=device)
            names = list(ins)
            vals = [v.detach() for v in ins.values()]
            for cfg in configs:
                errs = _compare(
                    lambda *xs, cfg=cfg, nm=names: selective_scan(
                        **dict(zip(nm, xs)), return_final_state=True, config=cfg
                    ),
                    lambda *xs, nm=names: selective_scan_ref(**dict(zip(nm, xs)), return_final_state=True),
                    vals,
                    [(sb, st, sd), (sb, sd, sn)],
                )
                shape = f" N{sn} batch {sb}" if named else ""
                report(f"selective{shape} {dtype} {cfg}", errs, tol * 2)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="kernel vs float64 reference on the GPU, every config")
    parser.add_argument("--sweep", action="store_true", help="time the candidate configs; the table uses the best")
    parser.add_argument("--no-table", action="store_true", help="skip the benchmark table")
    parser.add_argument("--profile", action="store_true", help="run each op's fwd+bwd twice (under ncu) and exit")
    parser.add_argument("--sweep-ops", default="", help="comma list of the ops to sweep (all when empty)")
    parser.add_argument("--variants", action="store_true", help="also time the selective scan at ttsm's shape")
    parser.add_argument("--no-refs", action="store_true", help="leave out the (slow) sequential PyTorch references")
    parser.add_argument("--no-check-fo", action="store_true", help="check only the LTI and selective scans")
    parser.add_argument("--graphs", action="store_true", help="also time each op replayed from a CUDA graph")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/scan_recurrence.py needs a CUDA GPU (run it through the device); nothing measured")
        return 2
    device = "cuda"
    out = os.environ.get("OUT")
    cfg_file = Path(out, "scan_recurrence_configs.json") if out else None
    if args.profile:
        best = json.loads(cfg_file.read_text()) if cfg_file and cfg_file.exists() else {}
        for case in recurrence_cases(device, best)[:4]:
            for _ in range(2):
                case["fwd_bwd"]()
            torch.cuda.synchronize()
        return 0
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.check:
        result["check_ok"] = check(device, fo=not args.no_check_fo)
    best = sweep(device, args.sweep_ops) if args.sweep else {}
    result["configs"] = best
    if cfg_file and best:
        cfg_file.write_text(json.dumps(best))
    if not args.no_table:
        cases = recurrence_cases(device, best, refs=not args.no_refs) + context_cases(device)
        if args.variants:
            cases += variant_rows(device, best.get("selective_ttsm"))
        rows = []
        for case in cases:
            rows.append(measure(case, graphs=args.graphs))
            print(measured_line(rows[-1], args.graphs), flush=True)
        by_name = {r["name"]: r for r in rows}
        for r in rows:
            ours = by_name.get(r.get("ref_for") or "")
            if ours and r["fwd_bwd_ms"] and ours["fwd_bwd_ms"]:
                ours["speedup_vs_ref"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        result["rows"] = rows
        print(f"\n{'case':48s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd GB/s':>9s} {'f+b GB/s':>9s} {'vs ref':>8s}")
        for r in rows:

            def fmt(key, spec, r=r):
                return format(r[key], spec) if r.get(key) is not None else "-"

            print(
                f"{r['name']:48s} {fmt('fwd_ms', '9.3f'):>9s} {fmt('fwd_bwd_ms', '11.3f'):>11s} "
                f"{fmt('fwd_GBps', '9.0f'):>9s} {fmt('fwd_bwd_GBps', '9.0f'):>9s} {fmt('speedup_vs_ref', '7.0f'):>8s}"
            )
    if out:
        Path(out, "scan_recurrence.json").write_text(json.dumps(result, indent=1, default=str))
    print("JSON " + json.dumps(result, default=str))
    return 0 if result.get("check_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
