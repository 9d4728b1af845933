"""SSD scan: Triton kernels (under TRITON_INTERPRET=1 on the CPU) against the sequential PyTorch reference."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from .conftest import interpret_triton_stdlib  # noqa: TID252


@pytest.fixture(scope="module")
def ssd():
    """The ssd module loaded with its kernels interpreted; the environment and module are restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        import triton.language  # noqa: F401  (so that its helpers exist to be patched)

        interpret_triton_stdlib(patch)
        rotary = importlib.reload(importlib.import_module("templates.scan.m3_rotary"))  # ssd imports its backward
        module = importlib.reload(importlib.import_module("templates.scan.ssd"))
        yield module
    importlib.reload(rotary)
    importlib.reload(module)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _inputs(bsz, seqlen, nheads, hdim, ngroups, dstate, dtype, seed=0, dt_shift=-1.0, a_scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return {
        "x": rnd(bsz, seqlen, nheads, hdim),
        "dt": (rnd(bsz, seqlen, nheads).double() + dt_shift).to(dtype),
        "A": -(torch.rand(nheads, generator=gen, dtype=torch.float64) + 0.5).float() * a_scale,
        "B": rnd(bsz, seqlen, ngroups, dstate),
        "C": rnd(bsz, seqlen, ngroups, dstate),
        "D": rnd(nheads).float(),
        "z": rnd(bsz, seqlen, nheads, hdim),
        "dt_bias": rnd(nheads).float(),
        "h0": rnd(bsz, nheads, hdim, dstate).float(),
    }


def _run(fn, inp, opts, chunk, with_final):
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items() if k in opts or k in ("x", "dt", "A", "B", "C")}
    kw = {k: leaves[k] for k in ("D", "z", "dt_bias", "h0") if k in leaves}
    out = fn(
        leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk, return_final_state=with_final, **kw
    )
    y, final = out if with_final else (out, None)
    gen = torch.Generator().manual_seed(7)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    if final is not None:
        loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    res = {"y": y} | ({"final": final} if final is not None else {})
    return res | {f"d{n}": g for n, g in zip(names, grads)}


CASES = [
    # seqlen, chunk, heads, headdim, groups, dstate, options
    (37, 16, 4, 16, 2, 16, ("D", "z", "dt_bias", "h0")),
    (64, 32, 2, 32, 1, 16, ("D",)),
    (1, 16, 2, 16, 2, 16, ("z", "h0")),
    (50, 16, 2, 24, 2, 20, ("dt_bias",)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}_Q{c[1]}_H{c[2]}P{c[3]}G{c[4]}N{c[5]}" for c in CASES])
def test_kernel_matches_reference_fp32(ssd, case):
    seqlen, chunk, nheads, hdim, ngroups, dstate, opts = case
    inp = _inputs(2, seqlen, nheads, hdim, ngroups, dstate, torch.float32)
    got = _run(ssd.ssd_scan, inp, opts, chunk, with_final=True)
    ref = _run(ssd.ssd_scan_ref, inp, opts, chunk, with_final=True)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert _rel(got[name], ref[name]) < 2e-5, name


def test_kernel_bf16_inputs(ssd):
    inp = _inputs(2, 33, 2, 16, 1, 16, torch.bfloat16)
    got = _run(ssd.ssd_scan, inp, ("D", "z"), 16, with_final=False)
    ref = _run(ssd.ssd_scan_ref, inp, ("D", "z"), 16, with_final=False)
    assert got["y"].dtype == torch.bfloat16 and got["dx"].dtype == torch.bfloat16
    for name in ref:
        assert _rel(got[name], ref[name]) < 2e-2, name


def test_without_softplus_and_matrix_d(ssd):
    inp = _inputs(1, 40, 2, 16, 2, 16, torch.float32)
    inp["dt"] = inp["dt"].abs() * 0.2
    inp["D"] = torch.randn(2, 16)
    x, dt, A, B, C, D = (inp[k] for k in ("x", "dt", "A", "B", "C", "D"))
    got = ssd.ssd_scan(x, dt, A, B, C, 16, D=D, dt_softplus=False)
    ref = ssd.ssd_scan_ref(x, dt, A, B, C, 16, D=D, dt_softplus=False)
    assert _rel(got, ref) < 2e-5


@pytest.mark.parametrize("dt_shift,a_scale", [(6.0, 8.0), (-9.0, 1e-3)], ids=["decay_near_0", "decay_near_1"])
def test_long_sequence_is_stable(ssd, dt_shift, a_scale):
    inp = _inputs(1, 4096, 1, 16, 1, 16, torch.float32, dt_shift=dt_shift, a_scale=a_scale)
    got = _run(ssd.ssd_scan, inp, ("dt_bias",), 64, with_final=True)
    ref = _run(ssd.ssd_scan_ref, {k: v.double() for k, v in inp.items()}, ("dt_bias",), 64, with_final=True)
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert _rel(got[name], ref[name]) < 1e-3, name


def test_two_windows_with_carried_state_equal_one(ssd):
    inp = _inputs(2, 48, 2, 16, 1, 16, torch.float32)
    x, dt, A, B, C = (inp[k] for k in ("x", "dt", "A", "B", "C"))
    whole, final = ssd.ssd_scan(x, dt, A, B, C, 16, return_final_state=True)
    cut = 21
    first, mid = ssd.ssd_scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], 16, return_final_state=True)
    second, end = ssd.ssd_scan(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], 16, h0=mid, return_final_state=True)
    assert _rel(torch.cat((first, second), dim=1), whole) < 1e-5
    assert _rel(end, final) < 1e-5


