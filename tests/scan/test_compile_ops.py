"""The scan core's custom ops under torch.compile(fullgraph=True) on the CPU (the reference path): each public scan
compiles without a graph break, appears in the graphs as its own ssm_golf op forward and backward (not traced
into), and matches eager outputs and gradients, which match plain autograd through the op's PyTorch reference (the
ops' reference backward runs below the autograd keys, where autograd records nothing unless switched back on);
torch.library.opcheck passes on every op; modules load twice.

The graphs are compiled through AOTAutograd with recording no-op compilers (as backend="aot_eager" does), which
traces forward and backward and needs no C++ compiler; one test also runs the default Inductor backend."""

import importlib
import sys

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from templates.scan.first_order import (
    first_order_scan,
    first_order_scan_complex,
    first_order_scan_complex_ref,
    first_order_scan_ref,
    lti_scan,
    lti_scan_ref,
)
from templates.scan.mamba3 import mamba3_siso_scan
from templates.scan.selective import selective_scan, selective_scan_ref
from templates.scan.ssd import ssd_generic_scan, ssd_generic_scan_ref, ssd_scan, ssd_scan_ref


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """CPU without the interpreter: the ops run the PyTorch references."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()


def recording_backend() -> tuple:
    """An AOTAutograd backend that keeps the code of the forward and backward graphs and runs them as they are."""
    graphs: dict[str, list[str]] = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, _example_inputs):
            graphs[kind].append(gm.code)
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")), graphs


def run(fn, inputs, weights_seed=0):
    """Outputs of fn and the gradients of a weighted sum of them against every float input."""
    leaves = [x.detach().clone().requires_grad_() if x is not None and x.is_floating_point() else x for x in inputs]
    outs = fn(*leaves)
    gen = torch.Generator().manual_seed(weights_seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum() for o in outs)
    wrt = [x for x in leaves if x is not None and x.requires_grad]
    return [o.detach() for o in outs], torch.autograd.grad(loss, wrt)


def check_compiled(fn, inputs, ops: tuple[str, ...], ref, tol: float = 1e-5) -> None:
    """fn compiled against fn eager, and fn eager against `ref` (fn on the scans' references): every gradient equal
    and none zero."""
    backend, graphs = recording_backend()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    outs_e, grads_e = run(fn, inputs)
    outs_r, grads_r = run(ref, inputs)
    for got, want in zip(list(outs_e) + list(grads_e), list(outs_r) + list(grads_r), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert all(g.abs().sum() > 0 for g in grads_e), "a gradient through the op is zero"
    outs_c, grads_c = run(compiled, inputs)
    assert len(outs_c) == len(outs_e) and len(grads_c) == len(grads_e)
    for got, want in zip(list(outs_c) + list(grads_c), list(outs_e) + list(grads_e)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1, "one graph each way (no graph break)"
    for op in ops:
        assert f"ssm_golf.{op}.default" in graphs["fw"][0], f"{op} missing from the forward graph"
        assert f"ssm_golf.{op}_bwd.default" in graphs["bw"][0], f"{op}_bwd missing from the backward graph"


def test_first_order_compiles():
    torch.manual_seed(0)
    a, b, h0 = torch.rand(2, 9, 6), torch.randn(2, 9, 6), torch.randn(2, 6)

    def fn(a, b, h0, scan=first_order_scan):
        h, fin = scan(a, b, h0, return_final_state=True)
        return (h.tanh(), fin * 2.0)

    check_compiled(fn, [a, b, h0], ("fo_scan",), ref=lambda *xs: fn(*xs, scan=first_order_scan_ref))


@pytest.mark.parametrize("method", ["scan", "toeplitz"])
def test_lti_compiles(method):
    torch.manual_seed(1)
    x, log_a = torch.randn(2, 11, 8), -torch.rand(2)

    def fn(x, log_a):
        h = lti_scan(x * 1.5, log_a, config={"method": method})
        return (h.square(),)

    check_compiled(fn, [x, log_a], ("fo_scan",), ref=lambda x, log_a: (lti_scan_ref(x * 1.5, log_a).square(),))


@pytest.mark.parametrize("use_fin", [True, False])
def test_lti_toeplitz_compiles(use_fin):
    """Heads wide enough for the Toeplitz form: its own op, which reads log_a (no exp around it); an unused final
    state's gradient comes to the backward as None."""
    torch.manual_seed(11)
    x, log_a, h0 = torch.randn(2, 11, 32), -torch.rand(2), torch.randn(2, 32)

    def fn(x, log_a, h0, scan=lti_scan):
        h, fin = scan(x * 1.5, log_a, h0, True, config={"method": "toeplitz"})
        return (h.square(), fin * 2.0) if use_fin else (h.square(),)

    def ref(x, log_a, h0, config=None):
        return fn(x, log_a, h0, scan=lambda x, log_a, h0, fin, config: lti_scan_ref(x, log_a, h0, fin))

    check_compiled(fn, [x, log_a, h0], ("lti_toeplitz",), ref=ref)


@pytest.mark.parametrize("decay", [(1, 7, 5), (5,)])
def test_complex_compiles(decay):
    torch.manual_seed(2)
    parts = [torch.rand(decay) * 0.9, torch.rand(decay) * 0.3, torch.randn(1, 7, 5), torch.randn(1, 7, 5)]
    h0 = [torch.randn(1, 5), torch.randn(1, 5)]

    def fn(ar, ai, br, bi, h0r, h0i, scan=first_order_scan_complex):
        hr, hi, (fr, fi) = scan(ar, ai, br, bi, (h0r, h0i), return_final_state=True)
        return (hr, hi, fr + fi)

    check_compiled(fn, parts + h0, ("fo_cscan",), ref=lambda *xs: fn(*xs, scan=first_order_scan_complex_ref))


def test_selective_compiles():
    torch.manual_seed(3)
    Bsz, T, DM, N = 2, 10, 6, 4
    u, delta, z = torch.randn(Bsz, T, DM), torch.randn(Bsz, T, DM) - 1.0, torch.randn(Bsz, T, DM)
    A = -torch.rand(DM, N) - 0.1
    B, C = torch.randn(Bsz, T, N), torch.randn(Bsz, T, N)
    D, bias, h0 = torch.randn(DM), torch.randn(DM) * 0.1, torch.randn(Bsz, DM, N)

    def fn(u, delta, A, B, C, D, z, bias, h0, scan=selective_scan):
        y, fin = scan(u, delta, A, B, C, D, z, bias, True, h0, return_final_state=True)
        return (y, fin)

    inputs = [u, delta, A, B, C, D, z, bias, h0]
    check_compiled(fn, inputs, ("sel_scan",), ref=lambda *xs: fn(*xs, scan=selective_scan_ref))


def test_ssd_compiles():
    torch.manual_seed(4)
    Bsz, T, H, P, G, N = 1, 13, 4, 8, 2, 8
    x, z = torch.randn(Bsz, T, H, P), torch.randn(Bsz, T, H, P)
    dt, A, dt_bias = torch.randn(Bsz, T, H) - 1.0, -torch.rand(H) - 0.2, torch.randn(H) * 0.1
    B, C = torch.randn(Bsz, T, G, N), torch.randn(Bsz, T, G, N)
    D, h0 = torch.randn(H), torch.randn(Bsz, H, P, N)

    def fn(x, dt, A, B, C, D, z, dt_bias, h0, scan=ssd_scan):
        y, fin = scan(x, dt, A, B, C, 16, D, z, dt_bias, True, h0, return_final_state=True)
        return (y, fin)

    inputs = [x, dt, A, B, C, D, z, dt_bias, h0]
    check_compiled(fn, inputs, ("ssd_scan",), ref=lambda *xs: fn(*xs, scan=ssd_scan_ref))


def test_ssd_generic_compiles():
    torch.manual_seed(5)
    Bsz, T, H, P, N = 2, 9, 2, 4, 8
    x, la, w, e = torch.randn(Bsz, T, H, P), -torch.rand(Bsz, T, H), torch.rand(Bsz, T, H), torch.randn(Bsz, T, H)
    B, C = torch.randn(Bsz, T, 1, N), torch.randn(Bsz, T, 1, N)

    def fn(x, la, w, B, C, e, scan=ssd_generic_scan):
        return (scan(x, la, w, B, C, 16, e=e),)

    check_compiled(fn, [x, la, w, B, C, e], ("ssd_scan",), ref=lambda *xs: fn(*xs, scan=ssd_generic_scan_ref))


def test_mamba3_compiles():
    """Off CUDA mamba3_siso_scan is its PyTorch reference, traced whole; it must hold no graph break either."""
    torch.manual_seed(7)
    Bsz, T, H, P, N, R = 1, 6, 2, 4, 8, 2
    x, dt = torch.randn(Bsz, T, H, P), torch.rand(Bsz, T, H) * 0.5 + 0.1
    adt, trap = -torch.rand(Bsz, T, H) * dt, torch.randn(Bsz, T, H)
    q, k, angles = torch.randn(Bsz, T, 1, N), torch.randn(Bsz, T, 1, N), torch.randn(Bsz, T, H, R)

    def fn(x, dt, adt, trap, q, k, angles):
        return (mamba3_siso_scan(x, dt, adt, trap, q, k, angles),)

    backend, graphs = recording_backend()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    outs_e, grads_e = run(fn, [x, dt, adt, trap, q, k, angles])
    outs_c, grads_c = run(compiled, [x, dt, adt, trap, q, k, angles])
    for got, want in zip(list(outs_c) + list(grads_c), list(outs_e) + list(grads_e)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1


def test_inductor_backend():
    """The default backend (Inductor, C++ on the CPU) around the opaque op: same values and gradients."""
    torch.manual_seed(8)
    a, b = torch.rand(2, 7, 4), torch.randn(2, 7, 4)

    def fn(a, b):
        return (first_order_scan(a.sigmoid(), b * 2.0).cos(),)

    outs_e, grads_e = run(fn, [a, b])
    outs_c, grads_c = run(torch.compile(fn, fullgraph=True), [a, b])
    for got, want in zip(list(outs_c) + list(grads_c), list(outs_e) + list(grads_e)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _req(*xs):
    return [x.requires_grad_() if x is not None and x.is_floating_point() else x for x in xs]


def opcheck_cases() -> list:
    g = torch.Generator().manual_seed(9)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sel = [r(1, 5, 3), r(1, 5, 3), -torch.rand(3, 2, generator=g), r(1, 5, 2), r(1, 5, 2), r(3), r(1, 5, 3)]
    ssd = [r(1, 6, 2, 4), r(1, 6, 2), -torch.rand(2, generator=g), r(2)]
    return [
        ("fo_scan", [*_req(torch.rand(2, 5, 3, generator=g), r(2, 5, 3), r(2, 3)), 0, ""]),
        ("fo_scan", [*_req(torch.rand(4, generator=g), r(1, 6, 4)), None, 2, "method=toeplitz"]),
        ("lti_toeplitz", [*_req(r(1, 6, 32), -torch.rand(2, generator=g), r(1, 32)), "method=toeplitz"]),
        ("lti_toeplitz", [*_req(r(1, 6, 32), -torch.rand(2, generator=g)), None, ""]),
        ("fo_cscan", [*_req(*(r(1, 4, 3) * 0.5 for _ in range(4))), None, None, ""]),
        ("fo_cscan", [*_req(r(3) * 0.5, r(3) * 0.5, r(1, 4, 3), r(1, 4, 3)), None, None, ""]),  # constant decay
        ("sel_scan", [*_req(*sel), None, None, True, True, ""]),
        ("ssd_scan", [*_req(*ssd), None, None, None, *_req(r(1, 6, 1, 4), r(1, 6, 1, 4)), None, None, None]
         + [16, True, False, True, True]),
        ("ssd_scan", [*_req(r(1, 6, 2, 4), None, None, None, r(1, 6, 2), r(1, 6, 2), r(1, 6, 2), r(1, 6, 1, 4),
                            r(1, 6, 1, 4), r(2), r(1, 6, 2, 4)), None]
         + [16, False, True, True, True]),
        ("fo_scan_bwd", [torch.rand(2, 5, 3), r(2, 5, 3), None, None, r(2, 5, 3), r(2, 3), 0, True, ""]),
        ("lti_toeplitz_bwd", [-torch.rand(2), r(1, 5, 32), None, r(1, 32), r(1, 5, 32), None, True, ""]),
        ("m3_gates", [*_req(torch.rand(1, 5, 2, generator=g), r(1, 5, 2), r(1, 5, 2, 3), r(1, 2, 3))]),
        ("m3_gates", [*_req(torch.rand(1, 5, 2, generator=g), r(1, 5, 2), r(1, 5, 2, 3)), None]),
        ("m3_rotate", [*_req(r(1, 5, 1, 4), r(1, 5, 1, 4), r(2, 4)), None, *_req(r(1, 5, 2, 2)), 2]),
        ("m3_rotate_bwd", [r(1, 5, 1, 4), r(1, 5, 1, 4), None, r(2, 4), r(1, 5, 2, 1), r(1, 5, 2, 4), r(1, 5, 2, 4)]
         + [2]),
        ("m3_gates_bwd", [torch.rand(1, 4, 2), r(1, 4, 2), r(1, 4, 2, 3), None, r(1, 4, 2), r(1, 4, 2), r(1, 4, 2, 3)]),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    name, args = opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.ssm_golf, name).default, tuple(args))


@pytest.mark.parametrize(
    "module, op, impl",
    [
        ("templates.scan.first_order", "fo_scan", "_fo_scan_impl"),
        ("templates.scan.selective", "sel_scan", "_sel_scan_impl"),
        ("templates.scan.ssd", "ssd_scan", "_ssd_scan_impl"),
        ("templates.scan.m3_rotary", "m3_gates", "_m3g_impl"),
        ("templates.scan.m3_rotary", "m3_rotate", "_m3r_impl"),
    ],
)
def test_module_loads_twice(module, op, impl):
    """A second import (reload) redefines nothing: the op stays and runs the newest module's functions."""
    mod = importlib.reload(importlib.import_module(module))
    mod = importlib.reload(mod)
    assert sys.modules["_ssm_golf_scan_op_registry"].impls[op][0] is getattr(mod, impl)
    assert hasattr(torch.ops.ssm_golf, "fo_scan") and hasattr(torch.ops.ssm_golf, "ssd_scan")
    a, b = torch.rand(1, 4, 2), torch.randn(1, 4, 2)
    fo = importlib.import_module("templates.scan.first_order")
    torch.testing.assert_close(fo.first_order_scan(a, b), fo.first_order_scan_ref(a, b))
