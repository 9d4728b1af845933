"""Chunked state-space-duality scan (Mamba-2 SSD) in Triton, forward and backward, with its PyTorch reference.

Math, per batch b and head h (state h_t is P x N, fp32):
    h_t = exp(la_t) h_{t-1} + w_t x_t B_t^T        y_t = h_t C_t + D x_t        out_t = y_t * silu(z_t)
For Mamba-2 (`ssd_scan`): dt_t = softplus(dt_raw_t + dt_bias) (or dt_raw + dt_bias), la_t = dt_t A_h, w_t = dt_t.
The generic form (`ssd_generic_scan`, used by Mamba-3) takes la, w per position and one extra coefficient e_t on
the diagonal (the j == t term uses w_t + e_t), so trapezoidal rules fit the same kernels.

Forward, one pass (`_ssd_fwd_kernel`): one program per (batch, head) walks the chunks of Q steps in order
with the fp32 state in registers; per chunk it stores the chunk-start state for the backward (B x H x chunks x N x P,
in the dot dtype: bf16 for bf16 inputs on the GPU, which the H100 check measured to cost nothing against fp32
checkpoints, 4.81e-3 vs 4.80e-3 worst relative RMS error), steps the state (the one serial dot) and forms the chunk's
output from the state it started with (the intra-chunk quadratic form C B^T masked by exp(G_i - G_j), the carried
state's term, D x and the gate), so x, B and C are read once per chunk and the states are never read back. On the H100
at 64 x 1024 it took 0.363 ms against 0.670 for the two kernels it replaced in Mamba-3 (a sequential state kernel,
then an output kernel per chunk reading the states back), and SSD's graphed forward went from 0.415 to 0.269 ms.
Every tile moves through tensor descriptors; the rare rows they cannot take (`_ssd_desc_ok`: unaligned bases, P or
N rows not a multiple of 16 bytes) run the same kernel on zero-padded copies (`_ssd_fwd_padded`). TMA blocks are at
most 256 long, so chunks, P and N are limited to 256 where the kernels run.

Backward, one pass after an elementwise pre-pass, both forms and any number of groups: the pre-pass
(`_ssd_bwd_gate_kernel`) gives dz and the gated dy (and a per-column D's shares), then one program per (batch, head)
walks the chunks in reverse with the fp32 state gradient in registers (`_ssd_bwd_kernel`) and finishes per chunk dx,
the head's dB and dC shares, the gate gradients (dla, dw, de, or Mamba-2's d dt per position and A's sum) and a
per-head D's gradient (dy . x per position from its pair tile's diagonal). With G < H the heads of a group add their
dB and dC shares into fp32 rows by TMA reduce-add (pointer atomics under the interpreter, which lacks the descriptor
reduce, or where SSD_TUNING["bwd"]["red"] = "ptr"). The decay gradient of step t sums only the terms whose decay
spans t (pairs j < t <= i, as a dot of the masked pair matrix with a triangular ones matrix; state reads and writes;
the carry): never a difference of large row and column sums, which loses tiny gradients when decays are near 0. It
replaced a split backward of three kernels with few live tiles each (a reverse pass storing the state gradient per
chunk, then per-chunk dx and dB/dC kernels reading it back), measured slower on the H100 at 64 x 1024, graphed
fwd+bwd: SSD (G = 1) 1.643 ms against 1.103 in one pass, Mamba-3 2.96 against 1.98 (3.35 against 2.94 when the one
pass first took Mamba-3's call). A gate folded into the loop (dz and the gated dy there, no pre-pass) was tried and
lost: 1.171 ms against 1.079 for pre-pass and loop, its loop spilling three times as much. Rows that the tensor
descriptors cannot take run the same kernels on zero-padded copies (`_ssd_bwd_padded`, the chunk states included).
Both loops run at two stages, Triton prefetching the next chunk's tiles during the current one's work: for the
latency-bound backward that was worth 22% of SSD's fwd+bwd on the H100. The forward of Mamba-2's ungated form is
capped at 168 registers, which fits three of its programs per SM (`_ssd_launch`).

Dispatch: Triton when the tensors are on CUDA or TRITON_INTERPRET=1 (CPU tests), else the sequential reference.
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from templates.scan.ops import scan_none, scan_op, scan_opt, scan_ref_vjp

SSD_INTERPRET_ENV = "TRITON_INTERPRET"


def ssd_use_triton(t: torch.Tensor) -> bool:
    """True when the scan kernels should run: CUDA tensors, or CPU tensors under the Triton interpreter."""
    return t.is_cuda or os.environ.get(SSD_INTERPRET_ENV) == "1"


@triton.jit
def _ssd_load_chunk_gates(
    DT,
    LA,
    W,
    E,
    DTB,
    a_h,
    g_off,
    offs_t,
    mask_t,
    H,
    GENERIC: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    HAS_DTB: tl.constexpr,
    HAS_E: tl.constexpr,
):
    """Per-position log-decay la, input weight w, diagonal extra e, and (SSD) dt after bias/softplus and raw+bias."""
    ptr_off = g_off + offs_t * H
    if GENERIC:
        la = tl.load(LA + ptr_off, mask=mask_t, other=0.0).to(tl.float32)
        w = tl.load(W + ptr_off, mask=mask_t, other=0.0).to(tl.float32)
        if HAS_E:
            e = tl.load(E + ptr_off, mask=mask_t, other=0.0).to(tl.float32)
        else:
            e = tl.zeros_like(w)
        raw = w
        dtv = w
    else:
        raw = tl.load(DT + ptr_off, mask=mask_t, other=0.0).to(tl.float32)
        if HAS_DTB:
            raw = raw + tl.load(DTB).to(tl.float32)
        if DT_SOFTPLUS:
            dtv = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))))
        else:
            dtv = raw
        dtv = tl.where(mask_t, dtv, 0.0)
        la = dtv * a_h
        w = dtv
        e = tl.zeros_like(w)
    return la, w, e, dtv, raw


@triton.jit
def _ssd_state_t(bh64, offs_p, offs_n, P, N):
    """Offsets of one (batch, head) state stored (P, N) as the [BN, BP] tile the kernels hold (h0, final, dh0)."""
    return bh64 * P * N + offs_p[None, :] * N + offs_n[:, None]


@triton.jit
def _ssd_head_d(DS, h, offs_p, mask_p, P, D_HEAD: tl.constexpr):
    """Head h's skip weight from the (H, P) matrix: one value when D is per head (Mamba-3; a scalar, not a row held
    across the loop), else the head's [BP] row."""
    if D_HEAD:
        return tl.load(DS + h * P).to(tl.float32)
    else:
        return tl.load(DS + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)