def test_generic_form_with_diagonal_weight(ssd):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 29, 2, 16, generator=gen)
    la = -torch.rand(2, 29, 2, generator=gen)
    w = torch.rand(2, 29, 2, generator=gen)
    e = torch.randn(2, 29, 2, generator=gen)
    B, C = torch.randn(2, 29, 1, 16, generator=gen), torch.randn(2, 29, 1, 16, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, la, w, e, B, C)]
    outs = []
    for fn in (ssd.ssd_generic_scan, ssd.ssd_generic_scan_ref):
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        y = fn(ins[0], ins[1], ins[2], ins[4], ins[5], 16, e=ins[3])
        grads = torch.autograd.grad((y * torch.cos(y)).sum(), ins)
        outs.append([y, *grads])
    for got, ref in zip(*outs):
        assert _rel(got, ref) < 2e-5


def test_reference_gradcheck_float64(ssd):
    inp = _inputs(1, 5, 2, 3, 1, 2, torch.float64)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "h0")
    leaves = [inp[n].double().requires_grad_() for n in names]

    def f(x, dt, A, B, C, D, z, dt_bias, h0):
        y, final = ssd.ssd_scan_ref(x, dt, A, B, C, 4, D, z, dt_bias, True, h0, True)
        return y, final

    assert torch.autograd.gradcheck(f, leaves)


def test_bad_shapes_raise_clear_errors(ssd):
    inp = _inputs(1, 8, 4, 16, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd.ssd_scan(
            inp["x"],
            inp["dt"],
            inp["A"],
            inp["B"][:, :, :1].expand(1, 8, 3, 16),
            inp["C"][:, :, :1].expand(1, 8, 3, 16),
        )
    with pytest.raises(ValueError, match="chunk_size"):
        ssd.ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=48)
    with pytest.raises(ValueError, match="dt/la"):
        ssd.ssd_scan(inp["x"], inp["dt"][:, :4], inp["A"], inp["B"], inp["C"])
    with pytest.raises(ValueError, match="up to 256"):  # the kernels' tensor-descriptor blocks
        ssd.ssd_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=512)


def test_under_torch_compile(ssd):
    inp = _inputs(1, 20, 2, 16, 1, 16, torch.float32)

    def layer(x, dt, A, B, C):
        return torch.tanh(ssd.ssd_scan(x * 2.0, dt, A, B, C, 16)).sum()

    compiled = torch.compile(layer, backend="eager", fullgraph=False)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    assert abs(compiled(*args).item() - layer(*args).item()) < 1e-4


