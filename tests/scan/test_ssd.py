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


@pytest.mark.parametrize("heads", [1, 3])
def test_backward_with_head_blocks(ssd, heads, monkeypatch):
    """Several dB/dC programs per group (blocks of 1 or 3 of its 4 heads, the last block short): dB and dC are summed
    across them with atomics; a head dimension that is not a power of two."""
    monkeypatch.setitem(ssd.SSD_TUNING, "dbc", {"heads": heads})
    inp = _inputs(2, 37, 4, 40, 1, 16, torch.float32)
    got = _run(ssd.ssd_scan, inp, ("D", "z", "dt_bias", "h0"), 16, with_final=True)
    ref = _run(ssd.ssd_scan_ref, inp, ("D", "z", "dt_bias", "h0"), 16, with_final=True)
    for name in ref:
        assert _rel(got[name], ref[name]) < 2e-5, name


def _onepass_inputs(bsz, seqlen, nheads, hdim, dstate, dtype, ngroups=None, seed=0):
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


def _count_onepass(ssd, monkeypatch) -> list:
    calls = []
    original = ssd._ssd_bwd_onepass

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(ssd, "_ssd_bwd_onepass", counted)
    return calls


ONEPASS_CASES = [
    # seqlen, chunk, heads, headdim, dstate, options, with_final
    (37, 16, 2, 16, 16, ("e", "D", "z", "h0"), True),  # partial last chunk, every option
    (11, 16, 3, 16, 32, (), False),  # shorter than a chunk, no option
    (50, 16, 2, 32, 16, ("e", "Dm", "h0"), False),  # D per (head, column), no gate
    (32, 16, 4, 16, 16, ("D", "z"), True),  # whole chunks, no e, no h0
    (40, 32, 2, 24, 20, ("e", "z"), True),  # P, N not powers of two (descriptor blocks padded)
]


@pytest.mark.parametrize("case", ONEPASS_CASES, ids=[f"T{c[0]}_Q{c[1]}_H{c[2]}P{c[3]}N{c[4]}" for c in ONEPASS_CASES])
def test_onepass_backward_matches_split_and_reference(ssd, case, monkeypatch):
    """The one-pass backward (per-head B and C, G == H; the pre-rotated Mamba-3 call), the default there, against
    the split kernels (SSD_TUNING["fused"]["on"] = 0) and the float64 reference, gradients of every input."""
    seqlen, chunk, nheads, hdim, dstate, opts, with_final = case
    inp = _onepass_inputs(2, seqlen, nheads, hdim, dstate, torch.float32, seed=seqlen)
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 0})
    split = _run_generic(ssd.ssd_generic_scan, inp, opts, chunk, with_final)
    monkeypatch.delitem(ssd.SSD_TUNING, "fused")  # the default
    calls = _count_onepass(ssd, monkeypatch)
    got = _run_generic(ssd.ssd_generic_scan, inp, opts, chunk, with_final)
    assert calls, "the one-pass backward did not run"
    ref = _run_generic(ssd.ssd_generic_scan_ref, inp, opts, chunk, with_final, cast=torch.float64)
    assert got.keys() == ref.keys() == split.keys()
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == split[name].dtype, name
        assert _rel(got[name], ref[name]) < 2e-5, name
        assert _rel(got[name], split[name]) < 2e-5, name


def test_onepass_backward_bf16_inputs(ssd, monkeypatch):
    inp = _onepass_inputs(2, 45, 2, 16, 16, torch.bfloat16, seed=3)
    opts = ("e", "D", "z", "h0")
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 0})
    split = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True)
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 1})
    calls = _count_onepass(ssd, monkeypatch)
    got = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True)
    assert calls
    ref = _run_generic(ssd.ssd_generic_scan_ref, inp, opts, 16, True, cast=torch.float64)
    assert got["dx"].dtype == got["dB"].dtype == torch.bfloat16
    for name in ref:
        assert _rel(got[name], ref[name]) < 2e-2, name
        assert _rel(got[name], split[name]) < 2e-2, name


