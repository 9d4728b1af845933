"""Mamba-3 SISO scan: the chunked kernel path (interpreted on the CPU) against the step-by-step trapezoid reference."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from .conftest import interpret_triton_stdlib  # noqa: TID252


@pytest.fixture(scope="module")
def m3():
    """templates.scan.mamba3 over an interpreted ssd module; the environment and modules are restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        import triton.language  # noqa: F401  (so that its helpers exist to be patched)

        interpret_triton_stdlib(patch)
        # the rotary module first: ssd imports its backward
        rotary = importlib.reload(importlib.import_module("templates.scan.m3_rotary"))
        ssd = importlib.reload(importlib.import_module("templates.scan.ssd"))
        module = importlib.reload(importlib.import_module("templates.scan.mamba3"))
        yield module
    for mod in (rotary, ssd, module):
        importlib.reload(mod)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _inputs(bsz, seqlen, nheads, hdim, ngroups, dstate, nangles, seed=0, dt_shift=-1.0, a_range=(0.0, 1.0)):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).float()

    dt = F.softplus(rnd(bsz, seqlen, nheads) + dt_shift)
    rate = a_range[0] + (a_range[1] - a_range[0]) * torch.rand(bsz, seqlen, nheads, generator=gen)
    return {
        "x": rnd(bsz, seqlen, nheads, hdim),
        "dt": dt,
        "adt": -dt * rate,
        "trap": rnd(bsz, seqlen, nheads),
        "q": rnd(bsz, seqlen, ngroups, dstate),
        "k": rnd(bsz, seqlen, ngroups, dstate),
        "angles": torch.tanh(rnd(bsz, seqlen, nheads, nangles)) * torch.pi,
        "q_bias": rnd(nheads, dstate),
        "k_bias": rnd(nheads, dstate),
        "D": rnd(nheads),
        "z": rnd(bsz, seqlen, nheads, hdim),
        "state": (
            rnd(bsz, nheads, nangles),
            rnd(bsz, nheads, hdim, dstate),
            rnd(bsz, nheads, dstate),
            rnd(bsz, nheads, hdim),
        ),
    }


MAIN = ("x", "dt", "adt", "trap", "q", "k", "angles")


def _run(fn, inp, opts, chunk, with_final, cast=None):
    conv = (lambda t: t.to(cast)) if cast is not None else (lambda t: t)
    leaves = {k: conv(inp[k]).clone().requires_grad_() for k in MAIN + tuple(o for o in opts if o != "state")}
    state = [conv(s).clone().requires_grad_() for s in inp["state"]] if "state" in opts else None
    kw = {k: leaves[k] for k in ("q_bias", "k_bias", "D", "z") if k in leaves}
    out = fn(*[leaves[k] for k in MAIN], chunk_size=chunk, initial_state=state, return_final_state=with_final, **kw)
    y, final = out if with_final else (out, ())
    gen = torch.Generator().manual_seed(9)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    for part in final[1:]:
        loss = loss + (part.double() * torch.randn(part.shape, generator=gen, dtype=torch.float64)).sum()
    wrt = list(leaves.values()) + (state or [])
    grads = torch.autograd.grad(loss, wrt)
    names = [f"d{k}" for k in leaves] + [f"dstate{i}" for i in range(len(state or []))]
    return {"y": y} | {f"final{i}": f for i, f in enumerate(final)} | dict(zip(names, grads))


CASES = [
    # seqlen, chunk, heads, headdim, groups, dstate, angles, options
    (41, 16, 4, 16, 1, 32, 8, ("q_bias", "k_bias", "D", "z", "state")),
    (64, 32, 2, 16, 2, 16, 8, ("D",)),
    (19, 16, 2, 32, 2, 16, 4, ("state",)),
    # one partial chunk and three heads per group: the loads issued one chunk / one head ahead run off both ends
    (13, 16, 3, 16, 1, 16, 4, ("q_bias", "k_bias", "z")),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}_Q{c[1]}_H{c[2]}G{c[4]}N{c[5]}R{c[6]}" for c in CASES])
def test_kernel_matches_trapezoid_reference(m3, case):
    seqlen, chunk, nheads, hdim, ngroups, dstate, nangles, opts = case
    inp = _inputs(2, seqlen, nheads, hdim, ngroups, dstate, nangles)
    got = _run(m3.mamba3_siso_scan, inp, opts, chunk, with_final=True)
    ref = _run(m3.mamba3_siso_scan_ref, inp, opts, chunk, with_final=True)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert _rel(got[name], ref[name]) < 3e-5, name