@triton.jit
def _ssd_exp2(x, FAST: tl.constexpr):
    """2^x; FAST (on the GPU): the hardware's ex2 with denormal results flushed to 0 (one instruction, where tl.exp2
    adds a range test and two scalings per element for denormals). The interpreter runs no inline assembly."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip
    else:
        return tl.exp2(x)


@triton.jit
def _ssd_silu(z, FAST: tl.constexpr):
    """z sigmoid(z) = z / (1 + 2^(-z log2 e)); FAST: ftz ex2 and the approximate reciprocal of 1 + 2^(...) >= 1
    (never a denormal), where the rounded division takes about eight instructions."""
    d = 1.0 + _ssd_exp2(z * -1.4426950408889634, FAST)
    if FAST:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32, is_pure=True,
                                      pack=1)  # fmt: skip
        return z * r
    else:
        return z / d


@triton.jit
def _ssd_fwd_kernel(
    XD, BD, CD, ZD, YD, YPD, CKD, DT, A, DTB, LA, W, E, DS, H0, HT,
    T, H, G, P, N, NC,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    GENERIC: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DTB: tl.constexpr, HAS_E: tl.constexpr,
    HAS_D: tl.constexpr, D_HEAD: tl.constexpr, HAS_Z: tl.constexpr, STORE_YP: tl.constexpr,
    STORE_CKPT: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, FAST: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    """The forward: one program per (batch, head) walks the chunks in order with its [BN, BP] fp32 state h in
    registers and finishes each chunk's output there, so x, B and C are read once per chunk and the chunk-start states
    are written (for the backward; not without grad) but never read back. Per chunk, with G the chunk-local cumulative
    log-decay, S = C B^T and st the chunk-start state:
        ckpt_c = st            h <- exp(G_last) st + B^T (x exp(G_last - G) w)
        y = exp(G) C st + (S exp(G_i - G_j) (w_j; w_i + e_i + D on the diagonal), i >= j) x,   out = y silu(z)
    Only the state step is serial; it comes first, right after st is stored, so that the output's three dots (the pair
    tile, the state read from st's copy in the dot dtype, the pairs) hang off the chain. A per-head D (Mamba-3) sits on
    the pair tile's diagonal (D x = D I x, rounded with the tile to the dot dtype), so x needs no register copy in the
    output's layout (offline sm_90: 241 -> 198 registers); a D per column adds D x in fp32. Tiles move through tensor
    descriptors (x, B, C, z, y and the output before the gate as (batch, H or G, T, cols) views with [1, 1, Q, BP or
    BN] blocks, the states as (batch heads chunks, N, P)): TMA zero-fills the partial last chunk and clips its stores,
    no address or mask tiles are held, and the dots read B, C and x from shared memory. The group's B and C rows are g =
    h // (H // G). The loop takes the launch's stage count as its own (NS), with which Triton prefetches z too (no dot
    reads it, so it otherwise waits for z each chunk). FAST (on the GPU): the decay tile's exp2 and z's silu with the
    hardware's ftz ex2 and approximate reciprocal (offline sm_90: 1494 -> 1265 loop SASS at 1 stage). The whole of P
    per program: a split of P into two blocks forms each chunk's [Q, Q] pair tile twice, and on the H100 it took
    Mamba-3's graphed forward from 0.447 to 0.648 ms at 64 x 1024 (without the split's column offsets, offline sm_90:
    199 -> 196 registers)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    bh64 = bh.to(tl.int64)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mask_p = offs_p < P
    sn_mask = (offs_n < N)[:, None] & mask_p[None, :]
    g_base = b.to(tl.int64) * T * H + h
    a_h = 0.0
    if not GENERIC:
        a_h = tl.load(A + h).to(tl.float32)
    if HAS_H0:
        state = tl.load(H0 + _ssd_state_t(bh64, offs_p, offs_n, P, N), mask=sn_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BN, BP), dtype=tl.float32)
    if HAS_D:
        d_row = _ssd_head_d(DS, h, offs_p, mask_p, P, D_HEAD)
        if not D_HEAD:
            d_row = d_row[None, :]
    # the loop's own stage count (the launch's): with it Triton also prefetches z, which feeds no dot
    for c in tl.range(0, NC, num_stages=NS):
        tq = c * Q + offs_q
        mask_t = tq < T
        la, w, e, _dtv, _raw = _ssd_load_chunk_gates(
            DT, LA, W, E, DTB + h, a_h, g_base, tq, mask_t, H, GENERIC, DT_SOFTPLUS, HAS_DTB, HAS_E
        )
        gc, g_last, e_g, dec = _ssd_chunk_consts(la, offs_q, Q)
        if STORE_CKPT:
            CKD.store([bh * NC + c, 0, 0], state.to(CKD.dtype).reshape(1, BN, BP))
        st = state.to(DOT)
        kb = BD.load([b, g, c * Q, 0]).reshape(Q, BN).to(DOT)
        x = XD.load([b, h, c * Q, 0]).reshape(Q, BP).to(DOT)
        # the serial chain first: h_end = exp(G_last) st + B^T (x exp(G_last - G) w)
        xw = (x.to(tl.float32) * (dec * w)[:, None]).to(DOT)
        state = tl.dot(tl.trans(kb), xw, acc=state * tl.exp(g_last), input_precision=PREC)
        # the output from st: the pairs i >= j of S = C B^T with exp(G_i - G_j) and the weights w_j (w_j + e_j on the
        # diagonal), then the carried state's read exp(G_i) C_i st
        qc = CD.load([b, g, c * Q, 0]).reshape(Q, BN).to(DOT)
        scores = tl.dot(qc, tl.trans(kb), input_precision=PREC)
        gl = gc * 1.4426950408889634
        seg = _ssd_exp2(tl.minimum(gl[:, None] - gl[None, :], 0.0), FAST)
        m = scores * seg
        if HAS_E or (HAS_D and D_HEAD):
            # the diagonal's weight per row (seg is 1 there): w_i + e_i, and a per-head D as D x_i = D I x
            wd = w
            if HAS_E:
                wd += e
            if HAS_D and D_HEAD:
                m = tl.where(tq[:, None] == tq[None, :], m * wd[:, None] + d_row, m * w[None, :])
            else:
                m = tl.where(tq[:, None] == tq[None, :], m * wd[:, None], m * w[None, :])
        else:
            m = m * w[None, :]
        m = tl.where(tq[:, None] >= tq[None, :], m, 0.0).to(DOT)
        y = tl.dot(qc, st, input_precision=PREC) * e_g[:, None]
        y = tl.dot(m, x, acc=y, input_precision=PREC)
        if HAS_D and not D_HEAD:
            y += d_row * x.to(tl.float32)
        if HAS_Z:
            if STORE_YP:  # the output before the gate, for the backward's dz
                YPD.store([b, h, c * Q, 0], y.to(YPD.dtype).reshape(1, 1, Q, BP))
            zz = ZD.load([b, h, c * Q, 0]).reshape(Q, BP).to(tl.float32)
            y = y * _ssd_silu(zz, FAST)
        YD.store([b, h, c * Q, 0], y.to(YD.dtype).reshape(1, 1, Q, BP))
    if STORE_FINAL:
        tl.store(HT + _ssd_state_t(bh64, offs_p, offs_n, P, N), state, mask=sn_mask)


@triton.jit
def _ssd_chunk_consts(la, offs_q, Q: tl.constexpr):
    """Chunk-local cumulative log-decay G, its last value, exp(G) and exp(G_last - G)."""
    gc = tl.cumsum(la, axis=0)
    g_last = tl.sum(tl.where(offs_q == Q - 1, gc, 0.0), axis=0)
    return gc, g_last, tl.exp(gc), tl.exp(g_last - gc)


