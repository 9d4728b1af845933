#!/usr/bin/env python3
"""GPU benchmark and correctness check of the whole scan core, side by side with the anchors, in one run.

At the reference layer shape (64 x 1024 tokens, d_inner 1024; SSD and Mamba-3 with 16 heads x 64, N = 64) it
times forward and forward+backward of our SSD and Mamba-3 SISO scans, their PyTorch references, mamba_ssm's
mamba_chunk_scan_combined and mamba3_siso_combined (from the git-ignored `.anchors/` when importable), an SDPA
causal attention layer (GQA 8q/4kv x 64), a device copy (the floor), plus the first-order and selective cases of
bench/scan_recurrence.py when importable. One table: ms, GB/s against a minimal-bytes model, speedup over the
reference, goal met or not.

  python bench/scan.py              # the table (JSON and Markdown to $OUT when OUT is set)
  python bench/scan.py --check      # kernels vs float64 references on the GPU (outputs and gradients), then table
  python bench/scan.py --sweep      # also time launch options of the SSD kernels and use the fastest
  python bench/scan.py --graphs     # also time each op replayed from a CUDA graph (device time only)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.timing import eager_ms, measure, measured_line  # noqa: E402
from templates.scan import ssd as ssd_mod  # noqa: E402
from templates.scan.mamba3 import mamba3_siso_scan, mamba3_siso_scan_ref  # noqa: E402
from templates.scan.ssd import ssd_scan, ssd_scan_ref  # noqa: E402

BATCH, SEQ, HEADS, HEADDIM, DSTATE, ANGLES, CHUNK = 64, 1024, 16, 64, 64, 16, 64
REF_BATCH = 4  # the sequential references run at batch 4, their time scaled x16
BF16, F32 = 2, 4
T0 = time.perf_counter()
SSD_NAME = f"ours ssd_scan (H{HEADS} P{HEADDIM} N{DSTATE}, D)"
M3_NAME = f"ours mamba3_siso_scan (H{HEADS} N{DSTATE}, {ANGLES} angles, D, z)"
SDPA_NAME = "sdpa causal attention (GQA 8q/4kv x 64)"
# fwd+bwd goals in ms, by a substring of the case name (issue 4); every "ours" row must also beat SDPA
GOALS = {"ssd_scan": 1.0, "mamba3_siso_scan": 1.4, "selective_scan": 1.0, "first_order_scan": 0.6, "lti_scan": 0.3}


def grad_run(forward, inputs: list[torch.Tensor], cot: torch.Tensor):
    """A closure: forward, then the backward of sum(out * cot) into fresh gradients."""

    def run():
        torch.autograd.grad(forward(), inputs, cot)

    return run


def no_grad_run(forward):
    def run():
        with torch.no_grad():
            return forward()

    return run


def ssd_inputs(device, batch=BATCH, dtype=torch.bfloat16, seq=SEQ, groups=1, seed=0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=gen).to(dt)

    return {
        "x": rnd(batch, seq, HEADS, HEADDIM).requires_grad_(),
        "dt": (rnd(batch, seq, HEADS, dt=torch.float32) - 2.0).requires_grad_(),
        "A": (-torch.rand(HEADS, device=device, generator=gen) - 0.5).requires_grad_(),
        "B": rnd(batch, seq, groups, DSTATE).requires_grad_(),
        "C": rnd(batch, seq, groups, DSTATE).requires_grad_(),
        "D": rnd(HEADS, dt=torch.float32).requires_grad_(),
    }


def ssd_bytes(batch=BATCH) -> tuple[int, int]:
    """Minimal bytes: fwd reads x, B, C, dt and writes y; bwd reads x, B, C, dt, dy and writes dx, dB, dC, ddt."""
    tok = batch * SEQ
    x = tok * HEADS * HEADDIM * BF16
    bc = 2 * tok * DSTATE * BF16
    dt = tok * HEADS * F32
    fwd = 2 * x + bc + dt
    bwd = 3 * x + 2 * bc + 2 * dt
    return fwd, fwd + bwd


def m3_inputs(device, batch=BATCH, dtype=torch.bfloat16, seq=SEQ, groups=1, seed=0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=gen).to(dt)

    dt = F.softplus(rnd(batch, seq, HEADS, dt=torch.float32) - 3.0)
    return {
        "x": rnd(batch, seq, HEADS, HEADDIM).requires_grad_(),
        "dt": dt.requires_grad_(),
        "adt": (-dt.detach() * 0.5).requires_grad_(),
        "trap": rnd(batch, seq, HEADS, dt=torch.float32).requires_grad_(),
        "q": rnd(batch, seq, groups, DSTATE).requires_grad_(),
        "k": rnd(batch, seq, groups, DSTATE).requires_grad_(),
        "angles": rnd(batch, seq, HEADS, ANGLES, dt=torch.float32).requires_grad_(),
        "q_bias": torch.ones(HEADS, DSTATE, device=device, requires_grad=True),
        "k_bias": torch.ones(HEADS, DSTATE, device=device, requires_grad=True),
        "D": torch.ones(HEADS, device=device, requires_grad=True),
        "z": rnd(batch, seq, HEADS, HEADDIM).requires_grad_(),
    }


def m3_bytes(batch=BATCH) -> tuple[int, int]:
    """Minimal bytes: fwd reads x, z, q, k, angles, dt, adt, trap and writes y; bwd reads those and dy, writes
    their gradients."""
    tok = batch * SEQ
    v = tok * HEADS * HEADDIM * BF16
    qk = 2 * tok * DSTATE * BF16
    small = tok * HEADS * (ANGLES + 3) * F32
    fwd = 3 * v + qk + small
    bwd = 5 * v + 2 * qk + 2 * small
    return fwd, fwd + bwd


def _m3_call(fn, ins):
    return fn(
        ins["x"], ins["dt"], ins["adt"], ins["trap"], ins["q"], ins["k"], ins["angles"],
        q_bias=ins["q_bias"], k_bias=ins["k_bias"], D=ins["D"], z=ins["z"], chunk_size=CHUNK,
    )  # fmt: skip


def our_cases(device, compiled: bool = True) -> list[dict]:
    cases = []
    ins = ssd_inputs(device)
    cot = torch.randn_like(ins["x"])
    fwd_b, all_b = ssd_bytes()

    def ssd_fwd(fn=ssd_scan, ins=ins):
        return fn(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], CHUNK, D=ins["D"])

    cases.append(
        {
            "name": SSD_NAME,
            "fwd": no_grad_run(ssd_fwd),
            "fwd_bwd": grad_run(ssd_fwd, list(ins.values()), cot),
            "bytes_min": fwd_b,
            "bytes_min_fwd_bwd": all_b,
        }
    )
    m3 = m3_inputs(device)
    m3_cot = torch.randn_like(m3["x"])
    fwd_b, all_b = m3_bytes()
    cases.append(
        {
            "name": M3_NAME,
            "fwd": no_grad_run(lambda: _m3_call(mamba3_siso_scan, m3)),
            "fwd_bwd": grad_run(lambda: _m3_call(mamba3_siso_scan, m3), list(m3.values()), m3_cot),
            "bytes_min": fwd_b,
            "bytes_min_fwd_bwd": all_b,
        }
    )
    if not compiled:
        return cases
    # as a compiled model calls it: dynamo fuses the gates, rotation and head expansion; the scan itself stays eager
    compiled = torch.compile(lambda: _m3_call(mamba3_siso_scan, m3))
    cases.append(
        {
            "name": M3_NAME.replace("ours mamba3_siso_scan", "ours mamba3_siso_scan, torch.compile'd caller"),
            "fwd": no_grad_run(compiled),
            "fwd_bwd": grad_run(compiled, list(m3.values()), m3_cot),
            "bytes_min": fwd_b,
            "bytes_min_fwd_bwd": all_b,
        }
    )
    return cases


def reference_cases(device) -> list[dict]:
    """The sequential PyTorch references at batch REF_BATCH, time scaled to batch 64."""
    scale = BATCH // REF_BATCH
    ins = ssd_inputs(device, batch=REF_BATCH)
    cot = torch.randn_like(ins["x"])

    def ssd_fwd():
        return ssd_scan_ref(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], CHUNK, D=ins["D"])

    m3 = m3_inputs(device, batch=REF_BATCH)
    m3_cot = torch.randn_like(m3["x"])
    return [
        {
            "name": f"torch ref ssd (batch {REF_BATCH}, time x{scale})",
            "fwd": no_grad_run(ssd_fwd),
            "fwd_bwd": grad_run(ssd_fwd, list(ins.values()), cot),
            "scale": scale,
            "slow": True,
            "ref_for": SSD_NAME,
        },
        {
            "name": f"torch ref mamba3 (batch {REF_BATCH}, time x{scale})",
            "fwd": no_grad_run(lambda: _m3_call(mamba3_siso_scan_ref, m3)),
            "fwd_bwd": grad_run(lambda: _m3_call(mamba3_siso_scan_ref, m3), list(m3.values()), m3_cot),
            "scale": scale,
            "slow": True,
            "ref_for": M3_NAME,
        },
    ]


def anchor_path() -> None:
    anchor_dir = os.environ.get("ANCHOR_DIR", str(REPO / ".anchors"))
    if anchor_dir not in sys.path:
        sys.path.insert(0, anchor_dir)


def anchor_cases(device) -> list[dict]:
    """mamba_ssm's Triton SSD and Mamba-3 SISO on the same shapes, when `.anchors/` is importable."""
    anchor_path()
    cases = []
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        ins = ssd_inputs(device)
        cot = torch.randn_like(ins["x"])
        fwd_b, all_b = ssd_bytes()

        def fwd():
            return mamba_chunk_scan_combined(
                ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], CHUNK, D=ins["D"], dt_softplus=True
            )

        cases.append(
            {
                "name": f"mamba_ssm mamba_chunk_scan_combined (chunk {CHUNK})",
                "fwd": no_grad_run(fwd),
                "fwd_bwd": grad_run(fwd, list(ins.values()), cot),
                "bytes_min": fwd_b,
                "bytes_min_fwd_bwd": all_b,
                "anchor": True,
            }
        )
    except Exception as exc:  # the anchors are optional: report and go on
        print(f"mamba_chunk_scan_combined not usable ({type(exc).__name__}: {exc}); skipped", flush=True)
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

        m3 = m3_inputs(device)
        bhl = {k: m3[k].detach().transpose(1, 2).contiguous().requires_grad_() for k in ("dt", "adt", "trap")}
        leaves = [m3[k] for k in ("q", "k", "x", "q_bias", "k_bias", "angles", "D", "z")] + list(bhl.values())
        cot = torch.randn_like(m3["x"])
        fwd_b, all_b = m3_bytes()

        def m3_fwd():
            return mamba3_siso_combined(
                m3["q"], m3["k"], m3["x"], bhl["adt"], bhl["dt"], bhl["trap"], m3["q_bias"], m3["k_bias"],
                m3["angles"], D=m3["D"], Z=m3["z"], chunk_size=CHUNK,
            )  # fmt: skip

        cases.append(
            {
                "name": f"mamba_ssm mamba3_siso_combined (chunk {CHUNK})",
                "fwd": no_grad_run(m3_fwd),
                "fwd_bwd": grad_run(m3_fwd, leaves, cot),
                "bytes_min": fwd_b,
                "bytes_min_fwd_bwd": all_b,
                "anchor": True,
            }
        )
    except Exception as exc:
        print(f"mamba3_siso_combined not usable ({type(exc).__name__}: {exc}); skipped", flush=True)
    return cases


