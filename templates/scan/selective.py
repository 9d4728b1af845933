"""Selective scan (Mamba-1) in Triton: per (channel, state) decay exp(dt * A), input-dependent B and C, D skip,
optional z gate, dt = softplus(delta + bias) fused; forward and backward.

A program owns (one sequence, BD channels, all N states) with the state h [BD, N] in fp32 registers and walks time
in tiles of BT steps, scanning each [BT, BD, N] tile with `tl.associative_scan`. The state reaches HBM only at tile
ends (checkpoints for the backward, and the optional final state). The backward walks the tiles in reverse: it
recomputes h from the checkpoint, then runs the adjoint recurrence lambda_t = C_t dy_t + a_{t+1} lambda_{t+1}
(a reverse scan whose shifted decay comes either from a second exp, or, without one, from a scan that carries each
segment's first decay) and forms every gradient from the tile. dB and dC are summed over channel blocks with fp32
atomics; dA, dD and the bias gradient are written per sequence and summed afterwards. `selective_scan_ref` is the
sequential PyTorch reference (float64-capable) used on machines without CUDA.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _sel_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _sel_rev_combine(f_later, p_later, l_later, f_early, p_early, l_early):
    # Segments as (first decay, product of the decays after the first, adjoint sum); reverse scans pass the later
    # segment first. Joining early + later: the later sum enters through the early product and the later first decay.
    return f_early, p_early * f_later * p_later, l_early + p_early * f_later * l_later


@triton.jit
def _sel_softplus(x):
    # log1p(e) without libdevice: log(w) * e / (w - 1) with w = 1 + e keeps the precision for small e
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    return tl.where(x > 20.0, x, tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0))))


@triton.jit
def _sel_fwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    out_ptr,
    ck_ptr,
    fin_ptr,
    T,
    DM,
    N,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE_CK: tl.constexpr,
    STORE_FIN: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    md = cols < DM
    mn = ns < N
    mdn = md[:, None] & mn[None, :]
    A2 = tl.load(A_ptr + cols[:, None] * N + ns[None, :], mask=mdn, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=md, other=0.0).to(tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + cols, mask=md, other=0.0).to(tl.float32)
    state_off = pid_b * DM * N + cols[:, None] * N + ns[None, :]
    if HAS_H0:
        carry = tl.load(h0_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BD, BN], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BT)
    for k in range(0, n_tiles):
        t = k * BT + rows
        mt = t < T
        m2 = mt[:, None] & md[None, :]
        mtn = mt[:, None] & mn[None, :]
        off = pid_b * T * DM + t.to(tl.int64)[:, None] * DM + cols[None, :]
        offn = pid_b * T * N + t.to(tl.int64)[:, None] * N + ns[None, :]
        u = tl.load(u_ptr + off, mask=m2, other=0.0).to(tl.float32)
        dt = tl.load(dl_ptr + off, mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[None, :]
        if SOFTPLUS:
            dt = _sel_softplus(dt)
        dt = tl.where(m2, dt, 0.0)
        bt = tl.load(B_ptr + offn, mask=mtn, other=0.0).to(tl.float32)
        ct = tl.load(C_ptr + offn, mask=mtn, other=0.0).to(tl.float32)
        a = tl.math.exp2(dt[:, :, None] * A2[None, :, :])
        bx = (dt * u)[:, :, None] * bt[:, None, :]
        pa, pb = tl.associative_scan((a, bx), 0, _sel_combine)
        h = pb + pa * carry[None, :, :]
        y = tl.sum(h * ct[:, None, :], axis=2)
        if HAS_D:
            y += dskip[None, :] * u
        if HAS_Z:
            z = tl.load(z_ptr + off, mask=m2, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m2)
        carry = tl.sum(tl.where(rows[:, None, None] == BT - 1, h, 0.0), axis=0)
        if SAVE_CK:
            ck_off = (pid_b * n_tiles + k) * DM * N + cols[:, None] * N + ns[None, :]
            tl.store(ck_ptr + ck_off, carry, mask=mdn)
    if STORE_FIN:
        tl.store(fin_ptr + state_off, carry, mask=mdn)


@triton.jit
def _sel_bwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    ck_ptr,
    do_ptr,
    dfin_ptr,
    du_ptr,
    ddl_ptr,
    dz_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    dbias_ptr,
    dh0_ptr,
    T,
    DM,
    N,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DFIN: tl.constexpr,
    SHIFT_MODE: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    md = cols < DM
    mn = ns < N
    mdn = md[:, None] & mn[None, :]
    A_nat = tl.load(A_ptr + cols[:, None] * N + ns[None, :], mask=mdn, other=0.0).to(tl.float32)
    A2 = A_nat * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=md, other=0.0).to(tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + cols, mask=md, other=0.0).to(tl.float32)
    state_off = pid_b * DM * N + cols[:, None] * N + ns[None, :]
    if HAS_H0:
        h0v = tl.load(h0_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    # lam_c: SHIFT_MODE 0 carries lambda at the first row of the later tile, SHIFT_MODE 1 carries a * lambda there.
    if HAS_DFIN:
        lam_c = tl.load(dfin_ptr + state_off, mask=mdn, other=0.0).to(tl.float32)
    else:
        lam_c = tl.zeros([BD, BN], dtype=tl.float32)
    dh0_acc = tl.zeros([BD, BN], dtype=tl.float32)
    dA_acc = tl.zeros([BD, BN], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BT)
    for kk in range(0, n_tiles):
        k = n_tiles - 1 - kk
        t = k * BT + rows
        mt = t < T
        m2 = mt[:, None] & md[None, :]
        mtn = mt[:, None] & mn[None, :]
        off = pid_b * T * DM + t.to(tl.int64)[:, None] * DM + cols[None, :]
        offn = pid_b * T * N + t.to(tl.int64)[:, None] * N + ns[None, :]
        u = tl.load(u_ptr + off, mask=m2, other=0.0).to(tl.float32)
        dt_raw = tl.load(dl_ptr + off, mask=m2, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_raw += bias[None, :]
        if SOFTPLUS:
            dt = _sel_softplus(dt_raw)
            ddt_scale = tl.where(dt_raw > 20.0, 1.0, tl.sigmoid(dt_raw))
        else:
            dt = dt_raw
        dt = tl.where(m2, dt, 0.0)
        bt = tl.load(B_ptr + offn, mask=mtn, other=0.0).to(tl.float32)
        ct = tl.load(C_ptr + offn, mask=mtn, other=0.0).to(tl.float32)
        dout = tl.load(do_ptr + off, mask=m2, other=0.0).to(tl.float32)
        # recompute the tile's states from the checkpoint before the tile
        ck_off = (pid_b * n_tiles + k - 1) * DM * N + cols[:, None] * N + ns[None, :]
        k_vec = tl.full([BD, BN], 0, tl.int32) + k
        h_start = tl.load(ck_ptr + ck_off, mask=mdn & (k_vec > 0), other=0.0)
        if HAS_H0:
            h_start += tl.where(k_vec == 0, h0v, 0.0)
        a = tl.math.exp2(dt[:, :, None] * A2[None, :, :])
        dtu = dt * u
        bx = dtu[:, :, None] * bt[:, None, :]
        pa, pb = tl.associative_scan((a, bx), 0, _sel_combine)
        h = pb + pa * h_start[None, :, :]
        if HAS_Z:
            y = tl.sum(h * ct[:, None, :], axis=2)
            if HAS_D:
                y += dskip[None, :] * u
            z = tl.load(z_ptr + off, mask=m2, other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            dy = dout * z * sz
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
        else:
            dy = dout
        dy = tl.where(m2, dy, 0.0)
        g = ct[:, None, :] * dy[:, :, None]
        if SHIFT_MODE == 0:
            tn = t + 1
            mn2 = (tn < T)[:, None] & md[None, :]
            dtn = tl.load(dl_ptr + off + DM, mask=mn2, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dtn += bias[None, :]
            if SOFTPLUS:
                dtn = _sel_softplus(dtn)
            dtn = tl.where(mn2, dtn, 0.0)
            a_next = tl.math.exp2(dtn[:, :, None] * A2[None, :, :])
            pn, rl = tl.associative_scan((a_next, g), 0, _sel_combine, reverse=True)
            lam = rl + pn * lam_c[None, :, :]
            lam_c = tl.sum(tl.where(rows[:, None, None] == 0, lam, 0.0), axis=0)
            if HAS_H0:
                dh0_acc = tl.sum(tl.where(rows[:, None, None] == 0, a * lam, 0.0), axis=0)
        else:
            ones = tl.full([BT, BD, BN], 1.0, tl.float32)
            _f, pex, ls = tl.associative_scan((a, ones, g), 0, _sel_rev_combine, reverse=True)
            lam = ls + pex * lam_c[None, :, :]
            lam_c = tl.sum(tl.where(rows[:, None, None] == 0, a * lam, 0.0), axis=0)
        hb = h - bx
        lb = tl.sum(lam * bt[:, None, :], axis=2)
        lh = lam * hb
        du = dt * lb
        if HAS_D:
            du += dskip[None, :] * dy
            dD_acc += tl.sum(dy * u, axis=0)
        ddt = tl.sum(lh * A_nat[None, :, :], axis=2) + u * lb
        if SOFTPLUS:
            ddt = ddt * ddt_scale
        ddt = tl.where(m2, ddt, 0.0)
        tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddl_ptr + off, ddt.to(ddl_ptr.dtype.element_ty), mask=m2)
        dA_acc += tl.sum(lh * dt[:, :, None], axis=0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddt, axis=0)
        dB_t = tl.sum(lam * dtu[:, :, None], axis=1)
        dC_t = tl.sum(h * dy[:, :, None], axis=1)
        tl.atomic_add(dB_ptr + offn, dB_t, mask=mtn)
        tl.atomic_add(dC_ptr + offn, dC_t, mask=mtn)
    tl.store(dA_ptr + state_off, dA_acc, mask=mdn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * DM + cols, dD_acc, mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * DM + cols, dbias_acc, mask=md)
    if HAS_H0:
        if SHIFT_MODE == 0:
            tl.store(dh0_ptr + state_off, dh0_acc, mask=mdn)
        else:
            tl.store(dh0_ptr + state_off, lam_c, mask=mdn)


def _sel_use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; the PyTorch reference otherwise."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _sel_config(DM: int, N: int, config: dict | None) -> dict:
    """Tile sizes: BT time steps x BD channels x all N states per program; SHIFT_MODE picks the backward's
    source of the shifted decay (0: a second exp, 1: a three-way scan). The default keeps 16 elements of each
    [BT, BD, N] tile per thread (time in-thread, N across lanes): at N = 16 the backward then needs 168 registers
    and no spills on sm_90, where BT = 32 or BD = 16 spill (ptxas resource usage of the Triton build)."""
    bn = triton.next_power_of_2(N)
    cfg = {"BT": 16, "BD": max(1, min(32, 2048 // (16 * bn))), "BN": bn, "num_warps": 4, "SHIFT_MODE": 1}
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg.update(BT=16, BD=4)
    if config:
        cfg.update(config)
    cfg["BD"] = min(cfg["BD"], triton.next_power_of_2(DM))
    return cfg


class _SelScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, h0, save, cfg):
        u, delta, B, C = (x.contiguous() for x in (u, delta, B, C))
        A = A.float().contiguous()
        D = D.float().contiguous() if D is not None else None
        z = z.contiguous() if z is not None else None
        bias = delta_bias.float().contiguous() if delta_bias is not None else None
        h0c = h0.float().contiguous() if h0 is not None else None
        Bsz, T, DM = u.shape
        N = A.shape[1]
        n_tiles = triton.cdiv(T, cfg["BT"])
        out = torch.empty_like(u)
        fin = torch.empty((Bsz, DM, N), device=u.device, dtype=torch.float32)
        ck = torch.empty((Bsz, n_tiles, DM, N), device=u.device, dtype=torch.float32) if save else fin
        grid = (Bsz, triton.cdiv(DM, cfg["BD"]))
        _sel_fwd_kernel[grid](
            u, delta, A, B, C,
            D if D is not None else A, z if z is not None else u, bias if bias is not None else A,
            h0c if h0c is not None else fin, out, ck, fin,
            T, DM, N,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            HAS_H0=h0c is not None, SAVE_CK=save, STORE_FIN=True,
            BT=cfg["BT"], BD=cfg["BD"], BN=cfg["BN"], num_warps=cfg["num_warps"],
        )  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, h0c, ck if save else None)
        ctx.softplus, ctx.cfg = softplus, cfg
        ctx.dtypes = (B.dtype, C.dtype, h0.dtype if h0 is not None else None)
        return out, fin

    @staticmethod
    def backward(ctx, dout, dfin):
        u, delta, A, B, C, D, z, bias, h0c, ck = ctx.saved_tensors
        if ck is None:
            raise RuntimeError("selective_scan: backward needs the checkpoints; run the forward with grad enabled")
        cfg = ctx.cfg
        Bsz, T, DM = u.shape
        N = A.shape[1]
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        dfin = dfin.float().contiguous() if dfin is not None else None
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.empty((Bsz, DM, N), device=u.device, dtype=torch.float32)
        dB = torch.zeros((Bsz, T, N), device=u.device, dtype=torch.float32)
        dC = torch.zeros((Bsz, T, N), device=u.device, dtype=torch.float32)
        dD = torch.empty((Bsz, DM), device=u.device, dtype=torch.float32) if D is not None else None
        dbias = torch.empty((Bsz, DM), device=u.device, dtype=torch.float32) if bias is not None else None
        dh0 = torch.empty((Bsz, DM, N), device=u.device, dtype=torch.float32) if h0c is not None else None
        grid = (Bsz, triton.cdiv(DM, cfg["BD"]))
        _sel_bwd_kernel[grid](
            u, delta, A, B, C,
            D if D is not None else A, z if z is not None else u, bias if bias is not None else A,
            h0c if h0c is not None else dA, ck, dout, dfin if dfin is not None else dA,
            du, ddelta, dz if dz is not None else du, dA, dB, dC,
            dD if dD is not None else dA, dbias if dbias is not None else dA, dh0 if dh0 is not None else dA,
            T, DM, N,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=ctx.softplus,
            HAS_H0=h0c is not None, HAS_DFIN=dfin is not None, SHIFT_MODE=cfg["SHIFT_MODE"],
            BT=cfg["BT"], BD=cfg["BD"], BN=cfg["BN"], num_warps=cfg["num_warps"],
        )  # fmt: skip
        b_dtype, c_dtype, h0_dtype = ctx.dtypes
        return (
            du,
            ddelta,
            dA.sum(0),
            dB.to(b_dtype),
            dC.to(c_dtype),
            dD.sum(0) if dD is not None else None,
            dz,
            dbias.sum(0) if dbias is not None else None,
            None,
            dh0.to(h0_dtype) if dh0 is not None else None,
            None,
            None,
        )


def _sel_check(u, delta, A, B, C, D, z, delta_bias, h0) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (B, T, Dm), got shape {tuple(u.shape)}")
    Bsz, T, DM = u.shape
    if A.dim() != 2 or A.shape[0] != DM:
        raise ValueError(f"selective_scan: A must be (Dm={DM}, N), got shape {tuple(A.shape)}")
    N = A.shape[1]
    expected = {"delta": (delta, (Bsz, T, DM)), "B": (B, (Bsz, T, N)), "C": (C, (Bsz, T, N))}
    expected.update({"D": (D, (DM,)), "z": (z, (Bsz, T, DM)), "delta_bias": (delta_bias, (DM,))})
    expected["h0"] = (h0, (Bsz, DM, N))
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(x.shape)}")


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Sequential reference of the selective scan; float32 math (float64 when u is float64), output in u's dtype."""
    _sel_check(u, delta, A, B, C, D, z, delta_bias, h0)
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    uf, dt, Bf, Cf, Af = u.to(cdt), delta.to(cdt), B.to(cdt), C.to(cdt), A.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)
    if delta_softplus:
        dt = F.softplus(dt)
    h = h0.to(cdt) if h0 is not None else uf.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * Af) * h + (dt[:, t] * uf[:, t])[:, :, None] * Bf[:, t, None, :]
        ys.append((h * Cf[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.to(cdt) * uf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(u.dtype)
    if return_final_state:
        return y, (h if cdt == torch.float64 else h.float())
    return y


@torch.compiler.disable
def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
    config: dict | None = None,
):
    """Mamba-1 selective scan. u, delta, z: (B, T, Dm); A: (Dm, N) (negative reals); B, C: (B, T, N) (one group);
    D, delta_bias: (Dm,); h0: (B, Dm, N). dt = softplus(delta + delta_bias); h_t = exp(dt A) h_{t-1} + dt u_t B_t;
    y = C_t h_t + D u, times silu(z). Returns y (B, T, Dm) in u's dtype [and the final state (B, Dm, N), fp32]."""
    _sel_check(u, delta, A, B, C, D, z, delta_bias, h0)
    if not _sel_use_triton(u):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, return_final_state)
    inputs = (u, delta, A, B, C, D, z, delta_bias, h0)
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    cfg = _sel_config(u.shape[2], A.shape[1], config)
    y, fin = _SelScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), h0, save, cfg)
    return (y, fin) if return_final_state else y
