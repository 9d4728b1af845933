"""Selective scan (Mamba-1) kernels against the sequential reference under TRITON_INTERPRET=1 on the CPU (or on
CUDA where present): outputs, final states and all gradients, odd lengths and widths, bf16, gates, initial states,
several chunk lengths and channel blocks, long chunks with decays near 0 and near 1."""

import importlib

import pytest
import torch

from .conftest import interpret_triton_stdlib  # noqa: TID252

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]


@pytest.fixture(scope="module")
def sel():
    """The module with its kernels built for the interpreter on a CPU-only machine, restored afterwards."""
    patch = pytest.MonkeyPatch()
    if DEV == "cpu":
        patch.setenv("TRITON_INTERPRET", "1")
        interpret_triton_stdlib(patch)
    mod = importlib.reload(importlib.import_module("templates.scan.selective"))
    yield mod
    patch.undo()
    importlib.reload(mod)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error; NaN or inf anywhere fails."""
    assert torch.isfinite(x).all(), "non-finite values"
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(Bsz, T, DM, N, dtype, z=True, h0=True, skip=True, bias=True, a_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(DEV, dt)

    return {
        "u": rnd(Bsz, T, DM),
        "delta": (rnd(Bsz, T, DM, dt=torch.float32) * 0.5 - 1.0).to(dtype),
        "A": -(torch.rand(DM, N, generator=g) * a_scale + 0.05).to(DEV),
        "B": rnd(Bsz, T, N),
        "C": rnd(Bsz, T, N),
        "D": rnd(DM, dt=torch.float32) if skip else None,
        "z": rnd(Bsz, T, DM) if z else None,
        "delta_bias": rnd(DM, dt=torch.float32) * 0.3 if bias else None,
        "h0": rnd(Bsz, DM, N, dt=torch.float32) if h0 else None,
    }


def run(fn, inputs, cots, **kw):
    """Outputs (y, final state) and gradients of sum(y * cot_y) + sum(final * cot_f) for every given input."""
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    y, fin = fn(**leaves, return_final_state=True, **kw)
    loss = (y.double() * cots[0]).sum() + (fin.double() * cots[1]).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present])
    return y.detach(), fin.detach(), dict(zip(present, grads))


def ref64(sel):
    def fn(**kw):
        kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return sel.selective_scan_ref(**kw)

    return fn


CASES = [
    # T, dtype, z, h0, config (the interpreter default is BD 4, CK 8)
    (37, torch.float32, True, True, {}),
    (37, torch.float32, True, True, {"CK": 16, "BD": 8}),
    (16, torch.float32, False, False, {}),
    (1, torch.float32, True, True, {}),
    (21, torch.bfloat16, True, False, {}),
    (21, torch.bfloat16, False, True, {"CK": 4, "BD": 2}),
    # SEG: segments of the length scanned in parallel (0, the default, picks them from the shape: several here)
    (37, torch.float32, True, True, {"SEG": 1}),
    (37, torch.float32, True, True, {"SEG": 3, "CK": 4}),
    (37, torch.float32, False, False, {"SEG": 2, "CK": 16, "BD": 8}),
    (21, torch.bfloat16, True, True, {"SEG": 2}),
]


@pytest.mark.parametrize("T, dtype, z, h0, config", CASES)
def test_matches_reference(sel, T, dtype, z, h0, config):
    Bsz, DM, N = 2, 6, 5
    inputs = make_inputs(Bsz, T, DM, N, dtype, z=z, h0=h0, seed=T)
    cots = [torch.randn(Bsz, T, DM, device=DEV, dtype=torch.float64), torch.randn(Bsz, DM, N, device=DEV).double()]
    y, fin, g = run(sel.selective_scan, inputs, cots, config=config)
    y_ref, fin_ref, g_ref = run(ref64(sel), inputs, cots)
    assert y.dtype == dtype and y.shape == (Bsz, T, DM) and fin.shape == (Bsz, DM, N)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(y, y_ref) < tol
    assert rel_err(fin, fin_ref) < (1e-5 if dtype == torch.float32 else 1e-3)
    assert set(g) == set(g_ref)
    for name in g:
        assert g[name].shape == inputs[name].shape, name
        assert rel_err(g[name], g_ref[name]) < tol, name


@pytest.mark.parametrize(
    "DM, N, dtype, config",
    [
        (8, 4, torch.float32, {"BD": 4, "FWD_BD": 8}),
        (8, 4, torch.bfloat16, {"BD": 4, "FWD_BD": 4, "SEG": 2}),
        (8, 5, torch.float32, {"BD": 4, "FWD_BD": 8, "SEG": 3, "CK": 4}),
        (6, 4, torch.float32, {"BD": 2, "FWD_BD": 4}),
    ],
)
def test_tile_padding(sel, DM, N, dtype, config):
    """Whole tiles (channels a multiple of the block, N a power of two: the forward's loads take no masks, as on the
    GPU shapes) and tiles padded in channels or states only (the forward clamps indices and gives padded states
    B = 0; the backward masks)."""
    Bsz, T = 2, 29
    inputs = make_inputs(Bsz, T, DM, N, dtype, seed=DM + N)
    cots = [torch.randn(Bsz, T, DM, device=DEV, dtype=torch.float64), torch.randn(Bsz, DM, N, device=DEV).double()]
    y, fin, g = run(sel.selective_scan, inputs, cots, config=config)
    y_ref, fin_ref, g_ref = run(ref64(sel), inputs, cots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(y, y_ref) < tol
    assert rel_err(fin, fin_ref) < (1e-5 if dtype == torch.float32 else 1e-3)
    assert set(g) == set(g_ref)
    for name in g:
        assert rel_err(g[name], g_ref[name]) < tol, name


def test_segment_rule(sel):
    """The length is split only when (sequence, channel block) programs are few, into whole checkpoint chunks."""
    cfg = sel._sel_config(1024, 16, {"CK": 128, "BD": 32})
    assert sel._sel_segments(64, 1024, 1024, 32, cfg) == (1, 1024)
    assert sel._sel_segments(2, 2048, 576, 32, cfg) == (16, 128)
    assert sel._sel_segments(2, 300, 576, 32, cfg) == (3, 128)
    assert sel._sel_segments(1, 37, 6, 4, {**cfg, "CK": 4, "SEG": 3}) == (3, 16)


def test_without_skip_bias_softplus(sel):
    Bsz, T, DM, N = 1, 19, 5, 3
    inputs = make_inputs(Bsz, T, DM, N, torch.float32, z=False, h0=False, skip=False, bias=False)
    inputs["delta"] = torch.rand(Bsz, T, DM, device=DEV) * 0.2
    cots = [torch.randn(Bsz, T, DM, device=DEV, dtype=torch.float64), torch.randn(Bsz, DM, N, device=DEV).double()]
    y, fin, g = run(sel.selective_scan, inputs, cots, delta_softplus=False)
    y_ref, fin_ref, g_ref = run(ref64(sel), inputs, cots, delta_softplus=False)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(fin, fin_ref) < 1e-5
    for name in g:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


def test_inference_forward_and_carry(sel):
    """Without grad the forward keeps no checkpoints; two windows with the carried state equal one window."""
    inputs = make_inputs(2, 30, 4, 4, torch.float32, h0=False)
    with torch.no_grad():
        whole = sel.selective_scan(**inputs)
        first_part = {k: (v[:, :11] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
        second_part = {k: (v[:, 11:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
        first, carry = sel.selective_scan(**first_part, return_final_state=True)
        second_part["h0"] = carry
        second = sel.selective_scan(**second_part)
    assert rel_err(torch.cat([first, second], 1), whole) < 1e-5
    assert rel_err(whole, sel.selective_scan_ref(**inputs)) < 1e-5


@pytest.mark.parametrize("a_scale, delta_shift", [(60.0, 2.0), (1e-3, -4.0)])
def test_long_sequence_stable(sel, a_scale, delta_shift):
    """Long chunks (the GPU default CK 128) with decays near 0 (dt * A around -100) and near 1 (dt * A around -1e-5):
    finite and exact; the backward's running sums restart at each chunk from exact values. (In fp32 the relative error
    of dA for strongly decaying states grows with CK, about 1e-5 here at CK 128 and up to 1.4e-4 at CK 256.)"""
    Bsz, T, DM, N = 1, 600, 2, 2
    inputs = make_inputs(Bsz, T, DM, N, torch.float32, z=False, h0=True, a_scale=a_scale, seed=5)
    inputs["delta"] = inputs["delta"] + delta_shift
    gen = torch.Generator().manual_seed(1)
    cots = [
        torch.randn(Bsz, T, DM, generator=gen).double().to(DEV),
        torch.randn(Bsz, DM, N, generator=gen).double().to(DEV),
    ]
    y, fin, g = run(sel.selective_scan, inputs, cots, config={"CK": 128})
    y_ref, fin_ref, g_ref = run(ref64(sel), inputs, cots)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(fin, fin_ref) < 1e-4
    for name in g:
        assert rel_err(g[name], g_ref[name]) < 1e-4, name


def test_reference_gradcheck_float64(sel):
    inputs = make_inputs(1, 4, 2, 3, torch.float64, seed=2)
    inputs["A"] = inputs["A"].double()
    for k in ("D", "delta_bias", "h0"):
        inputs[k] = inputs[k].double()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}

    def fn(*xs):
        return sel.selective_scan_ref(**dict(zip(NAMES, xs)), return_final_state=True)

    assert torch.autograd.gradcheck(fn, tuple(leaves[k] for k in NAMES))


def test_bad_shapes_raise(sel):
    inputs = make_inputs(1, 5, 3, 2, torch.float32)
    inputs["B"] = inputs["B"][:, :4]
    with pytest.raises(ValueError, match="selective_scan: B must have shape"):
        sel.selective_scan(**inputs)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = importlib.import_module("templates.scan.selective")
    inputs = {k: (v.cpu() if v is not None else None) for k, v in make_inputs(1, 6, 3, 2, torch.float32).items()}
    assert torch.equal(mod.selective_scan(**inputs), mod.selective_scan_ref(**inputs))


@pytest.mark.parametrize("N, regs", [(16, 128), (64, 168), (16, 0)])
def test_backward_register_cap(sel, monkeypatch, N, regs):
    """The backward launches under the register cap its state width was timed with on the H100 (`_sel_config`):
    128 for N <= 16, 168 above; BWD_REGS 0 launches it uncapped. The gradients stay the reference's."""
    seen = []
    kernel = sel._sel_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs.get("maxnreg"))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(sel, "_sel_bwd_kernel", Spy())
    inputs = make_inputs(1, 9, 4, N, torch.float32, h0=False)
    cots = [torch.randn(1, 9, 4, device=DEV, dtype=torch.float64), torch.randn(1, 4, N, device=DEV).double()]
    config = {"BWD_REGS": 0} if regs == 0 else None
    y, fin, g = run(sel.selective_scan, inputs, cots, config=config)
    y_ref, fin_ref, g_ref = run(ref64(sel), inputs, cots)
    assert seen and all(r == (regs or None) for r in seen)  # the segments' summary pass too, where there is one
    for name in g:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name