@triton.jit
def _ssd_bwd_gate_kernel(
    X, Z, YP, DY, DZ, DYE, DD_PART, T, H, P, NC, SXB, SXT, SXH, SZB, SZT, SZH,
    Q: tl.constexpr, BP: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
):  # fmt: skip
    """Pre-pass of the backward, one program per (batch, chunk, head), elementwise: with the gate, dz (from the
    output before it) and dy through it; with a D per column, the chunk's dD share (column sums of dy x, for which it
    reads x). So the backward's loop reads one gated dy and neither z nor the output before the gate. dy . x
    per position (e's terms) and a per-head D's gradient come from the loop's pair tile instead: on the H100 that
    took Mamba-3's graphed fwd+bwd from 2.074 to 1.983 ms at 64 x 1024, the pre-pass no longer reading x. x and z
    are read through their own (batch, time, head) strides, as the op takes them in place (`_ssd_rows`); the output
    before the gate, dy and the results are contiguous."""
    b64 = (tl.program_id(0) // NC).to(tl.int64)
    c = tl.program_id(0) % NC
    h = tl.program_id(1)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BP)
    mask_p = offs_p < P
    mask_t = c * Q + offs_q < T
    xp_mask = mask_t[:, None] & mask_p[None, :]
    tq64 = (c * Q + offs_q).to(tl.int64)
    row = (b64 * T + tq64) * H + h
    loc = row[:, None] * P + offs_p[None, :]
    dy = tl.load(DY + loc, mask=xp_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z_loc = (b64 * SZB + tq64 * SZT + h * SZH)[:, None] + offs_p[None, :]
        zz = tl.load(Z + z_loc, mask=xp_mask, other=0.0).to(tl.float32)
        yp = tl.load(YP + loc, mask=xp_mask, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zz)
        tl.store(DZ + loc, (dy * yp * sz * (1.0 + zz * (1.0 - sz))).to(DZ.dtype.element_ty), mask=xp_mask)
        dy = (dy * zz * sz).to(DYE.dtype.element_ty)
        tl.store(DYE + loc, dy, mask=xp_mask)
        dy = dy.to(tl.float32)  # dD and dy . x from the gated dy as the loop sees it
    if HAS_D:
        x_loc = (b64 * SXB + tq64 * SXT + h * SXH)[:, None] + offs_p[None, :]
        x = tl.load(X + x_loc, mask=xp_mask, other=0.0).to(tl.float32)
        tl.store(DD_PART + ((b64 * NC + c) * H + h) * P + offs_p, tl.sum(dy * x, axis=0), mask=mask_p)


@triton.jit
def _ssd_bc_out(DESC, PTR, val, b, g, c, tq, offs_n, T, G, N, Q: tl.constexpr, BN: tl.constexpr, BC_RED: tl.constexpr):
    """One program's [Q, BN] share of a chunk's dB or dC rows of group g. BC_RED 0: the rows are this program's alone
    (G == H), stored in the descriptor's dtype; 1: added into fp32 rows with the descriptor's atomic_add (a TMA
    reduce-add; the group's heads each add theirs); 2: the same sum with pointer atomics, which the CPU interpreter
    runs (triton 3.9's has no descriptor atomic_add)."""
    if BC_RED == 0:
        DESC.store([b, g, c * Q, 0], val.to(DESC.dtype).reshape(1, 1, Q, BN))
    elif BC_RED == 1:
        DESC.atomic_add([b, g, c * Q, 0], val.reshape(1, 1, Q, BN))
    else:
        rows = (b.to(tl.int64) * T + tq) * G + g
        mask = (tq < T)[:, None] & (offs_n < N)[None, :]
        tl.atomic_add(PTR + rows[:, None] * N + offs_n[None, :], val, mask=mask, sem="relaxed")


@triton.jit
def _ssd_bwd_kernel(
    XD, DYD, DXD, BD, CD, DBD, DCD, CKD, LA, W, E, DS, DHT, DLA, DW, DE, DH0, DDH,
    DT, A, DTB, DDT, DA, DBP, DCP, T, H, G, P, N, NC,
    Q: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_E: tl.constexpr, HAS_D: tl.constexpr,
    D_HEAD: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    GENERIC: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DTB: tl.constexpr, GROUPED: tl.constexpr,
    BC_RED: tl.constexpr,
):  # fmt: skip
    """The backward of either form, in one pass (Mamba-3: the generic one with one row of B and C per head, G == H,
    rotated before the scan; Mamba-2: dt, A, G groups of H // G heads sharing B and C rows). One program per (batch,
    head) walks the chunks in reverse with the [BN, BP] fp32 state gradient dh in registers and finishes per chunk dx,
    the head's dB and dC shares, dla, dw, de (or d dt) and a per-head D's gradient; the gate and a per-column D's
    gradient are the pre-pass's (`_ssd_bwd_gate_kernel`), so dy here is already through the gate. The input weight
    is folded into x's rows (x' = w x) and the diagonal extra e handled per position, so no [Q, Q] weight tile. With
    st the stored chunk-start state, S = C B^T, seg the masked decays exp(G_i - G_j) (i >= j), dws = (dy x^T) seg
    w_j (the gradient of S; the pair tiles are held transposed, [j, i]) and cb_t = C_t . B_t (S's diagonal), dxy_t =
    dy_t . x_t (the diagonal of the x dy^T pair tile; summed over the chunks, a per-head D's gradient), per chunk:
        v = (S seg)^T dy + exp(G_last - G) B dh     (the gradient of x')
        dx = w v + D dy + e cb dy                   dw = <x, v> per row        de = dxy cb
        dC = (dws + diag(e dxy)) B + exp(G) dy st^T   dB = (dws + diag(e dxy))^T C + exp(G_last - G) w x dh^T
        dla_t: the terms whose decay spans t (pairs j < t <= i of dws S through a ones-matrix dot, the state read
               from t on, the state writes before t, the carry exp(G_last) <st, dh>), never a difference of large sums
        dh <- exp(G_last) dh + (C exp(G))^T dy
    Ten dots, every operand in the dot dtype. The [Q, P] and [Q, N] tiles and the states move through tensor
    descriptors (XD ... CKD; x, dy, dx, B, C, dB, dC as (batch, H, T, P or N) views with [1, 1, Q, BP or BN] blocks,
    the states as (batch heads chunks, N, P)): TMA zero-fills the partial last chunk and clips its stores, so the loop
    holds no address or mask tiles, and the dots read B, C, x, dy straight from shared memory. Each tile is loaded
    just before its first use (C again for the state read and step), since the register copies of a loaded tile
    are all made where it lands and would otherwise be held across the chunk. Both pair dots come first, so the
    decay tile seg ends with them: the pair weights w_j seg (w_j + e_j on the diagonal) scale dy x^T's result, and
    the strict pair terms are dws S in fp32. The span dot's ones matrix is built once, before the loop, where it
    lands in shared memory; a D with one value per head is a scalar, folded with e cb into one factor of dy.
    Mamba-2's form (GENERIC off, constexpr flags off for Mamba-3's call so that its code is unchanged): la = dt A and
    w = dt from `_ssd_load_chunk_gates`, dw held in registers until dla is final, then d dt = dla A + dw per position
    (times sigmoid(dt_raw + dt_bias) through a softplus), and A's gradient sum(dla dt) summed over the chunks and
    stored once; no e. GROUPED (G < H): B and C are the rows of group g = h // (H // G), whose heads each add their
    [Q, N] dB and dC shares into fp32 rows (`_ssd_bc_out`: TMA reduce-add, or pointer atomics under the interpreter);
    G == H stores them. One pass rather than the split kernels it replaced: see the module docstring."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    bh64 = bh.to(tl.int64)
    offs_q = tl.arange(0, Q)
    offs_p = tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mask_p = offs_p < P
    sn_mask = (offs_n < N)[:, None] & mask_p[None, :]
    g_base = b64 * T * H + h
    if GROUPED:  # the group's shared B and C rows (G < H: Mamba-2)
        g = h // (H // G)
    else:
        g = h
    if HAS_DHT:
        dst = tl.load(DHT + _ssd_state_t(bh64, offs_p, offs_n, P, N), mask=sn_mask, other=0.0).to(tl.float32)
    else:
        dst = tl.zeros((BN, BP), dtype=tl.float32)
    if HAS_D:
        d_row = _ssd_head_d(DS, h, offs_p, mask_p, P, D_HEAD)
    upper = tl.where(offs_q[:, None] <= offs_q[None, :], 1.0, 0.0).to(DOT)
    dd_acc = tl.sum(tl.zeros((Q,), dtype=tl.float32), axis=0)  # a per-head D's gradient, summed over the chunks
    if not GENERIC:  # SSD: la = dt A, w = dt; A's gradient sum(dla dt) summed over the chunks
        a_h = tl.load(A + h).to(tl.float32)
        da_acc = tl.sum(tl.zeros((Q,), dtype=tl.float32), axis=0)
    for cc in range(NC):
        c = NC - 1 - cc
        # [Q, Q] masks from the chunk's time steps, so that none is hoisted out of the loop and held
        tq = c * Q + offs_q
        mask_t = tq < T
        g_ptr = g_base + tq * H
        if GENERIC:
            la, w, e, _dtv, _raw = _ssd_load_chunk_gates(LA, LA, W, E, LA, 0.0, g_base, tq, mask_t, H, True, False,
                                                         False, HAS_E)  # fmt: skip
        else:  # w = dt after bias and softplus (0 past T), la = dt A; d dt/d raw = sigmoid(raw) with softplus
            la, w, e, _dtv, raw = _ssd_load_chunk_gates(DT, LA, W, E, DTB + h, a_h, g_base, tq, mask_t, H, False,
                                                        DT_SOFTPLUS, HAS_DTB, False)  # fmt: skip
        gc, g_last, e_g, dec = _ssd_chunk_consts(la, offs_q, Q)
        # the pairs i >= j, held transposed ([j, i], so that the dots for dx and dB take them as register A operands):
        # exp2 of the scaled cumulative decays (the masked half may overflow; where drops it)
        diag = tq[:, None] == tq[None, :]
        gl = gc * 1.4426950408889634
        seg = tl.where(tq[None, :] >= tq[:, None], tl.exp2(gl[None, :] - gl[:, None]), 0.0)
        kb = BD.load([b, g, c * Q, 0]).reshape(Q, BN).to(DOT)
        qc = CD.load([b, g, c * Q, 0]).reshape(Q, BN).to(DOT)
        # both pair tiles first, so that the decays seg end here: S^T = B C^T and, w folded into x's rows (x' = w x),
        # x' dy^T, whose product with seg is dws, the pair gradient of S^T
        scores = tl.dot(kb, tl.trans(qc), input_precision=PREC)
        if HAS_E:
            cb = tl.sum(tl.where(diag, scores, 0.0), axis=1)  # C_t . B_t
        m = (scores * seg).to(DOT)
        # dy and x land after the C.B pairs, so that their register copies (made where they land) start there
        dy = DYD.load([b, h, c * Q, 0]).reshape(Q, BP).to(DOT)
        x = XD.load([b, h, c * Q, 0]).reshape(Q, BP).to(DOT)
        # the pair weights w_j seg[j, i], with w_j + e_j on the diagonal (seg is exactly 1 there): e's share of dB and
        # dC, e_t (dy_t . x_t) C_t and B_t, comes through the pair dots
        xdy = tl.dot(x, tl.trans(dy), input_precision=PREC)
        if HAS_E or (HAS_D and D_HEAD):  # dy_t . x_t from the pair tile's diagonal
            dxy = tl.sum(tl.where(diag, xdy, 0.0), axis=1)
            if HAS_D and D_HEAD:
                dd_acc += tl.sum(dxy, axis=0)
        if HAS_E:
            sw = tl.where(diag, (w + e)[:, None], seg * w[:, None])
            tl.store(DE + g_ptr, dxy * cb, mask=mask_t)
        else:
            sw = seg * w[:, None]
        dws = xdy * sw
        # pairs j < t <= i: sums over i >= t (U[t, i] = [i >= t]) of the strict pair terms dws S, then row t's part
        # left of t
        strict = tq[:, None] > tq[None, :]
        pm = tl.where(tq[None, :] > tq[:, None], dws * scores, 0.0).to(DOT)
        dsc = dws.to(DOT)
        span = tl.dot(upper, tl.trans(pm), input_precision=PREC)
        dla = tl.sum(tl.where(strict, span, 0.0), axis=1)
        # v = (S seg)^T dy + exp(G_last - G) B dh, the gradient of x' = w x: dx = w v (+ D dy, e's term), dw = <x, v>
        dstd = dst.to(DOT)
        kdh = tl.dot(kb, dstd, input_precision=PREC)
        cs = dec * tl.sum(kdh * x.to(tl.float32), axis=1)
        v = tl.dot(m, dy, acc=dec[:, None] * kdh, input_precision=PREC)
        if GENERIC:
            tl.store(DW + g_ptr, tl.sum(v * x.to(tl.float32), axis=1), mask=mask_t)
        else:  # held until dla is final: d dt = dla A + dw
            dwv = tl.sum(v * x.to(tl.float32), axis=1)
        dx = w[:, None] * v
        if HAS_D and D_HEAD and HAS_E:
            # D and the diagonal extra e_t (C_t . B_t) x_t as one per-position factor
            dx += (d_row + e * cb)[:, None] * dy.to(tl.float32)
        else:
            if HAS_D:
                if D_HEAD:
                    dx += d_row * dy.to(tl.float32)
                else:
                    dx += d_row[None, :] * dy.to(tl.float32)
            if HAS_E:
                # the diagonal extra e_t (C_t . B_t) x_t, per position
                dx += (e * cb)[:, None] * dy.to(tl.float32)
        DXD.store([b, h, c * Q, 0], dx.to(DXD.dtype).reshape(1, 1, Q, BP))
        wc = w * cs
        dla += tl.cumsum(wc, axis=0) - wc
        # dB: the pairs and the state write
        db = tl.dot(x, tl.trans(dstd), input_precision=PREC) * (dec * w)[:, None]
        db = tl.dot(dsc, qc, acc=db, input_precision=PREC)
        _ssd_bc_out(DBD, DBP, db, b, g, c, tq, offs_n, T, G, N, Q, BN, BC_RED)
        # the carried state's read y_i += exp(G_i) C_i st: dC rows, its decay terms <C_i, dC_i> from t on, the carry;
        # C read again here so that its register copies start here
        st = CKD.load([bh * NC + c, 0, 0]).reshape(BN, BP)
        qr = CD.load([b, g, c * Q, 0]).reshape(Q, BN).to(DOT)
        dla += tl.exp(g_last) * tl.sum(tl.sum(st.to(tl.float32) * dst, axis=1), axis=0)
        dc = tl.dot(dy, tl.trans(st.to(DOT)), input_precision=PREC) * e_g[:, None]
        dla += tl.cumsum(tl.sum(dc * qr.to(tl.float32), axis=1), axis=0, reverse=True)
        if GENERIC:
            tl.store(DLA + g_ptr, dla, mask=mask_t)
        else:
            ddt = dla * a_h + dwv
            if DT_SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            tl.store(DDT + g_ptr, ddt, mask=mask_t)
            da_acc += tl.sum(dla * w, axis=0)  # w = dt is 0 past T
        dc = tl.dot(tl.trans(dsc), kb, acc=dc, input_precision=PREC)
        _ssd_bc_out(DCD, DCP, dc, b, g, c, tq, offs_n, T, G, N, Q, BN, BC_RED)
        # back over the chunk: dh_start = exp(G_last) dh_end + (C exp(G))^T dy
        qe = (qr.to(tl.float32) * e_g[:, None]).to(DOT)
        dst = tl.dot(tl.trans(qe), dy, acc=dst * tl.exp(g_last), input_precision=PREC)
    if HAS_H0:
        tl.store(DH0 + _ssd_state_t(bh64, offs_p, offs_n, P, N), dst, mask=sn_mask)
    if HAS_D and D_HEAD:
        tl.store(DDH + bh64, dd_acc)
    if not GENERIC:
        tl.store(DA + bh64, da_acc)


def _ssd_pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _ssd_state_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of the stored chunk states: the dot operand dtype (the backward feeds them to the tensor cores in that
    dtype anyway; only the carry's scalar product sees the rounding), fp32 elsewhere or when
    SSD_TUNING["state"]["fp32"] is set (to measure what the rounding costs)."""
    half = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    return x.dtype if half and not SSD_TUNING.get("state", {}).get("fp32") else torch.float32


def _ssd_dot_dtype(x: torch.Tensor) -> tuple:
    """Dot operand dtype and fp32 precision: bf16 tensor cores for half inputs on GPU, exact fp32 elsewhere."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16), "tf32"
    return tl.float32, "ieee"


SSD_TUNING: dict = {}  # kernel kind -> launch options overriding the defaults below (see _ssd_launch)


def _ssd_launch(kind: str, q: int, dot, lean: bool = False) -> dict:
    """Launch options of one kernel ("fwd" the forward, "bwd" the backward's loop): tuned overrides first
    ("num_warps", "num_stages", and "maxnreg" to cap registers for occupancy), else 4 warps and 2 stages, so that
    Triton prefetches the next chunk's tiles while the current one computes; 1 stage where the tiles would overflow
    shared memory (fp32 dots, chunks >= 128). On the H100 at 64 x 1024 (H 16, P 64, N 64, chunk 64, graphed
    fwd+bwd) the backward at 2 stages took SSD from 1.102 to 0.862 ms (its loop 0.784 -> 0.544) and Mamba-3 from 1.985
    to 1.877 (0.767 -> 0.635), although offline sm_90 its loop is longer and spills more (Mamba-3's call: 2,517 SASS,
    224 B of stack, 54 / 53 local stores / loads, against 2,290, 80 B, 20 / 22 at 1 stage; 91 KB of shared memory, so
    still two programs per SM): the loop is latency-bound, and the prefetch hides the loads' latency. 3 stages were
    slower (1.259, 2.138), as were 8 warps (1.537) and a cap of 168 registers at 1 stage (1.394). For the forward, 8
    warps took the two kernels the one-pass forward replaced from 0.414 to 0.563 ms; at 3 stages SSD's forward alone
    went 0.269 -> 0.256 but Mamba-3's fwd+bwd 1.877 -> 2.009 (117 KB of shared memory: one program per SM).
    lean: the forward of Mamba-2's form without a gate, with chunk, P and N at most 64, whose tiles take 74.5 KB of
    shared memory (offline sm_90), so that three programs fit per SM once its registers are capped at 168 (189 ->
    168, 16 B of stack): SSD's forward went 0.269 -> 0.222 ms, fwd+bwd 0.865 -> 0.835. Mamba-3's forward (83 KB, two
    programs per SM either way) only lost by the cap (0.494 -> 0.517)."""
    wide = dot == tl.float32 or q >= 128
    opts = {"num_warps": 4, "num_stages": 1 if wide else 2}
    if lean and kind == "fwd" and not wide:
        opts["maxnreg"] = 168
    tuned = {k: v for k, v in SSD_TUNING.get(kind, {}).items() if k in ("num_warps", "num_stages", "maxnreg")}
    return opts | ({} if wide else tuned)


def _ssd_check_shapes(x, gates, B, C, chunk_size):
    if x.dim() != 4:
        raise ValueError(f"ssd scan: x must be (batch, time, heads, headdim), got shape {tuple(x.shape)}")
    bsz, seqlen, nheads, _ = x.shape
    if gates.shape != (bsz, seqlen, nheads):
        raise ValueError(
            f"ssd scan: dt/la must be (batch, time, heads) = {(bsz, seqlen, nheads)}, got {tuple(gates.shape)}"
        )
    if B.dim() != 4 or B.shape[:2] != (bsz, seqlen) or B.shape != C.shape:
        raise ValueError(
            f"ssd scan: B and C must both be (batch, time, groups, N), got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    if nheads % B.shape[2] != 0:
        raise ValueError(f"ssd scan: heads ({nheads}) must be a multiple of groups ({B.shape[2]})")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"ssd scan: chunk_size must be a power of two >= 16, got {chunk_size}")
    if ssd_use_triton(x) and max(chunk_size, x.shape[3], B.shape[3]) > 256:
        raise ValueError(
            "ssd scan: the kernels' tensor-descriptor blocks take chunk_size, headdim and N up to 256, got "
            f"{chunk_size}, {x.shape[3]}, {B.shape[3]}"
        )


# ---- ssm_golf::ssd_scan: (y, final state or a placeholder, chunk states or a placeholder, the output before the
# gate or a placeholder), and its backward op ----
# `generic` selects (la, w, e) inputs instead of (dt, A, dt_bias); `grad` keeps the chunk states (and, with z, the
# output before the gate) for a backward.


def _ssd_fin_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ssd_scan_impl(
    x,
    dt,
    A,
    dt_bias,
    la,
    w,
    e,
    B,
    C,
    D,
    z,
    h0,
    chunk_size,
    dt_softplus,
    generic,
    want_final,
    grad,
):
    if not ssd_use_triton(x):
        if generic:
            y, final = ssd_generic_scan_ref(x, la, w, B, C, chunk_size, e, D, z, h0, True)
        else:
            y, final = ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, h0, True)
        return y, final.to(_ssd_fin_dtype(x)) if want_final else scan_none(x), scan_none(x), scan_none(x)
    bsz, seqlen, nheads, hdim = x.shape
    dstate = B.shape[3]
    x, B, C, z = _ssd_rows(x), _ssd_rows(B), _ssd_rows(C), _ssd_rows(z)
    d_mat, h0c, (dt, A, dt_bias, la, w, e) = _ssd_kernel_inputs(D, h0, dt, A, dt_bias, la, w, e, nheads, hdim, generic)
    nchunks = triton.cdiv(seqlen, chunk_size)
    y = x.new_empty(x.shape)
    final = torch.empty(bsz, nheads, hdim, dstate, device=x.device, dtype=torch.float32) if want_final else None
    ckpt = yp = None
    if grad:
        ckpt = torch.empty(bsz, nheads, nchunks, dstate, hdim, device=x.device, dtype=_ssd_state_dtype(x))
        yp = x.new_empty(x.shape) if z is not None else None
    dot, prec = _ssd_dot_dtype(x)
    gates = tuple(t if t is not None else x for t in (dt, A, dt_bias, la, w))
    flags = {"GENERIC": generic, "DT_SOFTPLUS": dt_softplus, "HAS_DTB": dt_bias is not None, "DOT": dot, "PREC": prec}
    launch = _ssd_launch("fwd", chunk_size, dot, lean=not generic and z is None and max(chunk_size, hdim, dstate) <= 64)
    args = (x, gates, e, B, C, D, d_mat, z, h0c, y, final, ckpt, yp, chunk_size, flags, launch)
    if _ssd_desc_ok(x, B, C, y, *(t for t in (z, yp, ckpt) if t is not None)):
        _ssd_fwd(*args)
    else:
        _ssd_fwd_padded(*args)
    final = final.to(_ssd_fin_dtype(x)) if final is not None else scan_none(x)
    return y, final, _or_none(ckpt, x), _or_none(yp, x)


def _ssd_kernel_inputs(D, h0, dt, A, dt_bias, la, w, e, nheads: int, hdim: int, generic: bool) -> tuple:
    """What the forward and the backward kernels both read besides the rows: D as an (H, P) fp32 matrix, h0 in fp32,
    and the form's gates (dt, A, dt_bias, la, w, e), contiguous and fp32 except dt (None where absent or of the
    other form)."""
    d_mat = (D[:, None] if D.dim() == 1 else D).expand(nheads, hdim).float().contiguous() if D is not None else None
    h0c = h0.float().contiguous() if h0 is not None else None

    def f32(t):
        return t.float().contiguous() if t is not None else None

    if generic:
        return d_mat, h0c, (None, None, None, f32(la), f32(w), f32(e))
    return d_mat, h0c, (dt.contiguous(), f32(A), f32(dt_bias), None, None, None)


def _ssd_fwd(x, gates, e, B, C, D, d_mat, z, h0, y, final, ckpt, yp, chunk_size, flags, launch):
    """Launch `_ssd_fwd_kernel` over batch * heads: y (and yp, ckpt, final where given) written in place.
    gates: (dt, A, dt_bias, la, w) with placeholders. The tensors given to descriptors must pass `_ssd_desc_ok`."""
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = triton.cdiv(seqlen, chunk_size)
    bp, bn = _ssd_pow2(hdim), _ssd_pow2(dstate)
    xd, yd = _ssd_desc(x, chunk_size, bp), _ssd_desc(y, chunk_size, bp)
    zd = _ssd_desc(z, chunk_size, bp) if z is not None else xd
    ypd = _ssd_desc(yp, chunk_size, bp) if yp is not None else yd
    bd, cd = _ssd_desc(B, chunk_size, bn), _ssd_desc(C, chunk_size, bn)
    ckd = TensorDescriptor.from_tensor(ckpt.view(-1, dstate, hdim), [1, bn, bp]) if ckpt is not None else xd
    _ssd_fwd_kernel[(bsz * nheads,)](
        xd, bd, cd, zd, yd, ypd, ckd, *gates, e if e is not None else x, d_mat if d_mat is not None else x,
        h0 if h0 is not None else x, final if final is not None else x, seqlen, nheads, ngroups, hdim, dstate, nchunks,
        Q=chunk_size, BP=bp, BN=bn, HAS_E=e is not None, HAS_D=d_mat is not None,
        D_HEAD=D is not None and D.dim() == 1, HAS_Z=z is not None, STORE_YP=yp is not None,
        STORE_CKPT=ckpt is not None, HAS_H0=h0 is not None, STORE_FINAL=final is not None, FAST=x.is_cuda,
        NS=launch["num_stages"], **flags, **launch,
    )  # fmt: skip


def _ssd_fwd_padded(x, gates, e, B, C, D, d_mat, z, h0, y, final, ckpt, yp, chunk_size, flags, launch):
    """The forward for the rare calls whose rows the tensor descriptors cannot take (`_ssd_desc_ok`: a base not
    16-byte aligned, or P or N times the element size not a multiple of 16): `_ssd_fwd` on fresh copies with
    P and N zero-padded to aligned rows (zero columns of x, z, B, C, D and h0 change nothing: the padded state rows
    stay 0 and the padded output columns are dropped), then y, yp, ckpt and final copied out in their own layouts
    (ckpt (B, H, NC, N, P), unpadded: the backward pads its own copy where it must, `_ssd_bwd_padded`). Speed does
    not matter here."""
    hdim, dstate = x.shape[3], B.shape[3]
    pc = _ssd_aligned(hdim, *(t for t in (x, z, ckpt) if t is not None))
    nc = _ssd_aligned(dstate, B, C)
    xs, zs, bs, cs, d_pad = (_ssd_zero_pad(t, w) for t, w in ((x, pc), (z, pc), (B, nc), (C, nc), (d_mat, pc)))
    h0s = _ssd_zero_pad(h0, pc, nc)
    ys, yps = torch.empty_like(xs), (torch.empty_like(xs) if yp is not None else None)
    cks = ckpt.new_empty((*ckpt.shape[:-2], nc, pc)) if ckpt is not None else None
    fins = final.new_empty((*final.shape[:-2], pc, nc)) if final is not None else None
    _ssd_fwd(xs, gates, e, bs, cs, D, d_pad, zs, h0s, ys, fins, cks, yps, chunk_size, flags, launch)
    y.copy_(_ssd_cut(ys, hdim))
    if yp is not None:
        yp.copy_(_ssd_cut(yps, hdim))
    if ckpt is not None:
        ckpt.copy_(_ssd_cut(cks, dstate, hdim))
    if final is not None:
        final.copy_(_ssd_cut(fins, hdim, dstate))


def _ssd_zero_pad(t: torch.Tensor | None, *widths: int) -> torch.Tensor | None:
    """A fresh contiguous copy of t with its last len(widths) dimensions widened to widths, zero beyond t."""
    if t is None:
        return None
    out = t.new_zeros((*t.shape[: t.dim() - len(widths)], *widths))
    out[tuple(slice(0, k) for k in t.shape)] = t
    return out


def _ssd_cut(t: torch.Tensor, *widths: int) -> torch.Tensor:
    """The view of t's first widths elements along its last len(widths) dimensions (undoes `_ssd_zero_pad`)."""
    return t[(..., *(slice(0, k) for k in widths))]


def _ssd_aligned(cols: int, *tensors: torch.Tensor) -> int:
    """cols rounded up so that a row of cols elements of each tensor's dtype is a multiple of 16 bytes."""
    step = 16 // min(t.element_size() for t in tensors)
    return -(-cols // step) * step


def _or_none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else scan_none(like)


def _ssd_scan_fake(
    x,
    dt,
    A,
    dt_bias,
    la,
    w,
    e,
    B,
    C,
    D,
    z,
    h0,
    chunk_size,
    dt_softplus,
    generic,
    want_final,
    grad,
):
    bsz, seqlen, nheads, hdim = x.shape
    dstate = B.shape[3]
    final = x.new_empty((bsz, nheads, hdim, dstate), dtype=_ssd_fin_dtype(x)) if want_final else scan_none(x)
    ckpt, yp = scan_none(x), scan_none(x)
    if grad and ssd_use_triton(x):
        nchunks = (seqlen + chunk_size - 1) // chunk_size
        ckpt = x.new_empty((bsz, nheads, nchunks, dstate, hdim), dtype=_ssd_state_dtype(x))
        yp = x.new_empty(x.shape) if z is not None else yp
    return x.new_empty(x.shape), final, ckpt, yp


def _ssd_scan_setup(ctx, inputs, output):
    ctx.meta = inputs[12:16]  # chunk_size, dt_softplus, generic, want_final
    ctx.save_for_backward(*inputs[:12], output[2], output[3])
    # the chunk states and the output before the gate never get gradients: without this autograd would fill zeros
    # of their size for the backward (0.08 ms per Mamba-3 call at 64 x 1024 on the H100)
    ctx.set_materialize_grads(False)


def _ssd_scan_backward(ctx, dy, dfinal, dckpt, dyp):
    chunk_size, dt_softplus, generic, want_final = ctx.meta
    if dy is None:  # only the final state was used
        dy = torch.zeros_like(ctx.saved_tensors[0])
    grads = _ssd_scan_bwd_op(*ctx.saved_tensors, dy, dfinal if want_final else None, chunk_size, dt_softplus, generic)
    return (
        (grads[0], *(scan_opt(g) for g in grads[1:7]), grads[7], grads[8])
        + tuple(scan_opt(g) for g in grads[9:12])
        + (None,) * 5
    )


def _ssd_scan_bwd_impl(
    x,
    dt,
    A,
    dt_bias,
    la,
    w,
    e,
    B,
    C,
    D,
    z,
    h0,
    ckpt,
    yp,
    dy,
    dfinal,
    chunk_size,
    dt_softplus,
    generic,
):
    inputs = [x, dt, A, dt_bias, la, w, e, B, C, D, z, h0]
    if not ssd_use_triton(x):
        fwd = lambda *xs: _ssd_scan_impl(*xs, chunk_size, dt_softplus, generic, True, False)[:2]  # noqa: E731
        return tuple(scan_ref_vjp(fwd, inputs, [dy, dfinal]))
    if ckpt.numel() == 0:
        raise RuntimeError("ssd scan: backward needs the chunk states; run the forward with grad enabled")
    nheads, hdim = x.shape[2], x.shape[3]
    x_c, B_c, C_c, z_c, dy = _ssd_rows(x), _ssd_rows(B), _ssd_rows(C), _ssd_rows(z), dy.contiguous()
    d_mat, h0c, gates = _ssd_kernel_inputs(D, h0, dt, A, dt_bias, la, w, e, nheads, hdim, generic)
    dfin = dfinal.float().contiguous() if dfinal is not None else None
    run = _ssd_bwd if _ssd_desc_ok(x_c, B_c, C_c, ckpt, dy) else _ssd_bwd_padded
    grads = run(
        x_c, gates, B_c, C_c, d_mat, D is not None and D.dim() == 1, z_c, yp if z is not None else None, h0c, ckpt,
        dy, dfin, chunk_size, dt_softplus, generic,
    )  # fmt: skip
    return tuple(g.to(t.dtype) if g is not None else scan_none(x) for g, t in zip(grads, inputs))


def _ssd_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself where the kernels can read it in place, else a contiguous copy. In place: its rows contiguous and
    every other stride positive and a multiple of 16 bytes, as for Mamba-3's x and z, slices of the input
    projection's output. Copying them cost mamba3-hybrid 54.5 ms of its 743 ms step on the H100 (record micro-batch,
    `bench/profile_step.py`); read in place, the step took 694 ms (docs/benchmarks.md)."""
    if t is None:
        return None
    aligned = all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])
    positive = all(s > 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    if t.stride(-1) == 1 and aligned and positive:
        return t
    return t.contiguous()


def _ssd_desc(t: torch.Tensor, q: int, cols: int) -> TensorDescriptor:
    """A (batch, T, H, cols) tensor's descriptor (its own strides: a slice of a wider row needs no copy) as (batch, H,
    T, cols) (strides permuted, no copy) with one chunk of one head, [1, 1, q, cols pow2], per block: unit dims only
    in front, so the kernel's [q, cols] view of a block needs no register reshape."""
    return TensorDescriptor.from_tensor(t.permute(0, 2, 1, 3), [1, 1, q, cols])


