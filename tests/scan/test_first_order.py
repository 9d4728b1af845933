"""First-order scan kernels (real, complex, LTI) against their sequential references, under TRITON_INTERPRET=1 on
the CPU (or on CUDA where present): outputs, final states and every gradient, odd lengths, bf16, long sequences."""

import importlib

import pytest
import torch

from .conftest import interpret_triton_stdlib  # noqa: TID252

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def fo():
    """The module with its kernels built for the interpreter on a CPU-only machine, restored afterwards."""
    patch = pytest.MonkeyPatch()
    if DEV == "cpu":
        patch.setenv("TRITON_INTERPRET", "1")
        interpret_triton_stdlib(patch)
    helper = importlib.reload(importlib.import_module("templates.scan.lti_chunked"))
    mod = importlib.reload(importlib.import_module("templates.scan.first_order"))
    yield mod
    patch.undo()
    importlib.reload(helper)
    importlib.reload(mod)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error; NaN or inf anywhere fails."""
    assert torch.isfinite(x).all(), "non-finite values"
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def grads_of(fn, inputs, cotangents):
    """Outputs and input gradients of sum(out_i * cot_i) for a function returning a tuple of tensors."""
    ins = [leaf(x) for x in inputs]
    outs = fn(*ins)
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, ins)
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("T", [1, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_h0", [False, True])
def test_real_matches_reference(fo, T, dtype, with_h0):
    torch.manual_seed(T)
    B, D = 2, 20
    a = (torch.rand(B, T, D, device=DEV) * 1.3 - 0.2).to(dtype)
    b = torch.randn(B, T, D, device=DEV).to(dtype)
    h0 = torch.randn(B, D, device=DEV) if with_h0 else None
    inputs = [a, b] + ([h0] if with_h0 else [])

    def kern(a, b, h0=None):
        return fo.first_order_scan(a, b, h0, return_final_state=True)

    def ref(a, b, h0=None):
        return fo.first_order_scan_ref(a.double(), b.double(), None if h0 is None else h0.double(), True)

    cots = [torch.randn(B, T, D, device=DEV, dtype=torch.float64), torch.randn(B, D, device=DEV, dtype=torch.float64)]
    (h, fin), g = grads_of(kern, inputs, cots)
    (h_ref, fin_ref), g_ref = grads_of(ref, inputs, cots)
    assert h.dtype == dtype and fin.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(h, h_ref) < tol
    assert rel_err(fin, fin_ref) < 1e-5
    for got, want in zip(g, g_ref):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("T", [5, 33])
def test_complex_matches_reference(fo, T):
    torch.manual_seed(T)
    B, D = 2, 12
    radius = torch.rand(B, T, D, device=DEV) * 0.99
    angle = torch.rand(B, T, D, device=DEV) * 6.28
    inputs = [
        radius * torch.cos(angle),
        radius * torch.sin(angle),
        torch.randn(B, T, D, device=DEV),
        torch.randn(B, T, D, device=DEV),
        torch.randn(B, D, device=DEV),
        torch.randn(B, D, device=DEV),
    ]

    def kern(ar, ai, br, bi, hr, hi):
        yr, yi, (fr, fi) = fo.first_order_scan_complex(ar, ai, br, bi, (hr, hi), return_final_state=True)
        return yr, yi, fr, fi

    def ref(ar, ai, br, bi, hr, hi):
        args = [x.double() for x in (ar, ai, br, bi)]
        yr, yi, (fr, fi) = fo.first_order_scan_complex_ref(*args, (hr.double(), hi.double()), True)
        return yr, yi, fr, fi

    shapes = [(B, T, D), (B, T, D), (B, D), (B, D)]
    cots = [torch.randn(*s, device=DEV, dtype=torch.float64) for s in shapes]
    outs, g = grads_of(kern, inputs, cots)
    outs_ref, g_ref = grads_of(ref, inputs, cots)
    for got, want in zip(list(outs) + list(g), list(outs_ref) + list(g_ref)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    ("T", "with_h0", "dtype"), [(5, True, torch.float32), (70, False, torch.float32), (33, True, torch.bfloat16)]
)
def test_complex_constant_decay_is_the_expanded_one(fo, T, with_h0, dtype):
    """a (D,) per channel (the LRU's poles) against the same decay expanded to (B, T, D): outputs, final state and
    every gradient; the decay's gradient is the expanded one's summed over sequences and steps."""
    torch.manual_seed(T)
    B, D = 3, 10
    radius, angle = torch.rand(D, device=DEV) * 0.99, torch.rand(D, device=DEV) * 6.28
    a = [radius * torch.cos(angle), radius * torch.sin(angle)]
    b = [torch.randn(B, T, D, device=DEV, dtype=dtype) for _ in range(2)]
    h0 = [torch.randn(B, D, device=DEV) for _ in range(2)] if with_h0 else []

    def run(expand, ar, ai, br, bi, *h):
        if expand:
            ar, ai = ar.expand(B, T, D), ai.expand(B, T, D)
        yr, yi, (fr, fi) = fo.first_order_scan_complex(ar, ai, br, bi, tuple(h) or None, return_final_state=True)
        return yr, yi, fr, fi

    cots = [torch.randn(B, T, D, device=DEV) for _ in range(2)] + [torch.randn(B, D, device=DEV) for _ in range(2)]
    inputs = a + b + h0
    outs, g = grads_of(lambda *x: run(False, *x), inputs, cots)
    outs_ref, g_ref = grads_of(lambda *x: run(True, *x), inputs, cots)
    for got, want in zip(list(outs) + list(g), list(outs_ref) + list(g_ref)):
        assert got.shape == want.shape and rel_err(got, want) < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    with pytest.raises(ValueError, match="a_im: expected shape"):
        fo.first_order_scan_complex(a[0], a[1][:-1], b[0], b[1])


def test_complex_matches_torch_complex_arithmetic(fo):
    torch.manual_seed(1)
    B, T, D = 1, 9, 5
    a = torch.randn(B, T, D, dtype=torch.complex64, device=DEV) * 0.5
    b = torch.randn(B, T, D, dtype=torch.complex64, device=DEV)
    h, outs = torch.zeros(B, D, dtype=torch.complex64, device=DEV), []
    for t in range(T):
        h = a[:, t] * h + b[:, t]
        outs.append(h)
    want = torch.stack(outs, 1)
    yr, yi = fo.first_order_scan_complex(a.real, a.imag, b.real, b.imag)
    assert rel_err(torch.stack([yr, yi], -1), torch.view_as_real(want)) < 1e-5


def _assert_lti_matches_reference(fo, x, log_a, h0, config: dict | None, tol: float) -> list:
    """lti_scan (with `config`) against the float64 reference: the output, the final state and the gradients of x,
    log_a and h0 within `tol`; the gradients, for further checks."""
    B, T, D = x.shape

    def kern(x, log_a, h0):
        return fo.lti_scan(x, log_a, h0, True, config=config)

    def ref(x, log_a, h0):
        return fo.lti_scan_ref(x.double(), log_a.double(), h0.double(), True)

    cots = [torch.randn(B, T, D, device=DEV, dtype=torch.float64), torch.randn(B, D, device=DEV, dtype=torch.float64)]
    outs, g = grads_of(kern, [x, log_a, h0], cots)
    outs_ref, g_ref = grads_of(ref, [x, log_a, h0], cots)
    for got, want in zip(list(outs) + list(g), list(outs_ref) + list(g_ref)):
        assert rel_err(got, want) < tol
    return g


@pytest.mark.parametrize("n_decays", [16, 4])
def test_lti_per_channel_and_per_head(fo, n_decays):
    torch.manual_seed(n_decays)
    B, T, D = 2, 23, 16
    log_a = -torch.rand(n_decays, device=DEV) * 2
    x = torch.randn(B, T, D, device=DEV)
    h0 = torch.randn(B, D, device=DEV)
    g = _assert_lti_matches_reference(fo, x, log_a, h0, None, 1e-5)
    assert g[1].shape == (n_decays,)


@pytest.mark.parametrize(
    "T, dtype", [(1, torch.float32), (37, torch.float32), (64, torch.float32), (21, torch.bfloat16)]
)
def test_lti_toeplitz_matches_reference(fo, T, dtype):
    """The tensor-core (Toeplitz) LTI path: per-head decays, chunk boundaries, h0 and final-state gradients."""
    torch.manual_seed(T)
    B, D, H = 2, 64, 2
    log_a = -torch.rand(H, device=DEV) * 1.5
    x = torch.randn(B, T, D, device=DEV).to(dtype)
    h0 = torch.randn(B, D, device=DEV)
    _assert_lti_matches_reference(fo, x, log_a, h0, {"method": "toeplitz"}, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "BT, BP, T, dtype",
    [
        (32, 64, 70, torch.float32),  # the GPU default: two full chunks and a partial one, one program per head
        (32, 64, 32, torch.float32),  # exactly one chunk: the final state is the chunk's last column
        (32, 16, 45, torch.bfloat16),  # 4 programs per head, a partial second chunk
        (16, 64, 33, torch.float32),  # the sequence's last step alone in its chunk
        (64, 32, 1, torch.float32),  # one step in a wide chunk
    ],
)
def test_lti_toeplitz_chunk_configs(fo, BT, BP, T, dtype):
    """Chunk lengths and channel blocks of the launch config (the GPU default included): the carry taken as one
    column of each chunk's product, the final state from the sequence's last step inside a partial chunk, and
    the gradients of x, log_a and h0 with the final state's gradient entering at step T - 1."""
    torch.manual_seed(1000 + T + BT)
    B, D, H = 2, 128, 2
    log_a = -torch.rand(H, device=DEV) * 0.8
    x = torch.randn(B, T, D, device=DEV).to(dtype)
    h0 = torch.randn(B, D, device=DEV)
    config = {"method": "toeplitz", "BT": BT, "BP": BP}
    _assert_lti_matches_reference(fo, x, log_a, h0, config, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("use", ["both", "h", "fin"])
@pytest.mark.parametrize("T, with_h0", [(37, True), (16, False), (5, True)])
def test_lti_toeplitz_decay_gradient_partials(fo, T, with_h0, use):
    """d log_a from the backward kernel's per-program partials: several heads, several programs per head and
    sequence (BP 4 of a 16-channel head), odd lengths, with and without h0, and with the final state or the
    output unused (a gradient that comes as None, not zero-filled)."""
    torch.manual_seed(100 + T)
    B, D, H = 3, 64, 4
    log_a = -torch.rand(H, device=DEV) * 1.5
    x = torch.randn(B, T, D, device=DEV)
    h0 = torch.randn(B, D, device=DEV) if with_h0 else None
    inputs = [x, log_a] + ([h0] if with_h0 else [])
    pick = {"both": slice(0, 2), "h": slice(0, 1), "fin": slice(1, 2)}[use]

    def kern(x, log_a, h0=None):
        return fo.lti_scan(x, log_a, h0, True, config={"method": "toeplitz", "BP": 4})[pick]

    def ref(x, log_a, h0=None):
        return fo.lti_scan_ref(x.double(), log_a.double(), None if h0 is None else h0.double(), True)[pick]

    cots = [torch.randn(B, T, D, device=DEV, dtype=torch.float64), torch.randn(B, D, device=DEV, dtype=torch.float64)]
    outs, g = grads_of(kern, inputs, cots[pick])
    outs_ref, g_ref = grads_of(ref, inputs, cots[pick])
    assert g[1].shape == (H,)
    for got, want in zip(list(outs) + list(g), list(outs_ref) + list(g_ref)):
        assert rel_err(got, want) < 1e-5


def test_lti_toeplitz_without_decay_gradient(fo):
    """log_a without requires_grad: the backward kernel skips the decay gradient; x and h0 still match."""
    torch.manual_seed(5)
    x, h0 = torch.randn(2, 23, 32, device=DEV, requires_grad=True), torch.randn(2, 32, device=DEV)
    log_a = -torch.rand(2, device=DEV)
    h = fo.lti_scan(x, log_a, h0, config={"method": "toeplitz"})
    xr = x.detach().double().requires_grad_()
    hr = fo.lti_scan_ref(xr, log_a.double(), h0.double())
    cot = torch.randn_like(hr)
    assert rel_err(torch.autograd.grad(h, x, cot.float())[0], torch.autograd.grad(hr, xr, cot)[0]) < 1e-5


def test_lti_toeplitz_block_rule(fo):
    """Per-channel decays and heads narrower than a tensor-core tile fall back to the scan (block 0)."""
    assert fo.lti_toeplitz_block(1024, 1024) == 0
    if DEV == "cuda":
        assert fo.lti_toeplitz_block(1024, 16) == 64 and fo.lti_toeplitz_block(96, 12) == 0
    x = torch.randn(1, 9, 8, device=DEV)
    log_a = -torch.rand(8, device=DEV)
    got = fo.lti_scan(x, log_a, config={"method": "toeplitz"})
    assert rel_err(got, fo.lti_scan_ref(x.double(), log_a.double())) < 1e-5
    heads = -torch.rand(2, device=DEV)  # a channel block asked wider than a head is cut to the head
    got = fo.lti_scan(x, heads, config={"method": "toeplitz", "BP": 32})
    assert rel_err(got, fo.lti_scan_ref(x.double(), heads.double())) < 1e-5


def test_lti_head_rule(fo):
    x = torch.randn(1, 4, 6, device=DEV)
    with pytest.raises(ValueError, match="D % H == 0"):
        fo.lti_scan(x, torch.zeros(4, device=DEV))


def test_bad_shapes_raise(fo):
    with pytest.raises(ValueError, match="first_order_scan: a"):
        fo.first_order_scan(torch.rand(1, 4, 3, device=DEV), torch.rand(1, 5, 3, device=DEV))
    with pytest.raises(ValueError, match="h0"):
        fo.first_order_scan(torch.rand(1, 4, 3, device=DEV), torch.rand(1, 4, 3, device=DEV), torch.rand(3))


def test_two_windows_with_carry_equal_one_window(fo):
    torch.manual_seed(3)
    a = torch.rand(2, 30, 8, device=DEV)
    b = torch.randn(2, 30, 8, device=DEV)
    whole = fo.first_order_scan(a, b)
    first, carry = fo.first_order_scan(a[:, :13], b[:, :13], return_final_state=True)
    second = fo.first_order_scan(a[:, 13:], b[:, 13:], carry)
    assert rel_err(torch.cat([first, second], 1), whole) < 1e-6


@pytest.mark.parametrize("low, high", [(0.0, 0.05), (0.995, 1.0)])
def test_long_sequence_stable(fo, low, high):
    """L = 4096 with decays near 0 and near 1: finite, and equal to the float64 reference."""
    torch.manual_seed(7)
    B, T, D = 1, 4096, 2
    a = low + (high - low) * torch.rand(B, T, D, device=DEV)
    b = torch.randn(B, T, D, device=DEV)
    cot = torch.randn(B, T, D, device=DEV, dtype=torch.float64)
    (h,), g = grads_of(lambda a, b: (fo.first_order_scan(a, b),), [a, b], [cot])
    (h_ref,), g_ref = grads_of(lambda a, b: (fo.first_order_scan_ref(a.double(), b.double()),), [a, b], [cot])
    assert rel_err(h, h_ref) < 1e-5
    for got, want in zip(g, g_ref):
        assert rel_err(got, want) < 1e-5
    log_a = torch.full((D,), float(torch.log(torch.tensor(high))), device=DEV)
    assert torch.isfinite(fo.lti_scan(b, log_a)).all()


def test_reference_gradcheck_float64(fo):
    torch.manual_seed(0)
    a = torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, h0: fo.first_order_scan_ref(a, b, h0, True), (a, b, h0))
    parts = [torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *p: fo.first_order_scan_complex_ref(*p), parts)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = importlib.import_module("templates.scan.first_order")
    a, b = torch.rand(1, 6, 3), torch.randn(1, 6, 3)
    assert torch.equal(mod.first_order_scan(a, b), mod.first_order_scan_ref(a, b))


def test_compiled_caller_runs(fo):
    """Under torch.compile (whose graph holds the scan as the opaque op ssm_golf::fo_scan) the values are right."""
    a, b = torch.rand(1, 7, 4, device=DEV), torch.randn(1, 7, 4, device=DEV)
    compiled = torch.compile(lambda a, b: fo.first_order_scan(a, b) * 2.0, backend="eager")
    assert rel_err(compiled(a, b), 2.0 * fo.first_order_scan_ref(a, b)) < 1e-6