def _scan_inputs(bsz, seqlen, nheads, hdim, dstate, dtype, ngroups=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    groups = ngroups or nheads
    return {
        "x": rnd(bsz, seqlen, nheads, hdim),
        "la": -torch.rand(bsz, seqlen, nheads, generator=gen, dtype=torch.float64).to(dtype),
        "w": torch.rand(bsz, seqlen, nheads, generator=gen, dtype=torch.float64).to(dtype),
        "e": rnd(bsz, seqlen, nheads),
        "B": rnd(bsz, seqlen, groups, dstate),
        "C": rnd(bsz, seqlen, groups, dstate),
        "D": rnd(nheads).float(),
        "Dm": rnd(nheads, hdim).float(),
        "z": rnd(bsz, seqlen, nheads, hdim),
        "h0": rnd(bsz, nheads, hdim, dstate).float(),
    }


def _run_generic(fn, inp, opts, chunk, with_final, cast=None, shift=()):
    """The generic scan with the inputs named in opts ("e", "D" or "Dm", "z", "h0"); gradients of every
    input, with a fixed random cotangent on y and, with_final, on the final state. The inputs named in shift are
    passed as contiguous views starting one element into a larger leaf (a base off 16-byte alignment)."""
    names = ["x", "la", "w", "B", "C"] + [k for k in ("e", "D", "Dm", "z", "h0") if k in opts]
    leaves = {k: (inp[k].to(cast) if cast else inp[k]).clone().requires_grad_() for k in names}
    args = dict(leaves)
    for k in shift:
        flat = torch.cat((leaves[k].detach().new_zeros(1), leaves[k].detach().flatten()))
        leaves[k] = flat.requires_grad_()
        args[k] = flat[1:].view(inp[k].shape)
        assert args[k].is_contiguous() and args[k].data_ptr() % 16
    kw = {k: args[k] for k in ("e", "z", "h0") if k in args}
    if "D" in args or "Dm" in args:
        kw["D"] = args["D" if "D" in args else "Dm"]
    out = fn(args["x"], args["la"], args["w"], args["B"], args["C"], chunk, return_final_state=with_final,
             **kw)  # fmt: skip
    y, final = out if with_final else (out, None)
    gen = torch.Generator().manual_seed(7)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    if final is not None:
        loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    grads = [g[1:].view(inp[n].shape) if n in shift else g for n, g in zip(names, grads)]
    res = {"y": y} | ({"final": final} if final is not None else {})
    return res | {f"d{n}": g for n, g in zip(names, grads)}


def _count(ssd, monkeypatch, name: str, record=lambda *args, **kwargs: 1) -> list:
    """Calls of the module function `name` (so a test can assert that it ran, or that it did not), each as what
    `record` makes of the call's arguments."""
    calls = []
    original = getattr(ssd, name)

    def counted(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(ssd, name, counted)
    return calls


def _dtype_of(inp: dict, name: str) -> torch.dtype:
    """The dtype a result of `_run` / `_run_generic` must have: y its x's, the final state fp32, d<k> its input's."""
    return torch.float32 if name == "final" else inp["x" if name == "y" else name[1:]].dtype


def _count_bwd(ssd, monkeypatch) -> tuple:
    """Calls of the backward (`_ssd_bwd`, which every Triton backward runs) and of its zero-padded copies."""
    return _count(ssd, monkeypatch, "_ssd_bwd"), _count(ssd, monkeypatch, "_ssd_bwd_padded")


BWD_GENERIC_CASES = [
    # seqlen, chunk, heads, headdim, dstate, options, with_final
    (37, 16, 2, 16, 16, ("e", "D", "z", "h0"), True),  # partial last chunk, every option
    (11, 16, 3, 16, 32, (), False),  # shorter than a chunk, no option
    (50, 16, 2, 32, 16, ("e", "Dm", "h0"), False),  # D per (head, column), no gate
    (32, 16, 4, 16, 16, ("D", "z"), True),  # whole chunks, no e, no h0
    (40, 32, 2, 24, 20, ("e", "z"), True),  # P, N not powers of two (descriptor blocks padded)
]


@pytest.mark.parametrize(
    "case", BWD_GENERIC_CASES, ids=[f"T{c[0]}_Q{c[1]}_H{c[2]}P{c[3]}N{c[4]}" for c in BWD_GENERIC_CASES]
)
def test_backward_generic_matches_reference(ssd, case, monkeypatch):
    """The backward of the generic form with per-head B and C (G == H; the pre-rotated Mamba-3 call) against the
    float64 reference, gradients of every input in the inputs' dtypes."""
    seqlen, chunk, nheads, hdim, dstate, opts, with_final = case
    inp = _scan_inputs(2, seqlen, nheads, hdim, dstate, torch.float32, seed=seqlen)
    calls, pads = _count_bwd(ssd, monkeypatch)
    got = _run_generic(ssd.ssd_generic_scan, inp, opts, chunk, with_final)
    assert calls and not pads, "the backward did not run on the inputs themselves"
    ref = _run_generic(ssd.ssd_generic_scan_ref, inp, opts, chunk, with_final, cast=torch.float64)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == _dtype_of(inp, name), name
        assert _rel(got[name], ref[name]) < 2e-5, name


def test_backward_generic_bf16_inputs(ssd, monkeypatch):
    inp = _scan_inputs(2, 45, 2, 16, 16, torch.bfloat16, seed=3)
    opts = ("e", "D", "z", "h0")
    calls, pads = _count_bwd(ssd, monkeypatch)
    got = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True)
    assert calls and not pads
    ref = _run_generic(ssd.ssd_generic_scan_ref, inp, opts, 16, True, cast=torch.float64)
    assert got["dx"].dtype == got["dB"].dtype == torch.bfloat16
    for name in ref:
        assert _rel(got[name], ref[name]) < 2e-2, name


@pytest.mark.parametrize("groups", [1, 2])
def test_backward_generic_shared_rows(ssd, monkeypatch, groups):
    """The generic form with a group's B and C rows shared by its heads (G < H; sums of dB and dC over them) against
    the float64 reference."""
    inp = _scan_inputs(2, 37, 4, 16, 16, torch.float32, ngroups=groups, seed=11)
    opts = ("e", "D", "z", "h0")
    calls, pads = _count_bwd(ssd, monkeypatch)
    got = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True)
    assert calls and not pads
    ref = _run_generic(ssd.ssd_generic_scan_ref, inp, opts, 16, True, cast=torch.float64)
    for name in ref:
        assert got[name].dtype == _dtype_of(inp, name), name
        assert _rel(got[name], ref[name]) < 2e-5, name