def test_onepass_backward_refuses_unaligned_rows(ssd, monkeypatch):
    """Rows the tensor descriptors cannot take (N x 4 bytes not a multiple of 16) keep the split kernels even with
    SSD_TUNING["fused"]["on"] set (shared group rows, G < H, no longer do: see the tests below)."""
    inp = _onepass_inputs(1, 21, 2, 16, 18, torch.float32, ngroups=1)
    opts = ("e", "z")
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 0})
    split = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, False)
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 1})
    calls = _count_onepass(ssd, monkeypatch)
    got = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, False)
    assert not calls
    for name in split:
        assert torch.equal(got[name], split[name]), name


@pytest.mark.parametrize("groups", [1, 2])
def test_onepass_backward_generic_shared_rows(ssd, monkeypatch, groups):
    """The generic form with a group's B and C rows shared by its heads (G < H; sums of dB and dC over them) through
    the one-pass backward against the split kernels and the float64 reference."""
    inp = _onepass_inputs(2, 37, 4, 16, 16, torch.float32, ngroups=groups, seed=11)
    opts = ("e", "D", "z", "h0")
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 0})
    split = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True)
    monkeypatch.delitem(ssd.SSD_TUNING, "fused")
    calls = _count_onepass(ssd, monkeypatch)
    got = _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True)
    assert calls, "the one-pass backward did not run"
    ref = _run_generic(ssd.ssd_generic_scan_ref, inp, opts, 16, True, cast=torch.float64)
    for name in ref:
        assert got[name].dtype == split[name].dtype, name
        assert _rel(got[name], ref[name]) < 2e-5, name
        assert _rel(got[name], split[name]) < 2e-5, name


def _check_ssd_onepass(ssd, monkeypatch, inp, opts, chunk, softplus, with_final, tol):
    """Mamba-2's form (ssd_scan) through the one-pass backward (the default) against the split backward
    (SSD_TUNING["fused"]["on"] = 0) and the float64 reference: outputs and the gradient of every input given."""
    run = functools.partial(_run, functools.partial(ssd.ssd_scan, dt_softplus=softplus), inp, opts, chunk, with_final)
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 0})
    calls = _count_onepass(ssd, monkeypatch)
    split = run()
    assert not calls, "the split backward was asked for"
    monkeypatch.delitem(ssd.SSD_TUNING, "fused")  # the default
    got = run()
    assert calls, "the one-pass backward did not run"
    data = {k: v.double() for k, v in inp.items()}
    ref = _run(functools.partial(ssd.ssd_scan_ref, dt_softplus=softplus), data, opts, chunk, with_final)
    expected = {"y", "dx", "ddt", "dA", "dB", "dC"} | {f"d{k}" for k in opts} | ({"final"} if with_final else set())
    assert got.keys() == ref.keys() == split.keys() == expected
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == split[name].dtype, name
        assert _rel(got[name], ref[name]) < tol, name
        assert _rel(got[name], split[name]) < tol, name


SSD_ONEPASS_CASES = [
    # seqlen, chunk, heads, groups, headdim, dstate, options, softplus, D: "head" / "col" / None, with_final
    (37, 16, 4, 1, 16, 16, ("D", "z", "dt_bias", "h0"), True, "head", True),  # Mamba-2: one group, partial chunk
    (40, 16, 4, 2, 16, 16, ("D", "dt_bias", "h0"), False, "col", True),  # 1 < G < H, no softplus, D per column
    (21, 16, 2, 2, 32, 16, ("z",), True, None, False),  # G == H (plain dB/dC stores), no D
    (50, 16, 4, 1, 24, 20, ("D", "z"), False, "head", True),  # P, N not powers of two, no dt_bias
    (11, 32, 3, 1, 16, 16, ("dt_bias",), True, None, True),  # shorter than a chunk, three heads in the group
    (64, 32, 4, 2, 16, 16, ("D", "z", "dt_bias", "h0"), True, "col", False),  # whole chunks, no final-state loss
]


