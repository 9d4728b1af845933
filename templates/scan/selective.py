"""Selective scan (Mamba-1) in Triton: per (channel, state) decay exp(dt * A), input-dependent B and C, D skip,
optional z gate, dt = softplus(delta + bias) fused; forward and backward.

Both kernels walk time one step at a time. A program owns one sequence and BD channels with all N states, and keeps
the state as an fp32 [N, BD] register tile; each step loads the step's [BD] rows of u, delta, z (and dout) and the
[N] rows of B and C, issued one step ahead so that their latency overlaps the previous step's arithmetic. The
forward reads through int32 offsets from the sequence's base pointers with clamped indices and no masks (padded
states get B = 0, which keeps them out of every sum; only stores are masked). The backward keeps 64-bit offsets and
masked prefetches: the branch that gave it the forward's addressing (h-sel3) was 12% slower on an H100 at ttsm's
segmented shape although its offline figures were better everywhere, and the cause is not known yet. The time
dependence is a single multiply-add per state per step, so there is no scan tree and no layout shuffling of tiles;
the parallelism is batch x channel blocks (32 channels per one-warp program by default).

Forward: h_t = exp2(dt_t A log2e) h_{t-1} + dt_t u_t B_t, y_t = sum_n C_t h_t (+ D u_t, times silu(z_t)). With grad
enabled the state is written every CK steps (chunk checkpoints, fp32).

Backward: chunks of CK steps in reverse, two sweeps per chunk and no per-step state in memory.
* Reverse sweep: the adjoint lambda_t = C_t dy_t + a_{t+1} lambda_{t+1} needs no forward state. It gives du, dB
  (summed over the program's channels, then one fp32 atomic per (step, state) per program), dD, and the
  lambda-dependent parts of ddt and dA.
* Forward sweep: h is recomputed from the checkpoint. It gives y (for dz), dC (atomics as for dB), and the rest of
  ddt and dA.
Both ddt and dA need g_t = lambda_t w_t with w_t = a_t h_{t-1} (the gradient of the log-decay), which pairs a future
quantity with a past one. The identity g_{t+1} = g_t + mu_t x_t - (C_t dy_t) w_t (mu_t = a_{t+1} lambda_{t+1},
x_t = dt u B_t) splits it into an adjoint part and a state part; each vanishes with the decay, so strong decays
cancel no large terms. The reverse sweep writes its per-channel part to a small per-program scratch ([CK, BD] fp32,
which stays in cache). The forward sweep starts from the exact g at the chunk start (the carried mu times the
checkpoint) and adds its own part. The running sums therefore restart every chunk, and nothing is ever divided by a
decay that may have underflowed to 0. dA, dD and the bias gradient are written per sequence and summed afterwards;
dh0 is the carried mu at the first step.

`selective_scan_ref` is the sequential PyTorch reference (float64-capable), used on machines without CUDA.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from templates.scan.ops import scan_config_dict, scan_config_str, scan_none, scan_op, scan_opt, scan_ref_vjp


@triton.jit
def _sel_rcp(x, ASM: tl.constexpr):
    # 1 / x as the hardware's approximate reciprocal (one instruction; the rounded division is about eight). Used
    # only where x >= 1 (never a denormal, so flushing them changes nothing). The interpreter divides.
    if ASM:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def _sel_softplus(x, ASM: tl.constexpr):
    # softplus(x) and its derivative sigmoid(x) from one exp and one reciprocal: with e = exp(x), w = 1 + e rounded
    # and d = (w - 1) - e its rounding error, log1p(e) = log(w) - d / w to first order in d (exact to the last bit
    # of fp32; for e below 2^-24, w = 1 and the result is e). On the GPU (ASM) the logarithm is the hardware's lg2
    # (a few ulp) and 1 / w the approximate reciprocal. The interpreter runs no inline assembly: tl.math.log2 and a
    # division.
    e = tl.math.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    w = 1.0 + e
    r = _sel_rcp(w, ASM)
    if ASM:
        lg = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [w], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lg = tl.math.log2(w)
    sp = lg * 0.6931471805599453 - ((w - 1.0) - e) * r
    return tl.where(x > 20.0, x, sp), e * r


@triton.jit
def _sel_sigmoid(z, ASM: tl.constexpr):
    return _sel_rcp(1.0 + tl.math.exp2(z * -1.4426950408889634), ASM)


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
    hl_ptr,
    ds_ptr,
    T,
    DM,
    N,
    LS,
    NSEG,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE_CK: tl.constexpr,
    LOCAL: tl.constexpr,
    CARRY_IN: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    ASM: tl.constexpr,
    CK: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Program (sequence, channel block, segment of LS steps). LOCAL: the segment from a zero state, storing only
    its end state (hl) and its sum of dt (ds). Otherwise y (and checkpoints), from h0 carried through the earlier
    segments' summaries when CARRY_IN: h <- exp(A sum dt) h + hl, one step per earlier segment.
    The step loop reads through int32 offsets from the sequence's base pointers with clamped channel and state
    indices and a clamped next step, so its loads need no masks; padded states get B = 0 (EVEN_N false), which
    keeps their h at 0, and padded channels are only stored through masks."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2)
    n_seg = NSEG  # the LOCAL pass runs the first NSEG - 1 segments only
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    md = cols < DM
    mn = ns < N
    mnd = mn[:, None] & md[None, :]
    # clamped indices for the loads (a clamp would cost the B and C rows their vector loads)
    colc = cols if EVEN_D else tl.minimum(cols, DM - 1)
    nsc = ns if EVEN_N else tl.minimum(ns, N - 1)
    # the state is held transposed, [N, BD], N contiguous as A, h0 and the checkpoints are stored
    s_off = ns[:, None] + cols[None, :] * N
    A2 = tl.load(A_ptr + s_off, mask=mnd, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + colc).to(tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + colc).to(tl.float32)
    st_off = pid_b * DM * N + s_off
    if HAS_H0 and not LOCAL:
        h = tl.load(h0_ptr + st_off, mask=mnd, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BN, BD], dtype=tl.float32)
    if CARRY_IN:
        for j in range(0, seg):
            sj = pid_b * n_seg + j
            dsj = tl.load(ds_ptr + sj * DM + cols, mask=md, other=0.0)
            h = tl.math.exp2(dsj[None, :] * A2) * h + tl.load(hl_ptr + sj * DM * N + s_off, mask=mnd, other=0.0)
    if LOCAL:
        dsum = tl.zeros([BD], dtype=tl.float32)
    # the sequence's rows; offsets within a sequence are int32
    u_ptr += pid_b * T * DM
    dl_ptr += pid_b * T * DM
    z_ptr += pid_b * T * DM
    out_ptr += pid_b * T * DM
    B_ptr += pid_b * T * N
    C_ptr += pid_b * T * N
    t_start = seg * LS
    t_end = tl.minimum(t_start + LS, T)
    po = t_start * DM + colc
    pn = t_start * N + nsc
    # step t's inputs are loaded during step t - 1 (a software pipeline of depth one); the last step reloads itself
    u_n = tl.load(u_ptr + po).to(tl.float32)
    dl_n = tl.load(dl_ptr + po).to(tl.float32)
    b_n = tl.load(B_ptr + pn).to(tl.float32)
    if not LOCAL:
        c_n = tl.load(C_ptr + pn).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po).to(tl.float32)
    n_ck = tl.cdiv(T, CK)
    for t in range(t_start, t_end):
        u = u_n
        dt = dl_n
        bt = b_n
        nd = tl.where(t + 1 < t_end, DM, 0)
        nn = tl.where(t + 1 < t_end, N, 0)
        u_n = tl.load(u_ptr + (po + nd)).to(tl.float32)
        dl_n = tl.load(dl_ptr + (po + nd)).to(tl.float32)
        b_n = tl.load(B_ptr + (pn + nn)).to(tl.float32)
        if not LOCAL:
            ct = c_n
            c_n = tl.load(C_ptr + (pn + nn)).to(tl.float32)
            if HAS_Z:
                zt = z_n
                z_n = tl.load(z_ptr + (po + nd)).to(tl.float32)
        if not EVEN_N:
            bt = tl.where(mn, bt, 0.0)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt, _sg = _sel_softplus(dt, ASM)
        a = tl.math.exp2(dt[None, :] * A2)
        h = a * h + bt[:, None] * (dt * u)[None, :]
        if LOCAL:
            dsum += dt
        else:
            y = tl.sum(h * ct[:, None], axis=0)
            if HAS_D:
                y += dskip * u
            if HAS_Z:
                y = y * zt * _sel_sigmoid(zt, ASM)
            tl.store(out_ptr + po, y.to(out_ptr.dtype.element_ty), mask=md)
            if SAVE_CK:
                if t % CK == CK - 1:
                    tl.store(ck_ptr + (pid_b * n_ck + t // CK) * DM * N + s_off, h, mask=mnd)
        po += DM
        pn += N
    if LOCAL:
        sl = pid_b * n_seg + seg
        tl.store(hl_ptr + sl * DM * N + s_off, h, mask=mnd)
        tl.store(ds_ptr + sl * DM + cols, dsum, mask=md)
    elif seg == n_seg - 1:
        tl.store(fin_ptr + st_off, h, mask=mnd)


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
    q_ptr,
    du_ptr,
    ddl_ptr,
    dz_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    dbias_ptr,
    dh0_ptr,
    ml_ptr,
    ds_ptr,
    T,
    DM,
    N,
    LS,
    NSEG,
    SEG0,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DFIN: tl.constexpr,
    LOCAL: tl.constexpr,
    CARRY_IN: tl.constexpr,
    ASM: tl.constexpr,
    CK: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Program (sequence, channel block, segment SEG0 + program_id(2) of LS steps). LOCAL: the adjoint over the
    segment from zero, storing only mu at its first step (ml) and its sum of dt (ds). Otherwise every gradient of
    the segment, with mu entering from the later segments' summaries when CARRY_IN: mu <- exp(A sum dt) mu + ml."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2) + SEG0
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    md = cols < DM
    mn = ns < N
    mnd = mn[:, None] & md[None, :]
    s_off = ns[:, None] + cols[None, :] * N
    # one [N, BD] tile of A: the exponents scale the per-channel dt by log2(e) instead of keeping a second A tile
    A_nat = tl.load(A_ptr + s_off, mask=mnd, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=md, other=0.0).to(tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + cols, mask=md, other=0.0).to(tl.float32)
    st_off = pid_b * DM * N + s_off
    if HAS_H0:
        h0v = tl.load(h0_ptr + st_off, mask=mnd, other=0.0).to(tl.float32)
    # mu = a_{t+1} lambda_{t+1}, the adjoint carried into step t from the right (dfin at the end)
    if HAS_DFIN and not LOCAL:
        mu = tl.load(dfin_ptr + st_off, mask=mnd, other=0.0).to(tl.float32)
    else:
        mu = tl.zeros([BN, BD], dtype=tl.float32)
    row = pid_b * T * DM + cols
    rown = pid_b * T * N + ns
    if LOCAL:
        t_start = seg * LS
        t_end = tl.minimum(t_start + LS, T)
        dsum = tl.zeros([BD], dtype=tl.float32)
        po = row + (t_end - 1).to(tl.int64) * DM
        pn = rown + (t_end - 1).to(tl.int64) * N
        dl_n = tl.load(dl_ptr + po, mask=md, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + po, mask=md, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po, mask=md, other=0.0).to(tl.float32)
        for i in range(0, t_end - t_start):
            dt = dl_n
            dout = do_n
            ct = c_n
            if HAS_Z:
                zt = z_n
            nxt = tl.zeros([BD], dtype=tl.int32) + i + 1 < t_end - t_start
            nxn = tl.zeros([BN], dtype=tl.int32) + i + 1 < t_end - t_start
            dl_n = tl.load(dl_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            do_n = tl.load(do_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            c_n = tl.load(C_ptr + pn - N, mask=mn & nxn, other=0.0).to(tl.float32)
            if HAS_Z:
                z_n = tl.load(z_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt, _sg = _sel_softplus(dt, ASM)
            if HAS_Z:
                dy = dout * zt * _sel_sigmoid(zt, ASM)
            else:
                dy = dout
            mu = tl.math.exp2((dt * 1.4426950408889634)[None, :] * A_nat) * (ct[:, None] * dy[None, :] + mu)
            dsum += dt
            po -= DM
            pn -= N
        sl = pid_b * NSEG + seg
        tl.store(ml_ptr + sl * DM * N + s_off, mu, mask=mnd)
        tl.store(ds_ptr + sl * DM + cols, dsum, mask=md)
        return
    if CARRY_IN:
        for jj in range(0, NSEG - 1 - seg):
            sj = pid_b * NSEG + NSEG - 1 - jj
            dsj = tl.load(ds_ptr + sj * DM + cols, mask=md, other=0.0)
            mu = tl.math.exp2((dsj * 1.4426950408889634)[None, :] * A_nat) * mu + tl.load(
                ml_ptr + sj * DM * N + s_off, mask=mnd, other=0.0
            )
    dA_acc = tl.zeros([BN, BD], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    # this program's scratch row block: CK x BD fp32, written by the reverse sweep, read by the forward sweep
    q_base = ((pid_b * tl.num_programs(1) + pid_d) * NSEG + seg) * CK * BD + tl.arange(0, BD)
    n_ck = tl.cdiv(T, CK)
    c_lo = seg * (LS // CK)
    c_hi = tl.minimum(c_lo + LS // CK, n_ck)
    for kk in range(0, c_hi - c_lo):
        c = c_hi - 1 - kk
        t0 = c * CK
        L = tl.minimum(T - t0, CK)
        # ---- reverse sweep over the chunk: the adjoint, du, dB, and the lambda-side parts of ddt and dA ----
        dsuf = tl.zeros([BD], dtype=tl.float32)  # sum of dt over the chunk's later steps
        fsuf = tl.zeros([BD], dtype=tl.float32)  # sum over the chunk's steps >= t of f_k = sum_n A lambda x
        po = row + (t0 + L - 1).to(tl.int64) * DM
        pn = rown + (t0 + L - 1).to(tl.int64) * N
        pq = q_base + (L - 1) * BD
        u_n = tl.load(u_ptr + po, mask=md, other=0.0).to(tl.float32)
        dl_n = tl.load(dl_ptr + po, mask=md, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + po, mask=md, other=0.0).to(tl.float32)
        b_n = tl.load(B_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po, mask=md, other=0.0).to(tl.float32)
        for i in range(0, L):
            u = u_n
            dt = dl_n
            dout = do_n
            bt = b_n
            ct = c_n
            if HAS_Z:
                zt = z_n
            nxt = tl.zeros([BD], dtype=tl.int32) + i + 1 < L
            nxn = tl.zeros([BN], dtype=tl.int32) + i + 1 < L
            u_n = tl.load(u_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            dl_n = tl.load(dl_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            do_n = tl.load(do_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            b_n = tl.load(B_ptr + pn - N, mask=mn & nxn, other=0.0).to(tl.float32)
            c_n = tl.load(C_ptr + pn - N, mask=mn & nxn, other=0.0).to(tl.float32)
            if HAS_Z:
                z_n = tl.load(z_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt, _sg = _sel_softplus(dt, ASM)
            dtu = dt * u
            if HAS_Z:
                dy = dout * zt * _sel_sigmoid(zt, ASM)
            else:
                dy = dout
            a = tl.math.exp2((dt * 1.4426950408889634)[None, :] * A_nat)
            # lambda = C dy + mu; the sums over N take the mu part per state and the C dy part through sum_n C B
            mB = mu * bt[:, None]
            lb = tl.sum(mB, axis=0) + dy * tl.sum(ct * bt, axis=0)
            du = dt * lb
            if HAS_D:
                du += dskip * dy
                dD_acc += dy * u
            tl.store(du_ptr + po, du.to(du_ptr.dtype.element_ty), mask=md)
            fsuf += dtu * tl.sum(mB * A_nat, axis=0)
            tl.store(q_ptr + pq, u * lb - fsuf, mask=md)
            dA_acc += mB * (dtu * dsuf)[None, :]
            dsuf += dt
            lam = ct[:, None] * dy[None, :] + mu
            tl.atomic_add(dB_ptr + pn, tl.sum(lam * dtu[None, :], axis=1), mask=mn, sem="relaxed")
            mu = a * lam
            po -= DM
            pn -= N
            pq -= BD
        tl.debug_barrier()
        # ---- forward sweep: recompute h from the checkpoint; y, dz, dC and the h-side parts of ddt and dA ----
        # g_t = lambda_t w_t with w_t = a_t h_{t-1} (the gradient of the log-decay) is exact at the chunk start and
        # moves by g_{t+1} = g_t + mu_t x_t - (C_t dy_t) w_t (mu_t = lambda_t - C_t dy_t, x_t = dt u B_t); the reverse
        # sweep summed the mu part into q and fsuf. Both parts vanish with the decay, so strong decays lose nothing.
        c_vec = tl.full([BN, BD], 0, tl.int32) + c
        h = tl.load(ck_ptr + (pid_b * n_ck + c - 1) * DM * N + s_off, mask=mnd & (c_vec > 0), other=0.0)
        if HAS_H0:
            h += tl.where(c_vec == 0, h0v, 0.0)
        g0 = mu * h
        dA_acc += g0 * dsuf[None, :]
        run = fsuf + tl.sum(g0 * A_nat, axis=0)
        dtot = dsuf
        dpre = tl.zeros([BD], dtype=tl.float32)
        po = row + t0.to(tl.int64) * DM
        pn = rown + t0.to(tl.int64) * N
        pq = q_base
        u_n = tl.load(u_ptr + po, mask=md, other=0.0).to(tl.float32)
        dl_n = tl.load(dl_ptr + po, mask=md, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + po, mask=md, other=0.0).to(tl.float32)
        q_n = tl.load(q_ptr + pq, mask=md, other=0.0)
        b_n = tl.load(B_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po, mask=md, other=0.0).to(tl.float32)
        for i in range(0, L):
            u = u_n
            dt = dl_n
            dout = do_n
            q = q_n
            bt = b_n
            ct = c_n
            if HAS_Z:
                zt = z_n
            nxt = tl.zeros([BD], dtype=tl.int32) + i + 1 < L
            nxn = tl.zeros([BN], dtype=tl.int32) + i + 1 < L
            u_n = tl.load(u_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            dl_n = tl.load(dl_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            do_n = tl.load(do_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            q_n = tl.load(q_ptr + pq + BD, mask=md & nxt, other=0.0)
            b_n = tl.load(B_ptr + pn + N, mask=mn & nxn, other=0.0).to(tl.float32)
            c_n = tl.load(C_ptr + pn + N, mask=mn & nxn, other=0.0).to(tl.float32)
            if HAS_Z:
                z_n = tl.load(z_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt, sg = _sel_softplus(dt, ASM)
            dtu = dt * u
            a = tl.math.exp2((dt * 1.4426950408889634)[None, :] * A_nat)
            w = a * h
            h = w + bt[:, None] * dtu[None, :]
            cw = w * ct[:, None]
            if HAS_Z:
                sz = _sel_sigmoid(zt, ASM)
                dy = dout * zt * sz
                y = tl.sum(cw, axis=0) + dtu * tl.sum(ct * bt, axis=0)
                if HAS_D:
                    y += dskip * u
                dz = dout * y * sz * (1.0 + zt * (1.0 - sz))
                tl.store(dz_ptr + po, dz.to(dz_ptr.dtype.element_ty), mask=md)
            else:
                dy = dout
            ddt = q + run
            if SOFTPLUS:
                ddt = ddt * sg
            tl.store(ddl_ptr + po, ddt.to(ddl_ptr.dtype.element_ty), mask=md)
            if HAS_BIAS:
                dbias_acc += ddt
            run -= dy * tl.sum(cw * A_nat, axis=0)
            dpre += dt
            dA_acc -= cw * (dy * (dtot - dpre))[None, :]
            tl.atomic_add(dC_ptr + pn, tl.sum(h * dy[None, :], axis=1), mask=mn, sem="relaxed")
            po += DM
            pn += N
            pq += BD
        tl.debug_barrier()
    sl = pid_b * NSEG + seg  # dA, dD and the bias gradient per (sequence, segment), summed afterwards
    tl.store(dA_ptr + sl * DM * N + s_off, dA_acc, mask=mnd)
    if HAS_D:
        tl.store(dD_ptr + sl * DM + cols, dD_acc, mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + sl * DM + cols, dbias_acc, mask=md)
    if HAS_H0:
        if seg == 0:
            tl.store(dh0_ptr + st_off, mu, mask=mnd)


def _sel_use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; the PyTorch reference otherwise."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _sel_asm() -> bool:
    """Inline PTX (the fast logarithm) only when compiling for the GPU, not under the interpreter."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _sel_config(DM: int, N: int, config: dict | None) -> dict:
    """Channels per program (all N states) and warps: FWD_BD / FWD_WARPS for the forward, BD / num_warps for the
    backward; CK steps between the forward's checkpoints (the backward's chunk); SEG segments of the length scanned
    in parallel (0: chosen from the shape, see `_sel_segments`). On the H100 at the reference shape (N 16) one warp
    of 32 channels (a channel's 16 states as 4 x 4 per thread) was fastest for both; 64 channels per warp make the
    forward slower and spill in the backward, several warps add barriers. Wider states keep 512 state elements per
    warp (N 64: 8 channels), which keeps the backward's tiles in registers. BWD_REGS caps the backward's registers
    (0: no cap). It holds 220-255, so eight one-warp programs fit per SM and the loop waits on its own dependent
    chains (Nsight Compute: 1.9 warps per scheduler, issue slots 55% busy). On the H100 (graphed fwd+bwd) a cap of
    128 took N 16 at D 1024, 64 x 1024, from 3.315 to 3.209 ms (168: 3.461), and 168 took ttsm's shape from 1.309 to
    1.273 (128: 1.70, 200: 1.57)."""
    bn = triton.next_power_of_2(N)
    bd = max(8, 512 // bn)
    regs = 128 if bn <= 16 else 168
    cfg = {"BD": bd, "CK": 128, "BN": bn, "num_warps": 1, "FWD_BD": bd, "FWD_WARPS": 1, "SEG": 0, "BWD_REGS": regs}
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg.update(BD=4, CK=8, FWD_BD=8)
    if config:
        cfg.update(config)
    for key in ("BD", "FWD_BD"):
        cfg[key] = min(cfg[key], max(triton.next_power_of_2(DM), 1))
    return cfg


SEL_PROGRAMS = 1024  # below this many (sequence, channel block) programs the length is split into segments


def _sel_segments(Bsz: int, T: int, DM: int, bd: int, cfg: dict) -> tuple[int, int]:
    """(segments, steps per segment, a multiple of CK). A step-sequential program is latency-bound, so a small
    batch leaves the GPU idle: split the length into segments scanned in parallel, joined by a short carry (each
    segment's state from zero, then the true start state through the earlier segments' summaries)."""
    ck = cfg["CK"]
    n_ck = triton.cdiv(T, ck)
    seg = cfg["SEG"]
    if seg <= 0:
        programs = Bsz * triton.cdiv(DM, bd)
        seg = triton.cdiv(SEL_PROGRAMS, programs) if programs < SEL_PROGRAMS else 1
    seg = max(1, min(seg, n_ck))
    ls = triton.cdiv(n_ck, seg) * ck
    return triton.cdiv(T, ls), ls


def _sel_offsets_fit(T: int, DM: int, N: int) -> None:
    """The forward addresses a sequence's rows with int32 offsets."""
    if (T + 1) * max(DM, N) >= 2**31:
        raise ValueError(f"selective_scan: T * max(Dm, N) must stay below 2^31, got T {T}, Dm {DM}, N {N}")


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


# ---- ssm_golf::sel_scan: (y, final state, chunk checkpoints or a placeholder), and its backward op ----


def _sel_fin_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _sel_scan_impl(u, delta, A, B, C, D, z, delta_bias, h0, softplus, save, config):
    if not _sel_use_triton(u):
        y, fin = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, softplus, h0, True)
        return y, fin.to(_sel_fin_dtype(u)), scan_none(fin)
    Bsz, T, DM = u.shape
    N = A.shape[1]
    _sel_offsets_fit(T, DM, N)
    cfg = _sel_config(DM, N, scan_config_dict(config))
    u, delta, B, C = (x.contiguous() for x in (u, delta, B, C))
    A = A.float().contiguous()
    D = D.float().contiguous() if D is not None else None
    z = z.contiguous() if z is not None else None
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    h0c = h0.float().contiguous() if h0 is not None else None
    out = torch.empty_like(u)
    fin = torch.empty((Bsz, DM, N), device=u.device, dtype=torch.float32)
    n_ck = triton.cdiv(T, cfg["CK"])
    ck = torch.empty((Bsz, n_ck, DM, N), device=u.device, dtype=torch.float32) if save else fin
    nblk = triton.cdiv(DM, cfg["FWD_BD"])
    nseg, ls = _sel_segments(Bsz, T, DM, cfg["FWD_BD"], cfg)
    hl = torch.empty((Bsz, nseg, DM, N), device=u.device, dtype=torch.float32) if nseg > 1 else fin
    ds = torch.empty((Bsz, nseg, DM), device=u.device, dtype=torch.float32) if nseg > 1 else fin
    args = (
        u, delta, A, B, C,
        D if D is not None else A, z if z is not None else u, bias if bias is not None else A,
        h0c if h0c is not None else fin, out, ck, fin, hl, ds,
        T, DM, N, ls, nseg,
    )  # fmt: skip
    flags = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        HAS_H0=h0c is not None, SAVE_CK=save, EVEN_D=DM % cfg["FWD_BD"] == 0, EVEN_N=N == cfg["BN"],
        ASM=_sel_asm(), CK=cfg["CK"], BD=cfg["FWD_BD"], BN=cfg["BN"], num_warps=cfg["FWD_WARPS"],
    )  # fmt: skip
    if nseg > 1:
        _sel_fwd_kernel[(Bsz, nblk, nseg - 1)](*args, LOCAL=True, CARRY_IN=False, **flags)
    _sel_fwd_kernel[(Bsz, nblk, nseg)](*args, LOCAL=False, CARRY_IN=nseg > 1, **flags)
    return out, fin.to(_sel_fin_dtype(u)), ck if save else scan_none(fin)