def _check_ssd_bwd(ssd, monkeypatch, inp, opts, chunk, softplus, with_final, tol, padded=False):
    """Mamba-2's form (ssd_scan) against the float64 reference: outputs and the gradient of every input given, in the
    inputs' shapes and dtypes; the backward ran through the zero-padded copies exactly when `padded`."""
    calls, pads = _count_bwd(ssd, monkeypatch)
    got = _run(functools.partial(ssd.ssd_scan, dt_softplus=softplus), inp, opts, chunk, with_final)
    assert calls, "the backward did not run"
    assert bool(pads) == padded, "the padded copies were " + ("skipped" if padded else "made")
    data = {k: v.double() for k, v in inp.items()}
    ref = _run(functools.partial(ssd.ssd_scan_ref, dt_softplus=softplus), data, opts, chunk, with_final)
    expected = {"y", "dx", "ddt", "dA", "dB", "dC"} | {f"d{k}" for k in opts} | ({"final"} if with_final else set())
    assert got.keys() == ref.keys() == expected
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == _dtype_of(inp, name), name
        assert _rel(got[name], ref[name]) < tol, name


SSD_BWD_CASES = [
    # seqlen, chunk, heads, groups, headdim, dstate, options, softplus, D: "head" / "col" / None, with_final
    (37, 16, 4, 1, 16, 16, ("D", "z", "dt_bias", "h0"), True, "head", True),  # Mamba-2: one group, partial chunk
    (40, 16, 4, 2, 16, 16, ("D", "dt_bias", "h0"), False, "col", True),  # 1 < G < H, no softplus, D per column
    (21, 16, 2, 2, 32, 16, ("z",), True, None, False),  # G == H (plain dB/dC stores), no D
    (50, 16, 4, 1, 24, 20, ("D", "z"), False, "head", True),  # P, N not powers of two, no dt_bias
    (11, 32, 3, 1, 16, 16, ("dt_bias",), True, None, True),  # shorter than a chunk, three heads in the group
    (64, 32, 4, 2, 16, 16, ("D", "z", "dt_bias", "h0"), True, "col", False),  # whole chunks, no final-state loss
]


def _ssd_case_inputs(case, dtype=torch.float32):
    seqlen, chunk, nheads, groups, hdim, dstate, opts, softplus, d_kind, with_final = case
    inp = _inputs(2, seqlen, nheads, hdim, groups, dstate, dtype, seed=seqlen)
    if not softplus:
        inp["dt"] = inp["dt"].abs() * 0.2
    if d_kind == "col":
        inp["D"] = torch.randn(nheads, hdim, generator=torch.Generator().manual_seed(1))
    return inp