@pytest.mark.parametrize(
    "case", SSD_ONEPASS_CASES, ids=[f"T{c[0]}_H{c[2]}G{c[3]}_sp{int(c[7])}_D{c[8]}" for c in SSD_ONEPASS_CASES]
)
def test_onepass_backward_ssd_form(ssd, case, monkeypatch):
    """Mamba-2's gates (dt after bias and softplus, A) and shared group rows in the one-pass loop, fp32."""
    seqlen, chunk, nheads, groups, hdim, dstate, opts, softplus, d_kind, with_final = case
    inp = _inputs(2, seqlen, nheads, hdim, groups, dstate, torch.float32, seed=seqlen)
    if not softplus:
        inp["dt"] = inp["dt"].abs() * 0.2
    if d_kind == "col":
        inp["D"] = torch.randn(nheads, hdim, generator=torch.Generator().manual_seed(1))
    _check_ssd_onepass(ssd, monkeypatch, inp, opts, chunk, softplus, with_final, 2e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_onepass_backward_ssd_form_bf16(ssd, groups, monkeypatch):
    """bf16 inputs: dB and dC summed over a group's heads in fp32 and returned in B's dtype."""
    inp = _inputs(2, 45, 4, 32, groups, 16, torch.bfloat16, seed=4 + groups)
    _check_ssd_onepass(ssd, monkeypatch, inp, ("D", "z", "dt_bias", "h0"), 16, True, True, 2e-2)


def test_onepass_backward_ssd_softplus_passthrough(ssd, monkeypatch):
    """dt_raw + dt_bias above 20 (softplus passes it through, d dt / d raw = 1) beside ordinary values."""
    inp = _inputs(1, 30, 2, 16, 1, 16, torch.float32, seed=8)
    inp["dt"][:, ::3] += 25.0
    inp["A"] = inp["A"] * 1e-3  # decays exp(dt A) that do not vanish at dt ~ 25
    _check_ssd_onepass(ssd, monkeypatch, inp, ("dt_bias", "D"), 16, True, True, 2e-5)


def test_onepass_backward_bc_reduction_choice(ssd, monkeypatch):
    """Under the interpreter the group's dB, dC sums take pointer atomics (it runs no descriptor atomic_add); on the
    GPU a TMA reduce-add unless SSD_TUNING["fused"]["red"] = "ptr"."""
    assert ssd._ssd_bc_red() == 2
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ssd._ssd_bc_red() == 1
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": 1, "red": "ptr"})
    assert ssd._ssd_bc_red() == 2


@pytest.mark.parametrize("onepass", [0, 1])
def test_backward_from_the_final_state_alone(ssd, monkeypatch, onepass):
    """A loss on the final state only: the op's backward gets no output gradient (autograd does not fill zeros for
    unused outputs) and must still give every input's gradient, split and one-pass."""
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": onepass})
    inp = _onepass_inputs(1, 40, 2, 16, 16, torch.float32, seed=5)
    outs = []
    for fn in (ssd.ssd_generic_scan, ssd.ssd_generic_scan_ref):
        leaves = [inp[k].clone().requires_grad_() for k in ("x", "la", "w", "B", "C", "e", "h0")]
        x, la, w, B, C, e, h0 = leaves
        _, final = fn(x, la, w, B, C, 16, e=e, h0=h0, return_final_state=True)
        grads = torch.autograd.grad((final * final).sum(), leaves, allow_unused=True)
        outs.append([g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)])  # C: no path
    for got, ref in zip(*outs):
        assert torch.allclose(got.double(), ref.double(), rtol=2e-5, atol=1e-6)


def _count(ssd, monkeypatch, name: str) -> list:
    """Calls of the module function `name` (so a test can assert that it ran, or that it did not)."""
    calls = []
    original = getattr(ssd, name)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(ssd, name, counted)
    return calls