def _ssd_desc_ok(*tensors: torch.Tensor) -> bool:
    """Whether the kernels' tensor descriptors can take these tensors: 16-byte aligned bases and rows."""
    return all(t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0 for t in tensors)


def _ssd_bc_red() -> int:
    """How the backward sums dB and dC over a group's heads: 1, the tensor descriptor's atomic_add (a TMA reduce-add)
    on the GPU; 2, pointer atomics under the CPU interpreter (which runs no descriptor atomic_add) or where
    SSD_TUNING["bwd"]["red"] = "ptr" asks for them (the GPU A/B of the two)."""
    interp = os.environ.get(SSD_INTERPRET_ENV) == "1"
    return 2 if interp or SSD_TUNING.get("bwd", {}).get("red", "tma") == "ptr" else 1


def _ssd_bwd(x, gates, B, C, d_mat, d_head, z, yp, h0, ckpt, dy, dfin, chunk_size, dt_softplus, generic) -> list:
    """The backward, either form and any number of groups: the gate pre-pass, then `_ssd_bwd_kernel` over batch *
    heads; the op's 12 gradients in its input order (None for absent inputs), for the caller to cast to the inputs'
    dtypes. gates: contiguous (dt, A, dt_bias, la, w, e) of the form, fp32 except dt; d_mat: D as (H, P) fp32,
    d_head: D was one value per head. The tensors given to descriptors must pass `_ssd_desc_ok`. With G < H the
    heads of a group add their dB, dC shares into fp32 rows (`_ssd_bc_red`); with G == H each program stores its own."""
    dt, A, dtb, la, w, e = gates
    bsz, seqlen, nheads, hdim = x.shape
    ngroups, dstate, nchunks = B.shape[2], B.shape[3], ckpt.shape[2]
    f32 = {"device": x.device, "dtype": torch.float32}
    dot, prec = _ssd_dot_dtype(x)
    bp, bn = _ssd_pow2(hdim), _ssd_pow2(dstate)
    dz = z.new_empty(z.shape) if z is not None else None
    dye = torch.empty_like(dy) if z is not None else dy
    # a per-head D's gradient comes from the loop (the sum of dy . x over positions), a per-column D's from the
    # pre-pass's column sums (it then reads x)
    pre_dcol = d_mat is not None and not d_head
    dd_part = torch.empty(bsz, nchunks, nheads, hdim, **f32) if pre_dcol else None
    dd_head = torch.empty(bsz, nheads, **f32) if d_head else None
    gshape = (bsz, seqlen, nheads)
    if z is not None or pre_dcol:
        _ssd_bwd_gate_kernel[(bsz * nchunks, nheads)](
            x, z if z is not None else x, yp if z is not None else x, dy, dz if z is not None else x, dye,
            dd_part if dd_part is not None else x, seqlen, nheads, hdim, nchunks, *x.stride()[:3],
            *(z if z is not None else x).stride()[:3], Q=chunk_size, BP=bp,
            HAS_Z=z is not None, HAS_D=pre_dcol, num_warps=4,
        )  # fmt: skip
    dx = x.new_empty(x.shape)
    grouped = ngroups < nheads
    red = _ssd_bc_red() if grouped else 0
    if grouped:  # the group's heads sum into these
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
    else:
        dB, dC = B.new_empty(B.shape), C.new_empty(C.shape)
    dla = dw = de = ddt = da = None
    if generic:
        dla, dw = torch.empty(gshape, **f32), torch.empty(gshape, **f32)
        de = torch.empty(gshape, **f32) if e is not None else None
    else:
        ddt, da = torch.empty(gshape, **f32), torch.empty(bsz, nheads, **f32)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    xd, dyd, dxd = (_ssd_desc(t, chunk_size, bp) for t in (x, dye, dx))
    bd, cd, dbd, dcd = (_ssd_desc(t, chunk_size, bn) for t in (B, C, dB, dC))
    ckd = TensorDescriptor.from_tensor(ckpt.view(-1, dstate, hdim), [1, bn, bp])
    any_f = la if generic else A  # a placeholder for the other form's pointers

    def _or(t):
        return t if t is not None else any_f

    _ssd_bwd_kernel[(bsz * nheads,)](
        xd, dyd, dxd, bd, cd, dbd, dcd, ckd, _or(la), _or(w), _or(e), _or(d_mat), _or(dfin), _or(dla), _or(dw),
        _or(de), _or(dh0), _or(dd_head), _or(dt), _or(A), _or(dtb), _or(ddt), _or(da), dB, dC, seqlen, nheads,
        ngroups, hdim, dstate, nchunks, Q=chunk_size, BP=bp, BN=bn, HAS_E=e is not None, HAS_D=d_mat is not None,
        D_HEAD=d_head, HAS_H0=h0 is not None, HAS_DHT=dfin is not None, DOT=dot, PREC=prec, GENERIC=generic,
        DT_SOFTPLUS=dt_softplus and not generic, HAS_DTB=dtb is not None, GROUPED=grouped, BC_RED=red,
        **_ssd_launch("bwd", chunk_size, dot),
    )  # fmt: skip
    dD = dd_head.sum(0) if d_head else (dd_part.sum((0, 1)) if pre_dcol else None)
    dA = da.sum(0) if not generic else None
    ddtb = ddt.sum((0, 1)) if dtb is not None else None
    return [dx, ddt, dA, ddtb, dla, dw, de, dB, dC, dD, dz, dh0]