@pytest.mark.parametrize(
    "case", SSD_BWD_CASES, ids=[f"T{c[0]}_H{c[2]}G{c[3]}_sp{int(c[7])}_D{c[8]}" for c in SSD_BWD_CASES]
)
def test_backward_ssd_form(ssd, case, monkeypatch):
    """Mamba-2's gates (dt after bias and softplus, A) and shared group rows in the backward's loop, fp32."""
    seqlen, chunk, _, _, _, _, opts, softplus, _, with_final = case
    _check_ssd_bwd(ssd, monkeypatch, _ssd_case_inputs(case), opts, chunk, softplus, with_final, 2e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_backward_ssd_form_bf16(ssd, groups, monkeypatch):
    """bf16 inputs: dB and dC summed over a group's heads in fp32 and returned in B's dtype."""
    inp = _inputs(2, 45, 4, 32, groups, 16, torch.bfloat16, seed=4 + groups)
    _check_ssd_bwd(ssd, monkeypatch, inp, ("D", "z", "dt_bias", "h0"), 16, True, True, 2e-2)


def test_backward_ssd_softplus_passthrough(ssd, monkeypatch):
    """dt_raw + dt_bias above 20 (softplus passes it through, d dt / d raw = 1) beside ordinary values."""
    inp = _inputs(1, 30, 2, 16, 1, 16, torch.float32, seed=8)
    inp["dt"][:, ::3] += 25.0
    inp["A"] = inp["A"] * 1e-3  # decays exp(dt A) that do not vanish at dt ~ 25
    _check_ssd_bwd(ssd, monkeypatch, inp, ("dt_bias", "D"), 16, True, True, 2e-5)


SSD_BWD_PADDED_CASES = [
    # as SSD_BWD_CASES, and the dtype
    (37, 16, 4, 1, 16, 18, ("D", "z", "dt_bias", "h0"), True, "head", True, torch.float32),  # N x 4 = 72 bytes
    (33, 16, 4, 2, 16, 12, ("D", "z", "h0"), True, "col", True, torch.bfloat16),  # N x 2 = 24 bytes, 1 < G < H
    (29, 16, 2, 1, 20, 16, ("D", "z", "dt_bias"), False, "head", True, torch.bfloat16),  # P x 2 = 40 bytes
    (21, 16, 2, 2, 18, 16, ("D", "h0"), True, "col", False, torch.float32),  # P x 4 = 72: also the states' rows
]


@pytest.mark.parametrize(
    "case", SSD_BWD_PADDED_CASES, ids=[f"P{c[4]}N{c[5]}G{c[3]}_{str(c[10])[6:]}" for c in SSD_BWD_PADDED_CASES]
)
def test_backward_ssd_form_pads_unaligned_rows(ssd, case, monkeypatch):
    """Rows the tensor descriptors cannot take: Mamba-2's backward (group sums of dB, dC included) on zero-padded
    copies of its inputs and of the chunk states, every gradient cut back to its input's shape and dtype."""
    seqlen, chunk, _, _, _, _, opts, softplus, _, with_final, dtype = case
    inp = _ssd_case_inputs(case[:10], dtype)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    _check_ssd_bwd(ssd, monkeypatch, inp, opts, chunk, softplus, with_final, tol, padded=True)


def test_backward_pads_an_unaligned_output_gradient(ssd, monkeypatch):
    """The op's backward alone, given an output gradient whose storage starts one element past a 16-byte boundary
    (rows aligned, base not; the forward's tensors all aligned): the padded copies run and give exactly the
    gradients of the aligned call."""
    inp = _inputs(2, 37, 4, 16, 1, 16, torch.float32, seed=2)
    args = [inp["x"], inp["dt"], inp["A"], inp["dt_bias"], None, None, None, inp["B"], inp["C"], inp["D"], inp["z"],
            inp["h0"]]  # fmt: skip
    _, _, ckpt, yp = ssd._ssd_scan_impl(*args, 16, True, False, False, True)
    dy = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(3))
    shifted = torch.cat((dy.new_zeros(1), dy.flatten()))[1:].view(dy.shape)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16
    calls, pads = _count_bwd(ssd, monkeypatch)
    want = ssd._ssd_scan_bwd_impl(*args, ckpt, yp, dy, None, 16, True, False)
    assert calls and not pads
    got = ssd._ssd_scan_bwd_impl(*args, ckpt, yp, shifted, None, 16, True, False)
    assert pads, "the padded copies were skipped"
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)


def test_backward_bc_reduction_choice(ssd, monkeypatch):
    """Under the interpreter the group's dB, dC sums take pointer atomics (it runs no descriptor atomic_add); on the
    GPU a TMA reduce-add unless SSD_TUNING["bwd"]["red"] = "ptr"."""
    assert ssd._ssd_bc_red() == 2
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ssd._ssd_bc_red() == 1
    monkeypatch.setitem(ssd.SSD_TUNING, "bwd", {"red": "ptr"})
    assert ssd._ssd_bc_red() == 2


@pytest.mark.parametrize("dstate", [16, 18], ids=["aligned", "padded"])
def test_backward_from_the_final_state_alone(ssd, monkeypatch, dstate):
    """A loss on the final state only: the op's backward gets no output gradient (autograd does not fill zeros for
    unused outputs) and must still give every input's gradient, directly and through the padded copies."""
    inp = _scan_inputs(1, 40, 2, 16, dstate, torch.float32, seed=5)
    calls, pads = _count_bwd(ssd, monkeypatch)
    outs = []
    for fn in (ssd.ssd_generic_scan, ssd.ssd_generic_scan_ref):
        leaves = [inp[k].clone().requires_grad_() for k in ("x", "la", "w", "B", "C", "e", "h0")]
        x, la, w, B, C, e, h0 = leaves
        _, final = fn(x, la, w, B, C, 16, e=e, h0=h0, return_final_state=True)
        grads = torch.autograd.grad((final * final).sum(), leaves, allow_unused=True)
        outs.append([g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)])  # C: no path
    assert calls and bool(pads) == (dstate == 18)
    for got, ref in zip(*outs):
        assert torch.allclose(got.double(), ref.double(), rtol=2e-5, atol=1e-6)


def _check_fwd(ssd, monkeypatch, run, inp, tol, padded=False):
    """run(ref) with the forward (which every Triton call takes; it and the backward through the zero-padded
    copies exactly when `padded`) against the float64 reference (ref=True): outputs and every input's gradient, in
    the inputs' dtypes."""
    calls = _count(ssd, monkeypatch, "_ssd_fwd")
    pads = _count(ssd, monkeypatch, "_ssd_fwd_padded")
    bwd_calls, bwd_pads = _count_bwd(ssd, monkeypatch)
    got = run(False)
    assert calls and bwd_calls, "the forward or the backward did not run"
    assert bool(pads) == bool(bwd_pads) == padded, "the padded copies were " + ("skipped" if padded else "made")
    ref = run(True)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == _dtype_of(inp, name), name
        assert _rel(got[name], ref[name]) < tol, name