def _sel_scan_fake(u, delta, A, B, C, D, z, delta_bias, h0, softplus, save, config):
    Bsz, T, DM = u.shape
    N = A.shape[1]
    fin = u.new_empty((Bsz, DM, N), dtype=_sel_fin_dtype(u))
    ck = u.new_empty(0, dtype=fin.dtype)
    if save and _sel_use_triton(u):
        ck_steps = _sel_config(DM, N, scan_config_dict(config))["CK"]
        n_ck = (T + ck_steps - 1) // ck_steps
        ck = u.new_empty((Bsz, n_ck, DM, N), dtype=torch.float32)
    return u.new_empty(u.shape), fin, ck


def _sel_scan_setup(ctx, inputs, output):
    ctx.softplus, ctx.config = inputs[9], inputs[11]
    ctx.save_for_backward(*inputs[:9], output[2])


def _sel_scan_backward(ctx, dy, dfin, dck):
    grads = _sel_scan_bwd_op(*ctx.saved_tensors, dy, dfin, ctx.softplus, ctx.config)
    return (*grads[:5], *(scan_opt(g) for g in grads[5:]), None, None, None)


def _sel_scan_bwd_impl(u, delta, A, B, C, D, z, delta_bias, h0, ck, dout, dfin, softplus, config):
    inputs = [u, delta, A, B, C, D, z, delta_bias, h0]
    if not _sel_use_triton(u):
        fwd = lambda *xs: _sel_scan_impl(*xs, softplus, False, config)[:2]  # noqa: E731
        return tuple(scan_ref_vjp(fwd, inputs, [dout, dfin]))
    if ck.numel() == 0:
        raise RuntimeError("selective_scan: backward needs the checkpoints; run the forward with grad enabled")
    Bsz, T, DM = u.shape
    N = A.shape[1]
    cfg = _sel_config(DM, N, scan_config_dict(config))
    u_c, delta_c, B_c, C_c = (x.contiguous() for x in (u, delta, B, C))
    A_c = A.float().contiguous()
    D_c = D.float().contiguous() if D is not None else None
    z_c = z.contiguous() if z is not None else None
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    h0c = h0.float().contiguous() if h0 is not None else None
    dout = dout.contiguous()
    dfin = dfin.float().contiguous()
    du, ddelta = torch.empty_like(u_c), torch.empty_like(delta_c)
    dz = torch.empty_like(z_c) if z is not None else None
    f32 = {"device": u.device, "dtype": torch.float32}
    dB = torch.zeros((Bsz, T, N), **f32)
    dC = torch.zeros((Bsz, T, N), **f32)
    dh0 = torch.empty((Bsz, DM, N), **f32) if h0c is not None else None
    nblk = triton.cdiv(DM, cfg["BD"])
    nseg, ls = _sel_segments(Bsz, T, DM, cfg["BD"], cfg)
    dA = torch.empty((Bsz * nseg, DM, N), **f32)
    dD = torch.empty((Bsz * nseg, DM), **f32) if D is not None else None
    dbias = torch.empty((Bsz * nseg, DM), **f32) if bias is not None else None
    ml = torch.empty((Bsz, nseg, DM, N), **f32) if nseg > 1 else dA
    ds = torch.empty((Bsz, nseg, DM), **f32) if nseg > 1 else dA
    scratch = torch.empty(Bsz * nblk * nseg * cfg["CK"] * cfg["BD"], **f32)
    args = (
        u_c, delta_c, A_c, B_c, C_c,
        D_c if D_c is not None else A_c, z_c if z_c is not None else u_c, bias if bias is not None else A_c,
        h0c if h0c is not None else dA, ck, dout, dfin, scratch,
        du, ddelta, dz if dz is not None else du, dA, dB, dC,
        dD if dD is not None else dA, dbias if dbias is not None else dA, dh0 if dh0 is not None else dA, ml, ds,
        T, DM, N, ls, nseg,
    )  # fmt: skip
    flags = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        HAS_H0=h0c is not None, HAS_DFIN=True, ASM=_sel_asm(), CK=cfg["CK"], BD=cfg["BD"], BN=cfg["BN"],
        num_warps=cfg["num_warps"], **({"maxnreg": cfg["BWD_REGS"]} if cfg["BWD_REGS"] > 0 else {}),
    )  # fmt: skip
    if nseg > 1:
        _sel_bwd_kernel[(Bsz, nblk, nseg - 1)](*args, 1, LOCAL=True, CARRY_IN=False, **flags)
    _sel_bwd_kernel[(Bsz, nblk, nseg)](*args, 0, LOCAL=False, CARRY_IN=nseg > 1, **flags)
    return (
        du,
        ddelta,
        dA.sum(0).to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD.sum(0).to(D.dtype) if dD is not None else scan_none(du),
        dz if dz is not None else scan_none(du),
        dbias.sum(0).to(delta_bias.dtype) if dbias is not None else scan_none(du),
        dh0.to(h0.dtype) if dh0 is not None else scan_none(du),
    )


