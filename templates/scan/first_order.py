"""First-order diagonal linear recurrence h_t = a_t * h_{t-1} + b_t over (batch, time, channels) in Triton.

Real decays, complex decays (LRU, as pairs of reals) and constant-in-time decays (LTI) share one design: a program
owns (one sequence, BD channels) and walks time in tiles of BT steps, scanning each tile with
`tl.associative_scan` and carrying the state across tiles in fp32 registers. The backward is the same kernel run
in reverse time with the decays shifted by one step (adjoint lambda_t = g_t + conj(a_{t+1}) lambda_{t+1}), which
also yields d a_t = lambda_t * conj(h_{t-1}) and d h_0 = conj(a_1) lambda_1. Every op has a sequential PyTorch
reference (`*_ref`, float64-capable) used on machines without CUDA.
"""

import os

import torch
import triton
import triton.language as tl

from templates.scan.lti_chunked import _ltc_launch, lti_toeplitz_block, lti_toeplitz_config
from templates.scan.ops import scan_config_dict, scan_config_str, scan_none, scan_op, scan_opt, scan_ref_vjp


@triton.jit
def _fo_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _fo_ccombine(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    ar = ar2 * ar1 - ai2 * ai1
    ai = ar2 * ai1 + ai2 * ar1
    br = ar2 * br1 - ai2 * bi1 + br2
    bi = ar2 * bi1 + ai2 * br1 + bi2
    return ar, ai, br, bi


@triton.jit
def _fo_scan_kernel(
    a_ptr,
    b_ptr,
    c0_ptr,
    out_ptr,
    fin_ptr,
    hp_ptr,
    h0_ptr,
    da_ptr,
    T,
    D,
    REVERSE: tl.constexpr,
    CONST_A: tl.constexpr,
    HAS_C0: tl.constexpr,
    STORE_FIN: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_H0: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """One (sequence, channel block): forward h = scan(a, b), or (REVERSE) the adjoint scan with a shifted by one.

    Forward: c0 = h_0, out = h, fin = h_T. Reverse: b = dL/dh, c0 = dL/dh_T, out = lambda (= dL/db),
    fin = dL/dh_0, and with HAS_DA: da = lambda * h_{t-1} (hp = forward h, h0 = forward h_0), summed over time
    per (sequence, channel) when CONST_A.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    mask_d = cols < D
    base = pid_b * T * D
    cols2 = cols[None, :]
    if CONST_A:
        a_vec = tl.load(a_ptr + cols, mask=mask_d, other=1.0).to(tl.float32)
    if HAS_C0:
        carry = tl.load(c0_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BD], dtype=tl.float32)
    if HAS_DA:
        if HAS_H0:
            h0v = tl.load(h0_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        if CONST_A:
            da_acc = tl.zeros([BD], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BT)
    for k in range(0, n_tiles):
        if REVERSE:
            t = T - 1 - (k * BT + rows)
            mask_t = t >= 0
            ta = t + 1
        else:
            t = k * BT + rows
            mask_t = t < T
            ta = t
        mask_a = mask_t & (ta < T)
        m2 = mask_t[:, None] & mask_d[None, :]
        off = base + t.to(tl.int64)[:, None] * D + cols2
        if CONST_A:
            a = tl.where(mask_a[:, None] & mask_d[None, :], a_vec[None, :], 1.0)
        else:
            off_a = base + ta.to(tl.int64)[:, None] * D + cols2
            a = tl.load(a_ptr + off_a, mask=mask_a[:, None] & mask_d[None, :], other=1.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=m2, other=0.0).to(tl.float32)
        acc_a, acc_b = tl.associative_scan((a, b), 0, _fo_combine)
        h = acc_b + acc_a * carry[None, :]
        tl.store(out_ptr + off, h.to(out_ptr.dtype.element_ty), mask=m2)
        carry = tl.sum(tl.where(rows[:, None] == BT - 1, h, 0.0), axis=0)
        if HAS_DA:
            hp = tl.load(hp_ptr + off - D, mask=m2 & (t >= 1)[:, None], other=0.0).to(tl.float32)
            if HAS_H0:
                hp += tl.where((t == 0)[:, None], h0v[None, :], 0.0)
            da = h * hp
            if CONST_A:
                da_acc += tl.sum(tl.where(m2, da, 0.0), axis=0)
            else:
                tl.store(da_ptr + off, da.to(da_ptr.dtype.element_ty), mask=m2)
    if HAS_DA:
        if CONST_A:
            tl.store(da_ptr + pid_b * D + cols, da_acc, mask=mask_d)
    if STORE_FIN:
        if REVERSE:
            if CONST_A:
                a0 = a_vec
            else:
                a0 = tl.load(a_ptr + base + cols, mask=mask_d, other=0.0).to(tl.float32)
            carry = carry * a0
        tl.store(fin_ptr + pid_b * D + cols, carry, mask=mask_d)


@triton.jit
def _fo_cscan_kernel(
    ar_ptr,
    ai_ptr,
    br_ptr,
    bi_ptr,
    c0r_ptr,
    c0i_ptr,
    outr_ptr,
    outi_ptr,
    finr_ptr,
    fini_ptr,
    hpr_ptr,
    hpi_ptr,
    h0r_ptr,
    h0i_ptr,
    dar_ptr,
    dai_ptr,
    T,
    D,
    REVERSE: tl.constexpr,
    HAS_C0: tl.constexpr,
    STORE_FIN: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_H0: tl.constexpr,
    CONST_A: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """Complex version of `_fo_scan_kernel`; the reverse pass uses conj(a_{t+1}) and da = lambda * conj(h_{t-1}).
    CONST_A: one decay per channel (a (D,)), read once; da is then summed over the sequence in registers and stored
    per (sequence, channel)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    mask_d = cols < D
    base = pid_b * T * D
    cols2 = cols[None, :]
    if HAS_C0:
        cr = tl.load(c0r_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        ci = tl.load(c0i_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    else:
        cr = tl.zeros([BD], dtype=tl.float32)
        ci = tl.zeros([BD], dtype=tl.float32)
    if HAS_DA:
        if HAS_H0:
            h0r = tl.load(h0r_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            h0i = tl.load(h0i_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    if CONST_A:
        car = tl.load(ar_ptr + cols, mask=mask_d, other=1.0).to(tl.float32)
        cai = tl.load(ai_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_DA:
            sum_dr = tl.zeros([BD], dtype=tl.float32)
            sum_di = tl.zeros([BD], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BT)
    for k in range(0, n_tiles):
        if REVERSE:
            t = T - 1 - (k * BT + rows)
            mask_t = t >= 0
            ta = t + 1
        else:
            t = k * BT + rows
            mask_t = t < T
            ta = t
        ma = (mask_t & (ta < T))[:, None] & mask_d[None, :]
        m2 = mask_t[:, None] & mask_d[None, :]
        off = base + t.to(tl.int64)[:, None] * D + cols2
        if CONST_A:
            ar = tl.where(ma, car[None, :], 1.0)
            ai = tl.where(ma, cai[None, :], 0.0)
        else:
            off_a = base + ta.to(tl.int64)[:, None] * D + cols2
            ar = tl.load(ar_ptr + off_a, mask=ma, other=1.0).to(tl.float32)
            ai = tl.load(ai_ptr + off_a, mask=ma, other=0.0).to(tl.float32)
        if REVERSE:
            ai = -ai
        br = tl.load(br_ptr + off, mask=m2, other=0.0).to(tl.float32)
        bi = tl.load(bi_ptr + off, mask=m2, other=0.0).to(tl.float32)
        pr, pi, sr, si = tl.associative_scan((ar, ai, br, bi), 0, _fo_ccombine)
        hr = sr + pr * cr[None, :] - pi * ci[None, :]
        hi = si + pr * ci[None, :] + pi * cr[None, :]
        tl.store(outr_ptr + off, hr.to(outr_ptr.dtype.element_ty), mask=m2)
        tl.store(outi_ptr + off, hi.to(outi_ptr.dtype.element_ty), mask=m2)
        last = rows[:, None] == BT - 1
        cr = tl.sum(tl.where(last, hr, 0.0), axis=0)
        ci = tl.sum(tl.where(last, hi, 0.0), axis=0)
        if HAS_DA:
            mp = m2 & (t >= 1)[:, None]
            hpr = tl.load(hpr_ptr + off - D, mask=mp, other=0.0).to(tl.float32)
            hpi = tl.load(hpi_ptr + off - D, mask=mp, other=0.0).to(tl.float32)
            if HAS_H0:
                first = (t == 0)[:, None]
                hpr += tl.where(first, h0r[None, :], 0.0)
                hpi += tl.where(first, h0i[None, :], 0.0)
            if CONST_A:
                sum_dr += tl.sum(tl.where(m2, hr * hpr + hi * hpi, 0.0), axis=0)
                sum_di += tl.sum(tl.where(m2, hi * hpr - hr * hpi, 0.0), axis=0)
            else:
                tl.store(dar_ptr + off, (hr * hpr + hi * hpi).to(dar_ptr.dtype.element_ty), mask=m2)
                tl.store(dai_ptr + off, (hi * hpr - hr * hpi).to(dai_ptr.dtype.element_ty), mask=m2)
    if CONST_A and HAS_DA:
        tl.store(dar_ptr + pid_b * D + cols, sum_dr, mask=mask_d)
        tl.store(dai_ptr + pid_b * D + cols, sum_di, mask=mask_d)
    if STORE_FIN:
        if REVERSE:
            if CONST_A:
                a0r, a0i = car, -cai
            else:
                a0r = tl.load(ar_ptr + base + cols, mask=mask_d, other=0.0).to(tl.float32)
                a0i = -tl.load(ai_ptr + base + cols, mask=mask_d, other=0.0).to(tl.float32)
            cr, ci = a0r * cr - a0i * ci, a0r * ci + a0i * cr
        tl.store(finr_ptr + pid_b * D + cols, cr, mask=mask_d)
        tl.store(fini_ptr + pid_b * D + cols, ci, mask=mask_d)


def _fo_use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; the PyTorch reference otherwise."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _fo_config(D: int, config: dict | None) -> dict:
    """Block sizes: a program owns BD channels of one sequence and scans BT time steps per tile."""
    cfg = {"BT": 64, "BD": min(64, triton.next_power_of_2(D)), "num_warps": 4}
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg.update(BT=16, BD=min(16, triton.next_power_of_2(D)))
    if config:
        cfg.update(config)
    return cfg


def _fo_check(name: str, x: torch.Tensor, shape: tuple) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def _fo_launch(
    a: torch.Tensor,
    b: torch.Tensor,
    c0: torch.Tensor | None,
    reverse: bool,
    const_a: bool,
    cfg: dict,
    out_dtype: torch.dtype,
    want_fin: bool,
    hp: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
) -> tuple:
    """Run `_fo_scan_kernel` once; returns (out, fin or None, da or None)."""
    B, T, D = b.shape
    out = torch.empty((B, T, D), device=b.device, dtype=out_dtype)
    fin = torch.empty((B, D), device=b.device, dtype=torch.float32) if want_fin else out
    da = None
    if hp is not None:
        da = torch.empty((B, D) if const_a else (B, T, D), device=b.device, dtype=torch.float32 if const_a else a.dtype)
    grid = (B, triton.cdiv(D, cfg["BD"]))
    _fo_scan_kernel[grid](
        a,
        b,
        c0 if c0 is not None else b,
        out,
        fin,
        hp if hp is not None else b,
        h0 if h0 is not None else b,
        da if da is not None else b,
        T,
        D,
        REVERSE=reverse,
        CONST_A=const_a,
        HAS_C0=c0 is not None,
        STORE_FIN=want_fin,
        HAS_DA=hp is not None,
        HAS_H0=h0 is not None,
        BT=cfg["BT"],
        BD=cfg["BD"],
        num_warps=cfg["num_warps"],
    )
    return out, (fin if want_fin else None), da


def first_order_scan_ref(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, return_final_state: bool = False
):
    """Sequential reference of h_t = a_t * h_{t-1} + b_t; computes in float32 (float64 if given), returns b's dtype."""
    cdt = torch.float64 if b.dtype == torch.float64 else torch.float32
    h = torch.zeros_like(b[:, 0], dtype=cdt) if h0 is None else h0.to(cdt)
    outs = []
    for t in range(b.shape[1]):
        h = a[:, t].to(cdt) * h + b[:, t].to(cdt)
        outs.append(h)
    hs = torch.stack(outs, 1).to(b.dtype)
    return (hs, h.float() if cdt != torch.float64 else h) if return_final_state else hs


def first_order_scan_complex_ref(a_re, a_im, b_re, b_im, h0=None, return_final_state=False):
    """Sequential reference of the complex recurrence, as pairs of reals (h0 given as a (re, im) pair)."""
    cdt = torch.float64 if b_re.dtype == torch.float64 else torch.float32
    if h0 is None:
        hr = torch.zeros_like(b_re[:, 0], dtype=cdt)
        hi = torch.zeros_like(hr)
    else:
        hr, hi = h0[0].to(cdt), h0[1].to(cdt)
    out_r, out_i = [], []
    for t in range(b_re.shape[1]):
        pr, pi = (a_re, a_im) if a_re.dim() == 1 else (a_re[:, t], a_im[:, t])
        pr, pi = pr.to(cdt), pi.to(cdt)
        hr, hi = pr * hr - pi * hi + b_re[:, t].to(cdt), pr * hi + pi * hr + b_im[:, t].to(cdt)
        out_r.append(hr)
        out_i.append(hi)
    res_r = torch.stack(out_r, 1).to(b_re.dtype)
    res_i = torch.stack(out_i, 1).to(b_im.dtype)
    if return_final_state:
        fdt = cdt if cdt == torch.float64 else torch.float32
        return res_r, res_i, (hr.to(fdt), hi.to(fdt))
    return res_r, res_i


def _fo_fin_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- ssm_golf::fo_scan: real decays, time-varying (heads = 0, a (B, T, D)) or constant (heads > 0: a (D,) per
# channel or (H,) per head, each head owning D // H consecutive channels) ----


def _fo_per_channel(a: torch.Tensor, D: int) -> torch.Tensor:
    """Constant decays given per head (H,) as one per channel (D,); time-varying or per-channel ones unchanged."""
    return a.repeat_interleave(D // a.shape[0]) if a.dim() == 1 and a.shape[0] != D else a


def _fo_scan_impl(a, b, h0, heads, config):
    if not _fo_use_triton(b):
        h, fin = first_order_scan_ref(_fo_per_channel(a, b.shape[2]).expand(b.shape), b, h0, True)
        return h, fin.to(_fo_fin_dtype(b))
    cfg = _fo_config(b.shape[2], scan_config_dict(config))
    a, b = a.contiguous(), b.contiguous()
    h0c = h0.float().contiguous() if h0 is not None else None
    h, fin, _ = _fo_launch(_fo_per_channel(a, b.shape[2]), b, h0c, False, heads > 0, cfg, b.dtype, True)
    return h, fin.to(_fo_fin_dtype(b))


def _fo_scan_fake(a, b, h0, heads, config):
    return b.new_empty(b.shape), b.new_empty((b.shape[0], b.shape[2]), dtype=_fo_fin_dtype(b))


def _fo_scan_setup(ctx, inputs, output):
    a, b, h0, heads, config = inputs
    ref = not _fo_use_triton(b)
    ctx.heads, ctx.config = heads, config
    # the kernels' backward needs the forward's h; the reference's backward recomputes from b
    ctx.save_for_backward(a, b if ref else None, None if ref else output[0], h0)


def _fo_scan_backward(ctx, dh, dfin):
    a, b, h, h0 = ctx.saved_tensors
    need_a = ctx.needs_input_grad[0]
    da, db, dh0 = _fo_scan_bwd_op(a, b, h, h0, dh, dfin, ctx.heads, need_a, ctx.config)
    return (da if need_a else None), db, scan_opt(dh0), None, None


def _fo_scan_bwd_impl(a, b, h, h0, dh, dfin, heads, need_a, config):
    if b is not None:
        return tuple(scan_ref_vjp(lambda a, b, h0: _fo_scan_impl(a, b, h0, heads, config), [a, b, h0], [dh, dfin]))
    cfg = _fo_config(h.shape[2], scan_config_dict(config))
    a, dh, dfin = a.contiguous(), dh.contiguous(), dfin.float().contiguous()
    h0c = h0.float().contiguous() if h0 is not None and need_a else None
    hp = h if need_a else None
    a_ch = _fo_per_channel(a, h.shape[2])
    db, dh0, da = _fo_launch(a_ch, dh, dfin, True, heads > 0, cfg, h.dtype, h0 is not None, hp=hp, h0=h0c)
    if da is not None and heads:
        da = da.view(da.shape[0], a.shape[0], -1).sum((0, 2))  # per (sequence, channel) to a's decays
    da = da.to(a.dtype) if da is not None else scan_none(dh)
    return da, db, dh0.to(h0.dtype) if h0 is not None else scan_none(dh)


def _fo_scan_bwd_fake(a, b, h, h0, dh, dfin, heads, need_a, config):
    da = a.new_empty(a.shape) if need_a or b is not None else scan_none(dh)
    return da, dh.new_empty(dh.shape), h0.new_empty(h0.shape) if h0 is not None else scan_none(dh)


_fo_scan_bwd_op = scan_op(
    "fo_scan_bwd",
    "(Tensor a, Tensor? b, Tensor? h, Tensor? h0, Tensor dh, Tensor dfin, int heads, bool need_a, str config)"
    " -> (Tensor, Tensor, Tensor)",
    _fo_scan_bwd_impl,
    _fo_scan_bwd_fake,
)
_fo_scan_op = scan_op(
    "fo_scan",
    "(Tensor a, Tensor b, Tensor? h0, int heads, str config) -> (Tensor, Tensor)",
    _fo_scan_impl,
    _fo_scan_fake,
    _fo_scan_backward,
    _fo_scan_setup,
)


# ---- ssm_golf::fo_cscan: complex decays as (re, im) pairs ----


def _fo_cscan_impl(ar, ai, br, bi, h0r, h0i, config):
    fdt = _fo_fin_dtype(br)
    if not _fo_use_triton(br):
        hr, hi, (fr, fi) = first_order_scan_complex_ref(ar, ai, br, bi, (h0r, h0i) if h0r is not None else None, True)
        return hr, hi, fr.to(fdt), fi.to(fdt)
    cfg = _fo_config(br.shape[2], scan_config_dict(config))
    ar, ai, br, bi = (x.contiguous() for x in (ar, ai, br, bi))
    B, T, D = br.shape
    has_h0, const_a = h0r is not None, ar.dim() == 1
    c0r = h0r.float().contiguous() if has_h0 else None
    c0i = h0i.float().contiguous() if has_h0 else None
    hr, hi = torch.empty_like(br), torch.empty_like(bi)
    fr = torch.empty((B, D), device=br.device, dtype=torch.float32)
    fi = torch.empty_like(fr)
    grid = (B, triton.cdiv(D, cfg["BD"]))
    dummy = br
    _fo_cscan_kernel[grid](
        ar, ai, br, bi,
        c0r if has_h0 else dummy, c0i if has_h0 else dummy,
        hr, hi, fr, fi,
        dummy, dummy, dummy, dummy, dummy, dummy,
        T, D,
        REVERSE=False, HAS_C0=has_h0, STORE_FIN=True, HAS_DA=False, HAS_H0=False, CONST_A=const_a,
        BT=cfg["BT"], BD=cfg["BD"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return hr, hi, fr.to(fdt), fi.to(fdt)


def _fo_cscan_fake(ar, ai, br, bi, h0r, h0i, config):
    fin = (br.shape[0], br.shape[2])
    fdt = _fo_fin_dtype(br)
    return br.new_empty(br.shape), bi.new_empty(bi.shape), br.new_empty(fin, dtype=fdt), br.new_empty(fin, dtype=fdt)


def _fo_cscan_setup(ctx, inputs, output):
    ar, ai, br, bi, h0r, h0i, config = inputs
    ctx.config = config
    if _fo_use_triton(br):
        ctx.save_for_backward(ar, ai, None, None, output[0], output[1], h0r, h0i)
    else:
        ctx.save_for_backward(ar, ai, br, bi, None, None, h0r, h0i)


def _fo_cscan_backward(ctx, dhr, dhi, dfr, dfi):
    grads = _fo_cscan_bwd_op(*ctx.saved_tensors, dhr, dhi, dfr, dfi, ctx.config)
    return (*grads[:4], scan_opt(grads[4]), scan_opt(grads[5]), None)


def _fo_cscan_bwd_impl(ar, ai, br, bi, hr, hi, h0r, h0i, dhr, dhi, dfr, dfi, config):
    if br is not None:
        fwd = lambda *xs: _fo_cscan_impl(*xs, config)  # noqa: E731
        return tuple(scan_ref_vjp(fwd, [ar, ai, br, bi, h0r, h0i], [dhr, dhi, dfr, dfi]))
    cfg = _fo_config(hr.shape[2], scan_config_dict(config))
    ar, ai = ar.contiguous(), ai.contiguous()
    has_h0, const_a = h0r is not None, ar.dim() == 1
    c0r = h0r.float().contiguous() if has_h0 else None
    c0i = h0i.float().contiguous() if has_h0 else None
    B, T, D = hr.shape
    dhr, dhi = dhr.contiguous(), dhi.contiguous()
    dfr, dfi = dfr.float().contiguous(), dfi.float().contiguous()
    dbr, dbi = torch.empty_like(hr), torch.empty_like(hi)
    if const_a:  # per (sequence, channel) sums, reduced over the sequences below
        dar, dai = (torch.empty((B, D), device=hr.device, dtype=torch.float32) for _ in range(2))
    else:
        dar, dai = torch.empty_like(ar), torch.empty_like(ai)
    g0r = torch.empty((B, D), device=hr.device, dtype=torch.float32)
    g0i = torch.empty_like(g0r)
    grid = (B, triton.cdiv(D, cfg["BD"]))
    dummy = hr
    _fo_cscan_kernel[grid](
        ar, ai, dhr, dhi,
        dfr, dfi,
        dbr, dbi, g0r, g0i,
        hr, hi, c0r if has_h0 else dummy, c0i if has_h0 else dummy,
        dar, dai,
        T, D,
        REVERSE=True, HAS_C0=True, STORE_FIN=has_h0, HAS_DA=True, HAS_H0=has_h0, CONST_A=const_a,
        BT=cfg["BT"], BD=cfg["BD"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    if const_a:
        dar, dai = dar.sum(0).to(ar.dtype), dai.sum(0).to(ai.dtype)
    if has_h0:
        return dar, dai, dbr, dbi, g0r.to(h0r.dtype), g0i.to(h0i.dtype)
    return dar, dai, dbr, dbi, scan_none(dhr), scan_none(dhr)


def _fo_cscan_bwd_fake(ar, ai, br, bi, hr, hi, h0r, h0i, dhr, dhi, dfr, dfi, config):
    h0 = (h0r.new_empty(h0r.shape), h0i.new_empty(h0i.shape)) if h0r is not None else (scan_none(dhr),) * 2
    return ar.new_empty(ar.shape), ai.new_empty(ai.shape), dhr.new_empty(dhr.shape), dhi.new_empty(dhi.shape), *h0


_fo_cscan_bwd_op = scan_op(
    "fo_cscan_bwd",
    "(Tensor ar, Tensor ai, Tensor? br, Tensor? bi, Tensor? hr, Tensor? hi, Tensor? h0r, Tensor? h0i, Tensor dhr,"
    " Tensor dhi, Tensor dfr, Tensor dfi, str config) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fo_cscan_bwd_impl,
    _fo_cscan_bwd_fake,
)
_fo_cscan_op = scan_op(
    "fo_cscan",
    "(Tensor ar, Tensor ai, Tensor br, Tensor bi, Tensor? h0r, Tensor? h0i, str config)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    _fo_cscan_impl,
    _fo_cscan_fake,
    _fo_cscan_backward,
    _fo_cscan_setup,
)


# ---- ssm_golf::lti_toeplitz: constant per-head decays given as log_a (H,), as chunked Toeplitz products
# (templates/scan/lti_chunked.py). The kernels take log_a itself and return d log_a as per-program partial sums, so
# the op runs, besides its two kernels, one small sum of those partials (no exp of the decays, no zero-filled
# gradient of an unused final state, no reduction over (sequence, channel) nor product by a in autograd) ----


def _lti_tp_impl(x, log_a, h0, config):
    if not _fo_use_triton(x):
        h, fin = lti_scan_ref(x, log_a, h0, True)
        return h, fin.to(_fo_fin_dtype(x))
    cfg = lti_toeplitz_config(x.shape[2], log_a.shape[0], scan_config_dict(config))
    h0c = h0.contiguous() if h0 is not None else None  # read in its own dtype: no fp32 copy
    h, fin, _ = _ltc_launch(x.contiguous(), log_a.contiguous(), h0c, False, cfg, _fo_fin_dtype(x))
    return h, fin


def _lti_tp_fake(x, log_a, h0, config):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[2]), dtype=_fo_fin_dtype(x))


def _lti_tp_setup(ctx, inputs, output):
    x, log_a, h0, config = inputs
    ref = not _fo_use_triton(x)
    ctx.config = config
    # an unused final state then comes to the backward as None, not as a zero-filled (B, D) launch
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(log_a, x if ref else None, None if ref else output[0], h0)


def _lti_tp_backward(ctx, dh, dfin):
    log_a, x, h, h0 = ctx.saved_tensors
    if dh is None:  # only the final state was used: the kernel reads dL/dh everywhere
        dh = torch.zeros_like(h if h is not None else x)
    need_a = ctx.needs_input_grad[1]
    dla, dx, dh0 = _lti_tp_bwd_op(log_a, x, h, h0, dh, dfin, need_a, ctx.config)
    return dx, (dla if need_a else None), scan_opt(dh0), None


def _lti_tp_bwd_impl(log_a, x, h, h0, dh, dfin, need_a, config):
    if x is not None:
        fwd = lambda log_a, x, h0: _lti_tp_impl(x, log_a, h0, config)  # noqa: E731
        return tuple(scan_ref_vjp(fwd, [log_a, x, h0], [dh, dfin]))
    cfg = lti_toeplitz_config(h.shape[2], log_a.shape[0], scan_config_dict(config))
    h0c = h0.contiguous() if h0 is not None and need_a else None
    dfin = dfin.contiguous() if dfin is not None else None
    fin_dtype = h0.dtype if h0 is not None else None
    hp = h if need_a else None
    dx, dh0, part = _ltc_launch(dh.contiguous(), log_a.contiguous(), dfin, True, cfg, fin_dtype, hp=hp, h0=h0c)
    dla = part.sum(1).to(log_a.dtype) if need_a else scan_none(dh)
    return dla, dx, dh0 if h0 is not None else scan_none(dh)


def _lti_tp_bwd_fake(log_a, x, h, h0, dh, dfin, need_a, config):
    dla = log_a.new_empty(log_a.shape) if need_a or x is not None else scan_none(dh)
    return dla, dh.new_empty(dh.shape), h0.new_empty(h0.shape) if h0 is not None else scan_none(dh)


_lti_tp_bwd_op = scan_op(
    "lti_toeplitz_bwd",
    "(Tensor log_a, Tensor? x, Tensor? h, Tensor? h0, Tensor dh, Tensor? dfin, bool need_a, str config)"
    " -> (Tensor, Tensor, Tensor)",
    _lti_tp_bwd_impl,
    _lti_tp_bwd_fake,
)
_lti_tp_op = scan_op(
    "lti_toeplitz",
    "(Tensor x, Tensor log_a, Tensor? h0, str config) -> (Tensor, Tensor)",
    _lti_tp_impl,
    _lti_tp_fake,
    _lti_tp_backward,
    _lti_tp_setup,
)


def first_order_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
    config: dict | None = None,
):
    """h_t = a_t * h_{t-1} + b_t. a, b: (B, T, D) real (bf16/fp32); h0: (B, D). Returns h (B, T, D) in b's dtype
    [and the final state (B, D) in fp32]. State and accumulation are fp32; any T. One op (ssm_golf::fo_scan)."""
    if b.dim() != 3:
        raise ValueError(f"first_order_scan: b must be (B, T, D), got shape {tuple(b.shape)}")
    _fo_check("first_order_scan: a", a, b.shape)
    if h0 is not None:
        _fo_check("first_order_scan: h0", h0, (b.shape[0], b.shape[2]))
    h, fin = _fo_scan_op(a, b, h0, 0, scan_config_str(config))
    return (h, fin) if return_final_state else h


def first_order_scan_complex(
    a_re: torch.Tensor,
    a_im: torch.Tensor,
    b_re: torch.Tensor,
    b_im: torch.Tensor,
    h0: tuple | None = None,
    return_final_state: bool = False,
    config: dict | None = None,
):
    """Complex h_t = a_t h_{t-1} + b_t with every complex tensor given as (re, im) real tensors of shape (B, T, D);
    the decay may also be constant, one per channel (a_re, a_im of shape (D,)): it is then read once per program,
    never expanded, and its gradient is summed inside the kernel. h0 is a pair (re, im) of (B, D). Returns
    (h_re, h_im) [and the final state as a pair of fp32 (B, D)]. One op (ssm_golf::fo_cscan)."""
    if b_re.dim() != 3:
        raise ValueError(f"first_order_scan_complex: b_re must be (B, T, D), got shape {tuple(b_re.shape)}")
    decay_shape = (b_re.shape[2],) if a_re.dim() == 1 else b_re.shape
    for name, x in (("a_re", a_re), ("a_im", a_im), ("b_im", b_im)):
        _fo_check(f"first_order_scan_complex: {name}", x, b_re.shape if name == "b_im" else decay_shape)
    if h0 is not None:
        if len(h0) != 2:
            raise ValueError("first_order_scan_complex: h0 must be a pair (h0_re, h0_im)")
        for x in h0:
            _fo_check("first_order_scan_complex: h0", x, (b_re.shape[0], b_re.shape[2]))
    h0r, h0i = (h0[0], h0[1]) if h0 is not None else (None, None)
    hr, hi, fr, fi = _fo_cscan_op(a_re, a_im, b_re, b_im, h0r, h0i, scan_config_str(config))
    return (hr, hi, (fr, fi)) if return_final_state else (hr, hi)


def _fo_expand_decay(log_a: torch.Tensor, D: int) -> torch.Tensor:
    """LTI shape rule: log_a is (D,) per channel, or (H,) per head with D % H == 0, head h owning channels
    [h * D // H, (h + 1) * D // H)."""
    if log_a.dim() != 1 or D % log_a.shape[0] != 0:
        raise ValueError(f"lti_scan: log_a must be (D,) or (H,) with D % H == 0; got {tuple(log_a.shape)} for D={D}")
    return log_a.float().repeat_interleave(D // log_a.shape[0])


def lti_scan_ref(x: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None, return_final_state=False):
    """Sequential reference of the LTI scan h_t = exp(log_a) * h_{t-1} + x_t."""
    a = torch.exp(_fo_expand_decay(log_a, x.shape[2]).to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    return first_order_scan_ref(a.expand(x.shape), x, h0, return_final_state)


def lti_scan(
    x: torch.Tensor,
    log_a: torch.Tensor,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
    config: dict | None = None,
):
    """Linear time-invariant scan h_t = exp(log_a) * h_{t-1} + x_t; x (B, T, D), log_a (D,) or (H,) per head
    (see `_fo_expand_decay`), h0 (B, D). Reads the decay once per program: the bytes of a copy.
    config={"method": "toeplitz"} runs per-head decays as chunked Toeplitz matrix products on tensor cores
    (templates/scan/lti_chunked.py), one op (ssm_golf::lti_toeplitz) that reads log_a itself; per-channel decays
    and narrow heads keep the scan, one op (ssm_golf::fo_scan with constant decays) with the exp of the decays as
    PyTorch around it."""
    if x.dim() != 3:
        raise ValueError(f"lti_scan: x must be (B, T, D), got shape {tuple(x.shape)}")
    if h0 is not None:
        _fo_check("lti_scan: h0", h0, (x.shape[0], x.shape[2]))
    if log_a.dim() != 1 or x.shape[2] % log_a.shape[0] != 0:
        _fo_expand_decay(log_a, x.shape[2])  # raises with the shape rule
    if config and config.get("method") == "toeplitz" and lti_toeplitz_block(x.shape[2], log_a.shape[0]):
        h, fin = _lti_tp_op(x, log_a, h0, scan_config_str(config))
    else:
        a = torch.exp(log_a.to(_fo_fin_dtype(x)))  # one decay per head: the op expands it where a kernel needs it
        h, fin = _fo_scan_op(a, x, h0, log_a.shape[0], scan_config_str(config))
    return (h, fin) if return_final_state else h