def _check_fwd(ssd, monkeypatch, run, inp, tol, padded=False):
    """run(ref) with the one-pass forward (which every Triton call takes; through the zero-padded copies exactly when
    `padded`) against the float64 reference (ref=True): outputs and every input's gradient, in the inputs' dtypes."""
    calls = _count(ssd, monkeypatch, "_ssd_fwd_onepass")
    pads = _count(ssd, monkeypatch, "_ssd_fwd_padded")
    got = run(False)
    assert calls, "the one-pass forward did not run"
    assert bool(pads) == padded, "the padded copies were " + ("skipped" if padded else "made")
    ref = run(True)
    assert got.keys() == ref.keys()
    for name in ref:
        want = torch.float32 if name == "final" else inp["x" if name == "y" else name[1:]].dtype
        assert got[name].shape == ref[name].shape and got[name].dtype == want, name
        assert _rel(got[name], ref[name]) < tol, name


FFWD_GENERIC_CASES = [
    # seqlen, chunk, heads, groups, headdim, dstate, options, with_final, fused backward
    (37, 16, 4, 4, 16, 16, ("e", "D", "z", "h0"), True, 1),  # per-head rows (Mamba-3), every option
    (37, 16, 4, 4, 16, 16, ("e", "D", "z", "h0"), True, 0),  # the same, the split backward on its states
    (50, 16, 2, 1, 32, 16, ("Dm", "h0"), True, 1),  # shared rows, no e, D per column
    (29, 16, 4, 2, 24, 20, ("e", "z"), False, 1),  # 1 < G < H, P and N not powers of two, no final
    (11, 32, 3, 3, 16, 32, (), True, 1),  # shorter than a chunk, no option
]


FFWD_GENERIC_IDS = [f"T{c[0]}_H{c[2]}G{c[3]}P{c[4]}N{c[5]}_f{c[8]}" for c in FFWD_GENERIC_CASES]


@pytest.mark.parametrize("case", FFWD_GENERIC_CASES, ids=FFWD_GENERIC_IDS)
def test_onepass_forward_generic(ssd, case, monkeypatch):
    """The one-pass forward of the generic form against the float64 reference, with the gradients of every input
    (the backward, one-pass or split, reads the states it stores)."""
    seqlen, chunk, nheads, groups, hdim, dstate, opts, with_final, fused = case
    inp = _onepass_inputs(2, seqlen, nheads, hdim, dstate, torch.float32, ngroups=groups, seed=seqlen)
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": fused})

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
def test_onepass_forward_ssd_form(ssd, case, monkeypatch):
    """The one-pass forward of the Mamba-2 form (dt, A, dt_bias, softplus) against the float64 reference, final
    state and gradients included."""
    seqlen, chunk, nheads, groups, hdim, dstate, opts, softplus, d_matrix = case
    inp = _inputs(2, seqlen, nheads, hdim, groups, dstate, torch.float32, seed=seqlen)
    if not softplus:
        inp["dt"] = inp["dt"].abs() * 0.2
    if d_matrix:
        inp["D"] = torch.randn(nheads, hdim, generator=torch.Generator().manual_seed(1))
    _check_fwd(ssd, monkeypatch, _ssd_form_run(ssd, inp, opts, chunk, softplus), inp, 2e-5)