def test_bf16_inputs(m3):
    inp = _inputs(1, 33, 2, 16, 1, 16, 4)
    got = _run(m3.mamba3_siso_scan, inp, ("D", "z"), 16, with_final=False, cast=torch.bfloat16)
    ref = _run(m3.mamba3_siso_scan_ref, inp, ("D", "z"), 16, with_final=False, cast=torch.bfloat16)
    assert got["y"].dtype == torch.bfloat16
    for name in ref:
        assert _rel(got[name], ref[name]) < 3e-2, name


@pytest.mark.parametrize("dt_shift,a_range", [(4.0, (5.0, 10.0)), (-9.0, (1e-4, 1e-3))], ids=["near_0", "near_1"])
def test_long_sequence_is_stable(m3, dt_shift, a_range):
    inp = _inputs(1, 4096, 1, 16, 1, 16, 4, dt_shift=dt_shift, a_range=a_range)
    got = _run(m3.mamba3_siso_scan, inp, (), 64, with_final=True)
    ref = _run(m3.mamba3_siso_scan_ref, inp, (), 64, with_final=True, cast=torch.float64)
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert _rel(got[name], ref[name]) < 1e-3, name


def test_two_windows_with_carried_state_equal_one(m3):
    inp = _inputs(2, 45, 2, 16, 1, 16, 4)
    args = [inp[k] for k in MAIN]
    whole, final = m3.mamba3_siso_scan(*args, chunk_size=16, return_final_state=True)
    cut = 20
    first, mid = m3.mamba3_siso_scan(*[a[:, :cut] for a in args], chunk_size=16, return_final_state=True)
    second, end = m3.mamba3_siso_scan(
        *[a[:, cut:] for a in args], chunk_size=16, initial_state=mid, return_final_state=True
    )
    assert _rel(torch.cat((first, second), dim=1), whole) < 1e-5
    for got, ref in zip(end, final):
        assert _rel(got, ref) < 1e-5


def test_reference_gradcheck_float64(m3):
    inp = _inputs(1, 4, 2, 2, 1, 4, 1)
    names = MAIN + ("q_bias", "k_bias", "D", "z")
    leaves = [inp[n].double().requires_grad_() for n in names] + [s.double().requires_grad_() for s in inp["state"]]

    def f(*ts):
        kw = dict(zip(("q_bias", "k_bias", "D", "z"), ts[7:11]))
        y, fin = m3.mamba3_siso_scan_ref(*ts[:7], **kw, initial_state=tuple(ts[11:]), return_final_state=True)
        return y, fin[1], fin[2], fin[3]

    assert torch.autograd.gradcheck(f, leaves)


def test_bad_shapes_raise_clear_errors(m3):
    inp = _inputs(1, 8, 2, 16, 1, 16, 4)
    args = [inp[k] for k in MAIN]
    with pytest.raises(ValueError, match="trap"):
        m3.mamba3_siso_scan(*args[:3], args[3][:, :5], *args[4:])
    with pytest.raises(ValueError, match="2R <= N"):
        m3.mamba3_siso_scan(*args[:6], torch.zeros(1, 8, 2, 9))


@pytest.mark.parametrize("ngroups,nangles,biases,dtype", [(1, 3, True, torch.float32), (2, 8, False, torch.float32),
                                                         (1, 5, True, torch.bfloat16)])  # fmt: skip