def context_cases(device) -> list[dict]:
    """One SDPA causal attention layer core at the same tokens, and a device copy of 64K x 1024 bf16 (the floor)."""
    q = torch.randn(BATCH, 8, SEQ, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(BATCH, 4, SEQ, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(BATCH, 4, SEQ, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    cot = torch.randn_like(q)

    def attn():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    src = torch.randn(BATCH * SEQ, HEADS * HEADDIM, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return [
        {"name": SDPA_NAME, "fwd": no_grad_run(attn), "fwd_bwd": grad_run(attn, [q, k, v], cot), "anchor": True},
        {
            "name": "device copy 64K x 1024 bf16 (floor)",
            "fwd": lambda: dst.copy_(src),
            "fwd_bwd": None,
            "bytes_min": 2 * src.numel() * BF16,
            "anchor": True,
        },
    ]


def recurrence_rows(device, configs: dict, refs: bool = True) -> list[dict]:
    """The first-order, LTI and selective cases of bench/scan_recurrence.py (the LTI row is kill-mamba2's shape, 16
    heads x 64 channels; the selective row is hybrid-3to1's, D 1024 N 16), with fla's anchors."""
    try:
        from bench.scan_recurrence import recurrence_cases
    except Exception as exc:
        print(f"bench.scan_recurrence not importable ({type(exc).__name__}: {exc}); its rows are left out", flush=True)
        return []
    return recurrence_cases(device, configs or None, refs=refs)


def variant_cases(device) -> list[dict]:
    """Ops at the variants' own shapes, beside the anchor where there is one: Mamba-3 SISO as mamba3-hybrid runs
    it (16 sequences x 4096 per GPU) and the selective scan as ttsm runs it (D 576, N 64, expand 1, 2 x 2048)."""
    cases = []
    m3 = m3_inputs(device, batch=16, seq=4096)
    cot = torch.randn_like(m3["x"])
    label = " at 16 x 4096 (mamba3-hybrid)"
    cases.append(
        {
            "name": M3_NAME + label,
            "fwd": no_grad_run(lambda: _m3_call(mamba3_siso_scan, m3)),
            "fwd_bwd": grad_run(lambda: _m3_call(mamba3_siso_scan, m3), list(m3.values()), cot),
        }
    )
    anchor_path()
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

        bhl = {k: m3[k].detach().transpose(1, 2).contiguous().requires_grad_() for k in ("dt", "adt", "trap")}
        leaves = [m3[k] for k in ("q", "k", "x", "q_bias", "k_bias", "angles", "D", "z")] + list(bhl.values())

        def m3_anchor():
            return mamba3_siso_combined(
                m3["q"], m3["k"], m3["x"], bhl["adt"], bhl["dt"], bhl["trap"], m3["q_bias"], m3["k_bias"],
                m3["angles"], D=m3["D"], Z=m3["z"], chunk_size=CHUNK,
            )  # fmt: skip

        cases.append(
            {
                "name": f"mamba_ssm mamba3_siso_combined (chunk {CHUNK}){label}",
                "fwd": no_grad_run(m3_anchor),
                "fwd_bwd": grad_run(m3_anchor, leaves, cot),
                "anchor": True,
            }
        )
    except Exception as exc:
        print(f"mamba3_siso_combined not usable ({type(exc).__name__}: {exc}); skipped", flush=True)
    try:
        from bench.scan_recurrence import TTSM_SHAPE, selective_case

        cases.append(selective_case(device, shape=TTSM_SHAPE, label=" D 576 at 2 x 2048 (ttsm)"))
    except Exception as exc:
        print(f"selective ttsm shape not usable ({type(exc).__name__}: {exc}); skipped", flush=True)
    return cases


def judge(rows: list[dict]) -> None:
    """Speedup over each op's reference and the goals (fwd+bwd ms, and below one SDPA attention layer), eager and,
    where the rows have them, graphed (each against the SDPA row timed the same way)."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        ours = by_name.get(r.get("ref_for") or "")
        if ours and r["fwd_bwd_ms"] and ours["fwd_bwd_ms"]:
            ours["speedup_vs_ref"] = r["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
    for r in rows:
        goal = next((ms for key, ms in GOALS.items() if key in r["name"]), None)
        if not r["name"].startswith("ours") or goal is None:
            continue
        for suffix in ("", "_graph"):
            ms = r.get(f"fwd_bwd{suffix}_ms")
            if ms is None:
                continue
            sdpa = by_name.get(SDPA_NAME, {}).get(f"fwd_bwd{suffix}_ms")
            r["goal_ms"] = goal
            r[f"goal_met{suffix}"] = ms <= goal and (sdpa is None or ms < sdpa)


def markdown(rows: list[dict], graphs: bool = False) -> str:
    """The table; with graphs, the graphed fwd / fwd+bwd and whether they meet the goal, beside the eager ones."""

    def cell(r, key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"

    def met(r, key):
        return "-" if key not in r else ("yes" if r[key] else "**no**")

    extra_head, extra_rule = (" graphed fwd / fwd+bwd ms | met, graphed |", "---:|---|") if graphs else ("", "")
    lines = [
        "| case | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | speedup vs ref | goal (fwd+bwd) | met |" + extra_head,
        "|---|---:|---:|---:|---:|---:|---:|---|" + extra_rule,
    ]
    for r in rows:
        goal = f"<= {r['goal_ms']} ms" if r.get("goal_ms") else "-"
        speed = f"{r['speedup_vs_ref']:.0f}x" if r.get("speedup_vs_ref") else "-"
        line = (
            f"| {r['name']} | {cell(r, 'fwd_ms', '.3f')} | {cell(r, 'fwd_bwd_ms', '.3f')} | "
            f"{cell(r, 'fwd_GBps', '.0f')} | {cell(r, 'fwd_bwd_GBps', '.0f')} | {speed} | {goal} | "
            f"{met(r, 'goal_met')} |"
        )
        if graphs:
            graphed = f"{cell(r, 'fwd_graph_ms', '.3f')} / {cell(r, 'fwd_bwd_graph_ms', '.3f')}"
            line += f" {graphed} | {met(r, 'goal_met_graph')} |"
        lines.append(line)
    return "\n".join(lines)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of the difference over RMS of the reference (NaN or inf counts as failure)."""
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def compare(kernel, reference, inputs: dict) -> dict:
    """Outputs and gradients of kernel vs the float64 reference (same inputs, upcast)."""
    leaves = {k: v.detach() for k, v in inputs.items()}
    results = {}
    outs = []
    for fn, cast in ((kernel, None), (reference, torch.float64)):
        ins = {k: (v.to(cast) if cast else v).clone().requires_grad_() for k, v in leaves.items()}
        y, final = fn(ins)
        gen = torch.Generator(device=y.device).manual_seed(5)
        loss = (y.double() * torch.randn(y.shape, device=y.device, dtype=torch.float64, generator=gen)).sum()
        if final is not None:
            loss = loss + (final.double() * torch.randn(final.shape, device=y.device, dtype=torch.float64,
                                                        generator=gen)).sum()  # fmt: skip
        grads = torch.autograd.grad(loss, list(ins.values()))
        outs.append({"y": y, "final": final} | {f"d{k}": g for k, g in zip(ins, grads)})
    for key, ref in outs[1].items():
        if ref is not None:
            results[key] = rel_err(outs[0][key], ref)
    return results


CHECK_CASES = [  # dtype, rms tolerance, SSD (T, groups, chunk), Mamba-3 (T, groups)
    (torch.bfloat16, 2e-2, ((300, 1, 64), (130, 2, 128)), ((300, 1),)),
    (torch.float32, 1e-4, ((77, 4, 32), (256, 2, 64)), ((129, HEADS),)),
]


# what --tuning may set: SSD_TUNING's kernel kinds (templates/scan/ssd.py) and the options each reads
TUNING_OPTIONS = {
    "fwd": {"num_warps", "num_stages", "maxnreg"},  # the forward (one pass)
    # the backward's loop (one pass, both forms, any G; "red": "ptr" sums a group's dB, dC with pointer atomics
    # instead of TMA reduce-add)
    "bwd": {"num_warps", "num_stages", "maxnreg", "red"},
    "state": {"fp32"},  # fp32 chunk states instead of the dot dtype's (what bf16 costs)
}


def tuning_arg(text: str) -> dict:
    """--tuning's value: a JSON object of SSD_TUNING entries, kernel kind -> options; a typo is an error, not a
    silent timing of the defaults."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('want {"kind": {"option": value}}, e.g. \'{"fwd": {"num_warps": 8}}\'')
    for kind, options in value.items():
        unknown = set(options) - TUNING_OPTIONS.get(kind, set())
        if kind not in TUNING_OPTIONS or unknown:
            what = f"kind {kind!r}" if kind not in TUNING_OPTIONS else f"{kind} option(s) {sorted(unknown)}"
            raise argparse.ArgumentTypeError(
                f"unknown {what}; known: {json.dumps({k: sorted(v) for k, v in TUNING_OPTIONS.items()})}"
            )
    return value


def tuned(form: dict | None, run, *args):
    """run(*args) with SSD_TUNING updated by `form` (None: as it is), restored afterwards even if run raises."""
    saved = {k: dict(v) for k, v in ssd_mod.SSD_TUNING.items()}
    ssd_mod.SSD_TUNING.update(form or {})
    try:
        return run(*args)
    finally:
        ssd_mod.SSD_TUNING.clear()
        ssd_mod.SSD_TUNING.update(saved)


def check(device, limit: int | None = None) -> bool:
    """Kernel vs float64 reference on the GPU over shapes, dtypes, odd lengths, groups and initial states."""
    ok = True
    for dtype, tol, ssd_shapes, m3_shapes in CHECK_CASES[:limit]:
        for seq, groups, chunk in ssd_shapes:
            base = ssd_inputs(device, batch=2, dtype=dtype, seq=seq, groups=groups, seed=seq)
            gen = torch.Generator(device=device).manual_seed(1)
            base["z"] = torch.randn(base["x"].shape, device=device, generator=gen).to(dtype)
            base["dt_bias"] = torch.randn(HEADS, device=device, generator=gen)
            base["h0"] = torch.randn(2, HEADS, HEADDIM, DSTATE, device=device, generator=gen)

            def run_ssd(ins, fn, chunk=chunk):
                return fn(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], chunk, D=ins["D"], z=ins["z"],
                          dt_bias=ins["dt_bias"], h0=ins["h0"], return_final_state=True)  # fmt: skip

            forms = [("default", None, base)]
            if (seq, groups, chunk) == ssd_shapes[0]:
                forms += [(str(form), form, base) for form in CHECK_BWD_FORMS]
                # P and N two short (rows of 124 or 248 bytes): forward and backward on zero-padded copies
                # (`_ssd_fwd_padded`, `_ssd_bwd_padded`)
                cut = {k: base[k][..., :-2].contiguous() for k in ("x", "z", "B", "C")}
                cut["h0"] = base["h0"][..., :-2, :-2].contiguous()
                forms.append(("rows padded (P, N - 2)", None, base | cut))
            for label, form, ins in forms:
                errs = tuned(form, compare, lambda i: run_ssd(i, ssd_scan), lambda i: run_ssd(i, ssd_scan_ref), ins)
                worst = max(errs.values())
                ok &= worst < tol
                print(f"check ssd {str(dtype)[6:]} T={seq} G={groups} Q={chunk} {label}: worst "
                      f"rms-rel {worst:.2e} ({max(errs, key=errs.get)}) {'ok' if worst < tol else 'FAIL'}",
                      flush=True)  # fmt: skip
        for seq, groups in m3_shapes:
            base = m3_inputs(device, batch=2, dtype=dtype, seq=seq, groups=groups, seed=seq)
            gen = torch.Generator(device=device).manual_seed(2)
            state = (
                torch.randn(2, HEADS, ANGLES, device=device, generator=gen),
                torch.randn(2, HEADS, HEADDIM, DSTATE, device=device, generator=gen),
                torch.randn(2, HEADS, DSTATE, device=device, generator=gen),
                torch.randn(2, HEADS, HEADDIM, device=device, generator=gen),
            )
            base |= {f"s{i}": s for i, s in enumerate(state)}

            def run_m3(ins, fn, wide=False):
                st = tuple(ins[f"s{i}"] for i in range(4))
                x, z = ins["x"], ins["z"]
                if wide:  # as mamba3-hybrid passes them: slices of one projection row, with 64 more columns
                    row = torch.cat((z.flatten(2), x.flatten(2), z.new_zeros(*z.shape[:2], 64)), dim=-1)
                    n = x[0, 0].numel()
                    z, x = (row[..., k * n : (k + 1) * n].unflatten(-1, x.shape[2:]) for k in (0, 1))
                y, fin = fn(x, ins["dt"], ins["adt"], ins["trap"], ins["q"], ins["k"], ins["angles"],
                            q_bias=ins["q_bias"], k_bias=ins["k_bias"], D=ins["D"], z=z, chunk_size=CHUNK,
                            initial_state=st, return_final_state=True)  # fmt: skip
                return y, fin[1]

            m3_forms = [("", False)] + ([(" x, z in place", True)] if (seq, groups) == m3_shapes[0] else [])
            for label, wide in m3_forms:
                errs = compare(lambda i, w=wide: run_m3(i, mamba3_siso_scan, w),
                               lambda i, w=wide: run_m3(i, mamba3_siso_scan_ref, w), base)  # fmt: skip
                worst = max(errs.values())
                ok &= worst < tol
                verdict = "ok" if worst < tol else "FAIL"
                print(f"check mamba3 {str(dtype)[6:]} T={seq} G={groups}{label}: worst rms-rel {worst:.2e} "
                      f"({max(errs, key=errs.get)}) {verdict}", flush=True)  # fmt: skip
    return ok


SSD_SWEEP = {
    "fwd": [{"num_stages": st} for st in (2, 3, 1)] + [{"num_warps": 8, "num_stages": 2}],
    # the backward's prefetch depth, and its two reductions of dB, dC over G = 1's heads
    "bwd": [{"num_stages": st} for st in (2, 1, 3)] + [{"red": "ptr"}],
}
# options that --check runs besides the defaults, on the first SSD shape: fp32 state checkpoints (what bf16 costs),
# the backward with pointer atomics for dB and dC
CHECK_BWD_FORMS = [{"state": {"fp32": True}}, {"bwd": {"red": "ptr"}}]


def sweep(device) -> dict:
    """Time the SSD kernels' options (forward alone: the forward's stages and warps; then forward+backward: the
    backward's stages and its two dB/dC reductions) and keep the fastest."""
    ins = ssd_inputs(device)
    cot = torch.randn_like(ins["x"])

    def fwd():
        return ssd_scan(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], CHUNK, D=ins["D"])

    best = {}
    fwd_bwd = grad_run(fwd, list(ins.values()), cot)
    for kind, run in (("fwd", no_grad_run(fwd)), ("bwd", fwd_bwd)):
        timings = []
        for opts in SSD_SWEEP[kind]:
            ssd_mod.SSD_TUNING[kind] = opts
            try:
                timings.append((eager_ms(run, rep_ms=100), opts))
            except Exception as exc:
                print(f"sweep {kind} {opts}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        for ms, opts in timings:
            print(f"sweep ssd {kind} {opts}: {ms:.3f} ms", flush=True)
        best[kind] = min(timings, key=lambda t: t[0])[1]
        ssd_mod.SSD_TUNING[kind] = best[kind]
    print(f"sweep best: {best}", flush=True)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="kernels vs float64 references on the GPU first")
    parser.add_argument("--sweep", action="store_true", help="time launch options and use the fastest")
    parser.add_argument("--check-bf16-only", action="store_true", help="check bf16 only (fp32 compiles slowly)")
    parser.add_argument("--no-table", action="store_true", help="skip the timing table")
    parser.add_argument("--recurrence-extras", action="store_true", help="also run scan_recurrence's check/sweep")
    parser.add_argument("--only-ours", action="store_true", help="time only our SSD and Mamba-3 cases")
    parser.add_argument("--no-recurrence", action="store_true", help="leave out bench/scan_recurrence.py's rows")
    parser.add_argument("--no-refs", action="store_true", help="leave out the (slow) sequential PyTorch references")
    parser.add_argument("--no-compiled", action="store_true", help="leave out the torch.compile'd Mamba-3 caller")
    parser.add_argument("--variants", action="store_true", help="also time the ops at the variants' own shapes")
    parser.add_argument("--graphs", action="store_true", help="also time each op replayed from a CUDA graph")
    parser.add_argument("--tuning", type=tuning_arg, default={}, help='SSD_TUNING entries (JSON) for the check and the '
                        'timing, e.g. \'{"fwd": {"num_warps": 8}}\' or \'{"bwd": {"red": "ptr"}}\' (kinds: "fwd" '
                        'the forward, "bwd" the backward, "state"; options: TUNING_OPTIONS)')  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/scan.py needs a CUDA GPU (run it through the device); nothing measured", file=sys.stderr)
        return 2
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    import triton

    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.date.today().isoformat()}  # fmt: skip
    if args.tuning:
        ssd_mod.SSD_TUNING.update(args.tuning)
        result["ssd_tuning"] = args.tuning
        print(f"SSD_TUNING {ssd_mod.SSD_TUNING}", flush=True)
    ok = True
    if args.check:
        ok = check(device, limit=1 if args.check_bf16_only else None)
        if args.recurrence_extras:
            from bench.scan_recurrence import check as recurrence_check

            ok &= bool(recurrence_check(device))
        result["check_ok"] = ok
        print(f"check {'passed' if ok else 'FAILED'}", flush=True)
    rec_configs = {}
    if args.sweep:
        result["ssd_launch"] = sweep(device)
        if args.recurrence_extras:
            from bench.scan_recurrence import sweep as recurrence_sweep

            rec_configs = recurrence_sweep(device)
    if not args.no_table:
        cases = our_cases(device, compiled=not args.no_compiled)
        if not args.only_ours:
            cases += anchor_cases(device)
            if not args.no_recurrence:
                cases += recurrence_rows(device, rec_configs, refs=not args.no_refs)
            cases += context_cases(device) + ([] if args.no_refs else reference_cases(device))
            if args.variants:
                cases += variant_cases(device)
        rows = []
        for case in cases:
            rows.append(measure(case, graphs=args.graphs))
            print(f"{measured_line(rows[-1], args.graphs)} "
                  f"(t={time.perf_counter() - T0:.0f}s)", flush=True)  # fmt: skip
        judge(rows)
        result["rows"] = rows
        table = markdown(rows, graphs=args.graphs)
        print("\n" + table + "\n", flush=True)
        out = os.environ.get("OUT")
        if out:
            Path(out, "scan_table.md").write_text(table + "\n")
    out = os.environ.get("OUT")
    if out:
        Path(out, "scan.json").write_text(json.dumps(result, indent=1, default=str))
    print("JSON " + json.dumps(result, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