def _ssd_bwd_padded(x, gates, B, C, d_mat, d_head, z, yp, h0, ckpt, dy, dfin, chunk_size, dt_softplus, generic):
    """The backward for the rare calls whose rows the tensor descriptors cannot take (`_ssd_desc_ok`), as the
    forward does them (`_ssd_fwd_padded`): `_ssd_bwd` on fresh copies with P and N zero-padded to aligned rows (x,
    dy, z, the output before the gate, B, C, D, h0, the final state's gradient, and the chunk states, which the
    forward stores (B, H, NC, N, P) unpadded), then the gradients cut back to the op's shapes. The zero columns
    change nothing: the padded rows of the state gradient stay 0, and what lands in padded columns is dropped. Speed
    does not matter here."""
    hdim, dstate = x.shape[3], B.shape[3]
    pc = _ssd_aligned(hdim, *(t for t in (x, dy, z, yp, ckpt) if t is not None))
    nc = _ssd_aligned(dstate, B, C)
    xs, dys, zs, yps, d_pad = (_ssd_zero_pad(t, pc) for t in (x, dy, z, yp, d_mat))
    bs, cs = _ssd_zero_pad(B, nc), _ssd_zero_pad(C, nc)
    h0s, dfs = _ssd_zero_pad(h0, pc, nc), _ssd_zero_pad(dfin, pc, nc)
    cks = _ssd_zero_pad(ckpt, nc, pc)
    dx, ddt, dA, ddtb, dla, dw, de, dB, dC, dD, dz, dh0 = _ssd_bwd(
        xs, gates, bs, cs, d_pad, d_head, zs, yps, h0s, cks, dys, dfs, chunk_size, dt_softplus, generic
    )

    def cut(t, *widths):  # contiguous, as the op's fake results are
        return _ssd_cut(t, *widths).contiguous() if t is not None else None

    dD = dD if d_head else cut(dD, hdim)
    return [cut(dx, hdim), ddt, dA, ddtb, dla, dw, de, cut(dB, dstate), cut(dC, dstate), dD, cut(dz, hdim),
            cut(dh0, hdim, dstate)]  # fmt: skip