FFWD_GENERIC_CASES = [
    # seqlen, chunk, heads, groups, headdim, dstate, options, with_final
    (37, 16, 4, 4, 16, 16, ("e", "D", "z", "h0"), True),  # per-head rows (Mamba-3), every option
    (50, 16, 2, 1, 32, 16, ("Dm", "h0"), True),  # shared rows, no e, D per column
    (29, 16, 4, 2, 24, 20, ("e", "z"), False),  # 1 < G < H, P and N not powers of two, no final
    (11, 32, 3, 3, 16, 32, (), True),  # shorter than a chunk, no option
]


FFWD_GENERIC_IDS = [f"T{c[0]}_H{c[2]}G{c[3]}P{c[4]}N{c[5]}" for c in FFWD_GENERIC_CASES]


@pytest.mark.parametrize("case", FFWD_GENERIC_CASES, ids=FFWD_GENERIC_IDS)
def test_forward_generic(ssd, case, monkeypatch):
    """The forward of the generic form against the float64 reference, with the gradients of every input
    (the backward reads the states it stores)."""
    seqlen, chunk, nheads, groups, hdim, dstate, opts, with_final = case
    inp = _scan_inputs(2, seqlen, nheads, hdim, dstate, torch.float32, ngroups=groups, seed=seqlen)

    def run(ref):
        if ref:
            return _run_generic(ssd.ssd_generic_scan_ref, inp, opts, chunk, with_final, cast=torch.float64)
        return _run_generic(ssd.ssd_generic_scan, inp, opts, chunk, with_final)

    _check_fwd(ssd, monkeypatch, run, inp, 2e-5)


FFWD_SSD_CASES = [
    # seqlen, chunk, heads, groups, headdim, dstate, options, softplus, matrix D
    (37, 16, 4, 1, 16, 16, ("D", "z", "dt_bias", "h0"), True, False),  # Mamba-2: one shared group
    (40, 16, 4, 2, 16, 16, ("D", "h0"), False, True),  # 1 < G < H, no softplus, D per column
    (21, 16, 2, 2, 32, 16, ("z",), True, False),  # G == H
]


def _ssd_form_run(ssd, inp, opts, chunk, softplus):
    def run(ref):
        data = {k: v.double() for k, v in inp.items()} if ref else inp
        fn = ssd.ssd_scan_ref if ref else ssd.ssd_scan
        return _run(functools.partial(fn, dt_softplus=softplus), data, opts, chunk, with_final=True)

    return run


@pytest.mark.parametrize("case", FFWD_SSD_CASES, ids=[f"T{c[0]}_H{c[2]}G{c[3]}_sp{int(c[7])}" for c in FFWD_SSD_CASES])
def test_forward_ssd_form(ssd, case, monkeypatch):
    """The forward of the Mamba-2 form (dt, A, dt_bias, softplus) against the float64 reference, final
    state and gradients included."""
    seqlen, chunk, nheads, groups, hdim, dstate, opts, softplus, d_matrix = case
    inp = _inputs(2, seqlen, nheads, hdim, groups, dstate, torch.float32, seed=seqlen)
    if not softplus:
        inp["dt"] = inp["dt"].abs() * 0.2
    if d_matrix:
        inp["D"] = torch.randn(nheads, hdim, generator=torch.Generator().manual_seed(1))
    _check_fwd(ssd, monkeypatch, _ssd_form_run(ssd, inp, opts, chunk, softplus), inp, 2e-5)


@pytest.mark.parametrize("form", ["generic", "ssd"])
def test_forward_bf16(ssd, form, monkeypatch):
    """bf16 inputs: Mamba-3's call (per-head rows, e, per-head D, z, h0) and Mamba-2's (one group, dt_bias)."""
    if form == "generic":
        inp = _scan_inputs(2, 45, 2, 32, 16, torch.bfloat16, seed=3)

        def run(ref):
            fn = ssd.ssd_generic_scan_ref if ref else ssd.ssd_generic_scan
            return _run_generic(fn, inp, ("e", "D", "z", "h0"), 16, True, cast=torch.float64 if ref else None)

    else:
        inp = _inputs(2, 45, 2, 32, 1, 16, torch.bfloat16, seed=4)
        run = _ssd_form_run(ssd, inp, ("D", "z", "dt_bias", "h0"), 16, True)
    _check_fwd(ssd, monkeypatch, run, inp, 2e-2)


def _f64(v):
    return v.double() if torch.is_tensor(v) else v