def _sel_scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, h0, ck, dout, dfin, softplus, config):
    return tuple(
        x.new_empty(x.shape) if x is not None else scan_none(dout) for x in (u, delta, A, B, C, D, z, delta_bias, h0)
    )


_SEL_ARGS = "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? h0"
_sel_scan_bwd_op = scan_op(
    "sel_scan_bwd",
    f"({_SEL_ARGS}, Tensor ck, Tensor dout, Tensor dfin, bool softplus, str config) -> ({', '.join(['Tensor'] * 9)})",
    _sel_scan_bwd_impl,
    _sel_scan_bwd_fake,
)
_sel_scan_op = scan_op(
    "sel_scan",
    f"({_SEL_ARGS}, bool softplus, bool save, str config) -> (Tensor, Tensor, Tensor)",
    _sel_scan_impl,
    _sel_scan_fake,
    _sel_scan_backward,
    _sel_scan_setup,
)


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
    y = C_t h_t + D u, times silu(z). Returns y (B, T, Dm) in u's dtype [and the final state (B, Dm, N), fp32].
    One op (ssm_golf::sel_scan); its chunk checkpoints are kept only when a backward can follow."""
    _sel_check(u, delta, A, B, C, D, z, delta_bias, h0)
    inputs = (u, delta, A, B, C, D, z, delta_bias, h0)
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    y, fin, _ = _sel_scan_op(
        u, delta, A, B, C, D, z, delta_bias, h0, bool(delta_softplus), save, scan_config_str(config)
    )
    return (y, fin) if return_final_state else y