def _ssd_scan_bwd_fake(
    x,
    dt,
    A,
    dt_bias,
    la,
    w,
    e,
    B,
    C,
    D,
    z,
    h0,
    ckpt,
    yp,
    dy,
    dfinal,
    chunk_size,
    dt_softplus,
    generic,
):
    inputs = (x, dt, A, dt_bias, la, w, e, B, C, D, z, h0)
    return tuple(t.new_empty(t.shape) if t is not None else scan_none(x) for t in inputs)


_SSD_ARGS = (
    "Tensor x, Tensor? dt, Tensor? A, Tensor? dt_bias, Tensor? la, Tensor? w, Tensor? e, Tensor B, Tensor C,"
    " Tensor? D, Tensor? z, Tensor? h0"
)
_ssd_scan_bwd_op = scan_op(
    "ssd_scan_bwd",
    f"({_SSD_ARGS}, Tensor ckpt, Tensor yp, Tensor dy, Tensor? dfinal, int chunk_size, bool dt_softplus,"
    " bool generic)"
    f" -> ({', '.join(['Tensor'] * 12)})",
    _ssd_scan_bwd_impl,
    _ssd_scan_bwd_fake,
)
_ssd_scan_op = scan_op(
    "ssd_scan",
    f"({_SSD_ARGS}, int chunk_size, bool dt_softplus, bool generic, bool want_final, bool grad)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    _ssd_scan_impl,
    _ssd_scan_fake,
    _ssd_scan_backward,
    _ssd_scan_setup,
)