@pytest.mark.parametrize("form", ["generic", "ssd"])
def test_onepass_forward_bf16(ssd, form, monkeypatch):
    """bf16 inputs: Mamba-3's call (per-head rows, e, per-head D, z, h0) and Mamba-2's (one group, dt_bias)."""
    if form == "generic":
        inp = _onepass_inputs(2, 45, 2, 32, 16, torch.bfloat16, seed=3)

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
def test_onepass_forward_without_grad(ssd, monkeypatch, dstate):
    """Without autograd the one-pass forward stores no chunk states and no output before the gate (directly, and
    through the padded copies); the outputs still match the float64 reference."""
    inp = _onepass_inputs(1, 40, 2, 16, dstate, torch.float32, seed=9)
    args = [inp[k] for k in ("x", "la", "w", "B", "C")]
    kw = {"e": inp["e"], "D": inp["D"], "z": inp["z"], "h0": inp["h0"], "return_final_state": True}
    calls = _count(ssd, monkeypatch, "_ssd_fwd_onepass")
    pads = _count(ssd, monkeypatch, "_ssd_fwd_padded")
    with torch.no_grad():
        got = ssd.ssd_generic_scan(*args, 16, **kw)
    assert calls and bool(pads) == (dstate == 18)
    ref = ssd.ssd_generic_scan_ref(*(t.double() for t in args), 16, **{k: _f64(v) for k, v in kw.items()})
    for g, r in zip(got, ref):
        assert _rel(g, r) < 2e-5


FFWD_PADDED_CASES = [
    # seqlen, chunk, heads, groups, headdim, dstate, dtype, options, fused backward
    (21, 16, 2, 2, 16, 18, torch.float32, ("e", "D", "z", "h0"), 1),  # N x 4 bytes = 72: B, C rows padded to 20
    (21, 16, 2, 1, 16, 18, torch.float32, ("Dm", "z", "h0"), 1),  # the same with one shared group, D per column
    (33, 16, 2, 2, 32, 12, torch.bfloat16, ("e", "D", "z", "h0"), 1),  # N x 2 bytes = 24: padded to 16
    (33, 16, 2, 2, 20, 16, torch.bfloat16, ("e", "Dm", "z", "h0"), 1),  # P x 2 bytes = 40: x, z, y rows padded to 24
    (37, 16, 2, 2, 18, 16, torch.float32, ("e", "D", "z", "h0"), 0),  # P x 4 bytes = 72: also the states' rows
]


@pytest.mark.parametrize(
    "case", FFWD_PADDED_CASES, ids=[f"P{c[4]}N{c[5]}G{c[3]}_{str(c[6])[6:]}" for c in FFWD_PADDED_CASES]
)
def test_onepass_forward_pads_unaligned_rows(ssd, monkeypatch, case):
    """Rows the tensor descriptors cannot take (P or N times the element size not a multiple of 16 bytes) run the
    one-pass forward on zero-padded copies; outputs, final state and every gradient (the backward reading the states
    copied back out) against the float64 reference."""
    seqlen, chunk, nheads, groups, hdim, dstate, dtype, opts, fused = case
    inp = _onepass_inputs(2, seqlen, nheads, hdim, dstate, dtype, ngroups=groups, seed=seqlen + hdim)
    monkeypatch.setitem(ssd.SSD_TUNING, "fused", {"on": fused})

    def run(ref):
        fn = ssd.ssd_generic_scan_ref if ref else ssd.ssd_generic_scan
        return _run_generic(fn, inp, opts, chunk, True, cast=torch.float64 if ref else None)

    _check_fwd(ssd, monkeypatch, run, inp, 2e-5 if dtype == torch.float32 else 2e-2, padded=True)


@pytest.mark.parametrize("shifted", [("x",), ("B", "z")])
def test_onepass_forward_pads_unaligned_bases(ssd, monkeypatch, shifted):
    """Contiguous inputs whose storage starts one element past a 16-byte boundary (rows aligned, base not) run
    through the padded copies too; gradients included."""
    inp = _onepass_inputs(2, 37, 2, 16, 16, torch.float32, seed=11)
    opts = ("e", "D", "z", "h0")

    def run(ref):
        if ref:
            return _run_generic(ssd.ssd_generic_scan_ref, inp, opts, 16, True, cast=torch.float64)
        return _run_generic(ssd.ssd_generic_scan, inp, opts, 16, True, shift=shifted)

    _check_fwd(ssd, monkeypatch, run, inp, 2e-5, padded=True)