def test_rotation_kernel_matches_reference(m3, ngroups, nangles, biases, dtype):
    """The per-head rotation op (group rows expanded to the heads, biased, the first R pairs rotated; 37 steps over
    blocks of 32) and its backward to the group rows, the biases and the angles, against the float64 reference; the
    rows come back in q's dtype."""
    rotary = importlib.import_module("templates.scan.m3_rotary")
    gen = torch.Generator().manual_seed(11 + ngroups)
    bsz, seqlen, nheads, dstate = 2, 37, 4, 16
    q, k = (torch.randn(bsz, seqlen, ngroups, dstate, generator=gen).to(dtype) for _ in range(2))
    theta = torch.randn(bsz, seqlen, nheads, nangles, generator=gen) * 3.0
    qb, kb = (torch.randn(nheads, dstate, generator=gen) if biases else None for _ in range(2))
    cots = [torch.randn(bsz, seqlen, nheads, dstate, generator=gen) for _ in range(2)]
    got_leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, qb, kb, theta)]
    got = rotary.m3_rotate_heads(*got_leaves, nheads)
    ref_leaves = [t.double().requires_grad_() if t is not None else None for t in (q, k, qb, kb, theta)]
    ref = tuple(rotary.m3_rotary_heads_ref(v, b, ref_leaves[4], nheads, torch.float64)
                for v, b in ((ref_leaves[0], ref_leaves[2]), (ref_leaves[1], ref_leaves[3])))  # fmt: skip
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for g, r in zip(got, ref):
        assert g.dtype == dtype and g.shape == r.shape
        assert _rel(g, r) < tol
    wrt = [i for i, t in enumerate(got_leaves) if t is not None]
    g_grads = torch.autograd.grad(got, [got_leaves[i] for i in wrt], cots)
    r_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in wrt], [c.double() for c in cots])
    for i, g, r in zip(wrt, g_grads, r_grads):
        assert g.shape == r.shape and g.dtype == got_leaves[i].dtype
        assert _rel(g, r) < tol, i


@pytest.mark.parametrize("seqlen,nangles,theta0", [(150, 16, True), (7, 3, False), (64, 8, True)])
def test_gates_kernel_matches_reference(m3, seqlen, nangles, theta0):
    """The fused weight/angle kernel (forward walk and reverse-cumsum backward) against its PyTorch reference, with
    strided dt/trap views and head-broadcast angles as the mixer passes them."""
    rotary = importlib.import_module("templates.scan.m3_rotary")
    gen = torch.Generator().manual_seed(seqlen)
    bsz, nheads = 2, 3
    dt = F.softplus(torch.randn(bsz, seqlen, nheads, generator=gen) - 1.0)
    wide = torch.randn(bsz, seqlen, 2 * nheads, generator=gen)
    trap = wide[..., nheads:]  # a strided view, as split from in_proj
    angles = torch.randn(bsz, seqlen, 1, nangles, generator=gen).expand(bsz, seqlen, nheads, nangles)
    th0 = torch.randn(bsz, nheads, nangles, generator=gen) if theta0 else None
    cots = [torch.randn(bsz, seqlen, nheads, generator=gen) for _ in range(2)]
    cots.append(torch.randn(bsz, seqlen, nheads, nangles, generator=gen))
    outs = []
    for fn in (rotary.m3_gates, rotary.m3_gates_ref):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (dt, trap, angles, th0)]
        res = fn(*leaves)
        wrt = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(res, wrt, cots)
        outs.append([*res, *grads])
    for got, ref in zip(*outs):
        assert got.shape == ref.shape
        assert _rel(got, ref) < 1e-5


def test_gates_backward_in_input_dtypes(m3):
    """The gate kernel's backward stores d dt, d trap and d angles in their inputs' dtypes (bf16 trap and angles here,
    as a bf16 in_proj gives them; dt fp32), with the values of the fp32 reference's gradients rounded once."""
    rotary = importlib.import_module("templates.scan.m3_rotary")
    gen = torch.Generator().manual_seed(3)
    bsz, seqlen, nheads, nangles = 2, 77, 3, 5
    dt = F.softplus(torch.randn(bsz, seqlen, nheads, generator=gen) - 1.0)
    trap = torch.randn(bsz, seqlen, nheads, generator=gen).bfloat16()
    angles = torch.randn(bsz, seqlen, nheads, nangles, generator=gen).bfloat16()
    th0 = torch.randn(bsz, nheads, nangles, generator=gen)
    cots = [torch.randn(bsz, seqlen, nheads, generator=gen) for _ in range(2)]
    cots.append(torch.randn(bsz, seqlen, nheads, nangles, generator=gen))
    leaves = [t.clone().requires_grad_() for t in (dt, trap, angles, th0)]
    got = torch.autograd.grad(rotary.m3_gates(*leaves), leaves, cots)
    ref_leaves = [t.float().clone().requires_grad_() for t in (dt, trap, angles, th0)]
    ref = torch.autograd.grad(rotary.m3_gates_ref(*ref_leaves), ref_leaves, cots)
    for g, r, leaf in zip(got, ref, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert _rel(g, r.to(leaf.dtype)) < 1e-2