def _ssd_needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Chunk states are kept only when a backward can follow."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Mamba-2 SSD scan. x (B,T,H,P); dt (B,T,H); A (H,) negative; B, C (B,T,G,N); D (H,) or (H,P);
    z (B,T,H,P); h0 (B,H,P,N) fp32. Returns y (B,T,H,P) in x's dtype, and the final state (B,H,P,N) fp32
    when return_final_state is set. One op (ssm_golf::ssd_scan)."""
    _ssd_check_shapes(x, dt, B, C, chunk_size)
    grad = _ssd_needs_grad(x, dt, A, dt_bias, B, C, D, z, h0)
    y, final, _, _ = _ssd_scan_op(
        x, dt, A, dt_bias, None, None, None, B, C, D, z, h0, chunk_size, dt_softplus, False,
        return_final_state, grad,
    )  # fmt: skip
    return (y, final) if return_final_state else y


def ssd_generic_scan(
    x: torch.Tensor,
    la: torch.Tensor,
    w: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    e: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Generic chunked scan: h_t = exp(la_t) h_{t-1} + w_t x_t B_t^T, y_t = h_t C_t - e_t... see module docstring.

    la (B,T,H) log-decay (must be <= 0), w (B,T,H) input weight, e (B,T,H) extra weight of the diagonal (j == t)
    term of the output only: y_t = sum_{j<t} decay w_j (C_t.B_j) x_j + (w_t + e_t)(C_t.B_t) x_t + carried + D x_t.
    The state carried out still uses w_t for the last step. Mamba-3 passes its rotated rows per head (G = H).
    One op (ssm_golf::ssd_scan, generic form)."""
    _ssd_check_shapes(x, la, B, C, chunk_size)
    grad = _ssd_needs_grad(x, la, w, e, B, C, D, z, h0)
    y, final, _, _ = _ssd_scan_op(
        x, None, None, None, la, w, e, B, C, D, z, h0, chunk_size, False, True,
        return_final_state, grad,
    )  # fmt: skip
    return (y, final) if return_final_state else y