@pytest.mark.parametrize("dstate", [16, 18], ids=["aligned", "padded"])
def test_forward_without_grad(ssd, monkeypatch, dstate):
    """Without autograd the forward stores no chunk states and no output before the gate (directly, and
    through the padded copies); the outputs still match the float64 reference."""
    inp = _scan_inputs(1, 40, 2, 16, dstate, torch.float32, seed=9)
    args = [inp[k] for k in ("x", "la", "w", "B", "C")]
    kw = {"e": inp["e"], "D": inp["D"], "z": inp["z"], "h0": inp["h0"], "return_final_state": True}
    calls = _count(ssd, monkeypatch, "_ssd_fwd")
    pads = _count(ssd, monkeypatch, "_ssd_fwd_padded")
    with torch.no_grad():
        got = ssd.ssd_generic_scan(*args, 16, **kw)
    assert calls and bool(pads) == (dstate == 18)
    ref = ssd.ssd_generic_scan_ref(*(t.double() for t in args), 16, **{k: _f64(v) for k, v in kw.items()})
    for g, r in zip(got, ref):
        assert _rel(g, r) < 2e-5


FFWD_PADDED_CASES = [
    # seqlen, chunk, heads, groups, headdim, dstate, dtype, options
    (21, 16, 2, 2, 16, 18, torch.float32, ("e", "D", "z", "h0")),  # N x 4 bytes = 72: B, C rows padded to 20
    (21, 16, 2, 1, 16, 18, torch.float32, ("Dm", "z", "h0")),  # the same with one shared group, D per column
    (33, 16, 2, 2, 32, 12, torch.bfloat16, ("e", "D", "z", "h0")),  # N x 2 bytes = 24: padded to 16
    (33, 16, 2, 2, 20, 16, torch.bfloat16, ("e", "Dm", "z", "h0")),  # P x 2 bytes = 40: x, z, y rows padded to 24
    (37, 16, 2, 2, 18, 16, torch.float32, ("e", "D", "z", "h0")),  # P x 4 bytes = 72: also the states' rows
]


@pytest.mark.parametrize(
    "case", FFWD_PADDED_CASES, ids=[f"P{c[4]}N{c[5]}G{c[3]}_{str(c[6])[6:]}" for c in FFWD_PADDED_CASES]
)
def test_forward_pads_unaligned_rows(ssd, monkeypatch, case):
    """Rows the tensor descriptors cannot take (P or N times the element size not a multiple of 16 bytes) run the
    one-pass forward and the backward on zero-padded copies (the backward padding the states the forward copied back
    out); outputs, final state and every gradient against the float64 reference."""
    seqlen, chunk, nheads, groups, hdim, dstate, dtype, opts = case
    inp = _scan_inputs(2, seqlen, nheads, hdim, dstate, dtype, ngroups=groups, seed=seqlen + hdim)

    def run(ref):
        fn = ssd.ssd_generic_scan_ref if ref else ssd.ssd_generic_scan
        return _run_generic(fn, inp, opts, chunk, True, cast=torch.float64 if ref else None)

    _check_fwd(ssd, monkeypatch, run, inp, 2e-5 if dtype == torch.float32 else 2e-2, padded=True)


@pytest.mark.parametrize("shifted", [("x",), ("B", "z")])
def test_forward_pads_unaligned_bases(ssd, monkeypatch, shifted):
    """Contiguous inputs whose storage starts one element past a 16-byte boundary (rows aligned, base not) run
    through the padded copies too, forward and backward; gradients included."""
    inp = _scan_inputs(2, 37, 2, 16, 16, torch.float32, seed=11)
    opts = ("e", "D", "z", "h0")

    def run(ref):
        if ref:
            return _run_generic(ssd.ssd_generic_scan_ref, inp, opts, 16, True, cast=torch.float64)
        return _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True, shift=shifted)

    _check_fwd(ssd, monkeypatch, run, inp, 2e-5, padded=True)


def test_launch_options(ssd, monkeypatch):
    """Two stages for both loops where the tiles fit (bf16 dots, chunks below 128); the register cap of 168 only for
    the lean forward (three programs per SM); a tuned option overrides the defaults, except where tiles are wide."""
    import triton.language as tl

    base = {"num_warps": 4, "num_stages": 2}
    assert ssd._ssd_launch("bwd", 64, tl.bfloat16) == base
    assert ssd._ssd_launch("fwd", 64, tl.bfloat16) == base
    assert ssd._ssd_launch("bwd", 64, tl.bfloat16, lean=True) == base
    assert ssd._ssd_launch("fwd", 64, tl.bfloat16, lean=True) == base | {"maxnreg": 168}
    for q, dot in ((128, tl.bfloat16), (64, tl.float32)):
        assert ssd._ssd_launch("fwd", q, dot, lean=True) == {"num_warps": 4, "num_stages": 1}
    monkeypatch.setitem(ssd.SSD_TUNING, "fwd", {"maxnreg": 200, "num_stages": 3})
    assert ssd._ssd_launch("fwd", 64, tl.bfloat16, lean=True) == {"num_warps": 4, "num_stages": 3, "maxnreg": 200}
    assert ssd._ssd_launch("fwd", 128, tl.bfloat16, lean=True) == {"num_warps": 4, "num_stages": 1}