def _ssd_ref_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ssd_generic_scan_ref(
    x: torch.Tensor,
    la: torch.Tensor,
    w: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    e: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Sequential PyTorch reference of `ssd_generic_scan` (float64 when x is float64, else float32)."""
    cd = _ssd_ref_dtype(x)
    bsz, seqlen, nheads, hdim = x.shape
    rep = nheads // B.shape[2]
    xs = x.to(cd)
    bs = B.to(cd).repeat_interleave(rep, dim=2)
    cs = C.to(cd).repeat_interleave(rep, dim=2)
    la_, w_ = la.to(cd), w.to(cd)
    e_ = e.to(cd) if e is not None else torch.zeros_like(w_)
    state = h0.to(cd) if h0 is not None else x.new_zeros(bsz, nheads, hdim, B.shape[3], dtype=cd)
    inputs = xs[..., :, None] * bs[..., None, :]
    decay = torch.exp(la_)
    states = []
    weighted = (w_[..., None, None] * inputs).unbind(1)
    for decay_t, input_t in zip(decay[..., None, None].unbind(1), weighted):
        state = torch.addcmul(input_t, decay_t, state)
        states.append(state)
    y = torch.einsum("bthpn,bthn->bthp", torch.stack(states, dim=1) + e_[..., None, None] * inputs, cs)
    if D is not None:
        y = y + (D.to(cd)[:, None] if D.dim() == 1 else D.to(cd)) * xs
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    return (y, state.to(torch.float32) if cd != torch.float64 else state) if return_final_state else y


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Sequential PyTorch reference of `ssd_scan`, same signature (chunk_size is ignored)."""
    cd = _ssd_ref_dtype(x)
    dtv = dt.to(cd)
    if dt_bias is not None:
        dtv = dtv + dt_bias.to(cd)
    if dt_softplus:
        dtv = F.softplus(dtv)
    la = dtv * A.to(cd)
    return ssd_generic_scan_ref(x, la, dtv, B, C, chunk_size, None, D, z, h0, return_final_state)