def test_forward_is_lean_only_for_the_ungated_mamba2_form(ssd, monkeypatch):
    """Which calls the forward launches as lean: Mamba-2's form without z at chunk, P, N <= 64; not with z, not the
    generic (Mamba-3) form, not at chunk 128."""
    seen = _count(ssd, monkeypatch, "_ssd_launch", lambda kind, *_, lean=False: (kind, lean))
    inp = _scan_inputs(1, 40, 2, 16, 16, torch.float32, seed=9)
    x, B, C = inp["x"], inp["B"], inp["C"]
    dt = torch.rand(1, 40, 2)
    A = -torch.rand(2) - 0.5
    with torch.no_grad():
        ssd.ssd_scan(x, dt, A, B, C, 32)
        ssd.ssd_scan(x, dt, A, B, C, 32, z=torch.randn_like(x))
        ssd.ssd_scan(x, dt, A, B, C, 128)
        ssd.ssd_generic_scan(x, -dt, dt, B, C, 32)
    assert [lean for kind, lean in seen if kind == "fwd"] == [True, False, False, False]


def _strided_run(ssd, wide_cols, d_per_head, dtype=torch.float32, seed=21):
    """y and the gradients of the generic form with x and z taken as slices of one wider (B, T, wide_cols) tensor,
    as Mamba-3's x and z come out of its input projection, and the same from contiguous copies."""
    bsz, seqlen, nheads, hdim, dstate = 2, 37, 2, 16, 16
    inp = _scan_inputs(bsz, seqlen, nheads, hdim, dstate, dtype, seed=seed)
    inner = nheads * hdim
    gen = torch.Generator().manual_seed(seed + 1)
    wide = torch.randn(bsz, seqlen, wide_cols, generator=gen, dtype=torch.float64).to(dtype)
    cot = torch.randn(bsz, seqlen, nheads, hdim, generator=gen, dtype=torch.float64).to(dtype)
    D = inp["D"] if d_per_head else inp["Dm"]
    results = []
    for in_place in (True, False):
        w_leaf = wide.clone().requires_grad_()
        z = w_leaf[..., :inner].reshape(bsz, seqlen, nheads, hdim)
        x = w_leaf[..., inner : 2 * inner].reshape(bsz, seqlen, nheads, hdim)
        if not in_place:
            x, z = x.contiguous(), z.contiguous()
        others = {k: inp[k].clone().requires_grad_() for k in ("la", "w", "e", "B", "C")}
        d = D.clone().requires_grad_()
        y = ssd.ssd_generic_scan(x, others["la"], others["w"], others["B"], others["C"], 16, e=others["e"], D=d, z=z)
        (y.double() * cot.double()).sum().backward()
        results.append([y.detach(), w_leaf.grad, d.grad] + [others[k].grad for k in ("la", "w", "e", "B", "C")])
    return results


@pytest.mark.parametrize("d_per_head", [True, False])
def test_strided_x_and_z_are_read_in_place(ssd, monkeypatch, d_per_head):
    """x and z as slices of a wider row (40 fp32 columns, 160 bytes; z from column 0, x from column 32) reach the
    kernels without a copy, forward and backward (the pre-pass reads z for the gate, and x for a per-column D), and
    give what contiguous copies give."""
    seen = {name: _count(ssd, monkeypatch, name, lambda x, *_: x.is_contiguous()) for name in ("_ssd_fwd", "_ssd_bwd")}
    strided, dense = _strided_run(ssd, 2 * 2 * 16 + 8, d_per_head)
    assert seen["_ssd_fwd"] == [False, True] and seen["_ssd_bwd"] == [False, True]
    for got, ref in zip(strided, dense):
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), _rel(got, ref)


def test_rows_that_descriptors_cannot_take_are_copied(ssd):
    """_ssd_rows keeps a tensor whose strides the tensor descriptors take and copies one they cannot: a row stride
    that is not a multiple of 16 bytes, a broadcast (stride 0) dimension, or a transposed last dimension; a
    contiguous tensor is passed as it is."""
    wide = torch.randn(2, 5, 40)
    aligned = wide[..., 8:24].reshape(2, 5, 2, 8)
    assert ssd._ssd_rows(aligned) is aligned and ssd._ssd_rows(wide) is wide
    for bad in (torch.randn(2, 5, 37)[..., :16].reshape(2, 5, 2, 8), torch.randn(2, 1, 1, 8).expand(2, 5, 2, 8),
                torch.randn(2, 5, 8, 2).transpose(-1, -2)):  # fmt: skip
        kept = ssd._ssd_rows(bad)
        assert kept is not bad and kept.is_contiguous() and torch.equal(kept, bad)
    assert ssd._ssd_rows(None) is None


def test_strided_rows_that_descriptors_cannot_take_still_match(ssd):
    """With a wider row of 37 fp32 columns (148 bytes, not a multiple of 16) x and z are copied, and the results
    are those of contiguous inputs."""
    strided, dense = _strided_run(ssd, 2 * 2 * 16 + 5, True)
    for got, ref in zip(strided, dense):
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), _rel(got, ref)
