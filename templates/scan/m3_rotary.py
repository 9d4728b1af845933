"""Mamba-3's per-head preparation: q/k head expansion, bias and rotation; the trapezoid weights and angles.

Head h of Mamba-3 uses q~ = rot(theta_h)(q_g + q_bias_h), k~ = rot(theta_h)(k_g + k_bias_h), rotating the adjacent
pairs (2r, 2r+1), r < R, by theta[b,t,h,r] (B,T,H,R): (e, o) -> (e cos - o sin, e sin + o cos)
(`m3_rotary_heads_ref`). `m3_rotate_heads` writes the rotated rows per head (B,T,H,N) once, in q's dtype, so that
the scan runs the plain SSD kernels on them (one row per head, no trigonometry in any chunk loop; on the H100 the
rotation inside the five SSD kernels cost 0.18 ms of the forward and 0.3 ms of the backward at 64 x 1024, against
~0.1 ms to write and read the rows). One program per (time block, batch, group) reads the group's rows once and
loops over its heads. The backward (ssm_golf::m3_rotate_bwd) rotates the rows' gradients back (by -theta), sums
them over the heads of a group in registers, reduces the bias gradients per program, and writes one d theta per head
with q's and k's shares summed: d theta = -dout_even * out_odd + dout_odd * out_even. Rows move as whole
contiguous tiles, split into even and odd elements in registers (stride-2 loads and stores of the pairs cost 12x
the bytes' time on the H100).

`m3_gates(dt, trap, angles, theta0)` gives the scan's per-position weights and the cumulative angles in one pass
over time per (batch, head), instead of eager (B,T,H)-sized gate tensors and an eager cumsum over (B,T,H,R):
    lambda_t = sigmoid(trap_t), b'_t = (1 - lambda_t) dt_t, w_t = lambda_t dt_t + b'_{t+1} (b'_{T+1} = 0),
    e_t = -b'_{t+1}, theta_t = theta0 + sum_{s<=t} angles_s dt_s.
Its backward is the same walk in reverse: d theta summed from the end (a reverse cumsum carried across blocks) gives
d angles_t = dt_t S_t and dt's angle term <angles_t, S_t>; d b'_t = dw_{t-1} - de_{t-1}; d theta0 = S_1.
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from templates.scan.ops import scan_none, scan_op, scan_opt, scan_ref_vjp

M3R_BLOCK_T = 32
M3R_BWD_WARPS = 4  # warps of the rotary backward
M3G_BLOCK_T = 64


@triton.jit
def m3_cos_sin(theta, FAST: tl.constexpr):
    """cos and sin of fp32 angles. FAST (on the GPU): reduced to [-pi, pi] with a two-constant 2 pi (exact to fp32
    rounding of theta itself), then the hardware's approximate cos/sin (absolute error ~2^-20 there), instead of
    libdevice's accurate forms; the interpreter has no hardware form, so the CPU tests run the accurate ones."""
    if FAST:
        k = tl.floor(theta * 0.15915494309189535 + 0.5)
        r = tl.fma(-k, 6.2831854820251465, theta)
        r = tl.fma(-k, -1.7484555314695172e-07, r)
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    else:
        return tl.cos(theta), tl.sin(theta)


@triton.jit
def _m3r_rows(ptr, rows, offs_n, mask_t, N):
    """Whole rows, one contiguous [BT, 2 BR] load, as stored."""
    mask = mask_t[:, None] & (offs_n < N)[None, :]
    return tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0)


@triton.jit
def _m3r_split(tile, BT: tl.constexpr, BR: tl.constexpr):
    """A [BT, 2 BR] tile of rows split into their even and odd elements (fp32)."""
    return tl.split(tl.reshape(tile.to(tl.float32), (BT, BR, 2)))


@triton.jit
def _m3r_pairs(ptr, rows, offs_n, mask_t, N, BT: tl.constexpr, BR: tl.constexpr):
    """Whole rows (contiguous [BT, 2 BR] loads), split into their even and odd elements (fp32)."""
    return _m3r_split(_m3r_rows(ptr, rows, offs_n, mask_t, N), BT, BR)


@triton.jit
def _m3r_bias_row(BIAS, h, live, offs_n, N, HAS_BIAS: tl.constexpr):
    """Head h's bias row [2 BR] in fp32 (zeros without the bias)."""
    if HAS_BIAS:
        return tl.load(BIAS + h * N + offs_n, mask=(offs_n < N) & live, other=0.0).to(tl.float32)
    else:
        return tl.zeros(offs_n.shape, dtype=tl.float32)


@triton.jit
def _m3r_head_loads(TH, DQO, DKO, QB, KB, row, h, h_end, offs_r, offs_n, mask_t, N, R, H,
                    HAS_QB: tl.constexpr, HAS_KB: tl.constexpr):  # fmt: skip
    """Head h's angles [BT, BR], the gradients of its rotated q and k rows [BT, 2 BR] as stored, and its bias rows
    (nothing is read for h >= h_end). The head loop issues them one head ahead, so that a head's loads wait behind
    the previous head's arithmetic instead of stalling the program (nothing here feeds a dot, so the compiler does
    not pipeline them itself)."""
    head_live = tl.full((1,), h, tl.int32) < h_end  # a tensor: h may be a plain int (the interpreter's counter)
    live = mask_t & head_live
    rows = row * H + h
    theta = tl.load(TH + rows[:, None] * R + offs_r[None, :], mask=live[:, None] & (offs_r < R)[None, :], other=0.0)
    qb = _m3r_bias_row(QB, h, head_live, offs_n, N, HAS_QB)
    kb = _m3r_bias_row(KB, h, head_live, offs_n, N, HAS_KB)
    return theta, _m3r_rows(DQO, rows, offs_n, live, N), _m3r_rows(DKO, rows, offs_n, live, N), qb, kb


@triton.jit
def _m3r_store_pairs(ptr, rows, offs_n, mask_t, N, even, odd, BT: tl.constexpr, BR: tl.constexpr):
    """Interleave even and odd back into whole rows and write them with one contiguous store."""
    mask = mask_t[:, None] & (offs_n < N)[None, :]
    tile = tl.reshape(tl.join(even, odd), (BT, 2 * BR))
    tl.store(ptr + rows[:, None] * N + offs_n[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _m3r_bias(even, odd, bias, BR: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A head's bias row [2 BR] (fp32) added to its group's pairs."""
    if HAS_BIAS:
        b_even, b_odd = tl.split(tl.reshape(bias, (BR, 2)))
        even += b_even[None, :]
        odd += b_odd[None, :]
    return even, odd


@triton.jit
def _m3r_bwd_head(v_even, v_odd, bias, dout, DBIAS_PART, part, cos, sin, offs_n, N,
                  BT: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """One head's side of one of q, k: its d theta share, and d v in the unrotated frame (bias partials stored);
    dout is the head's [BT, 2 BR] tile of the gradient of its rotated rows, bias its bias row."""
    even, odd = _m3r_bias(v_even, v_odd, bias, BR, HAS_BIAS)
    d_even_r, d_odd_r = _m3r_split(dout, BT, BR)
    d_theta = -d_even_r * (even * sin + odd * cos) + d_odd_r * (even * cos - odd * sin)
    d_even = d_even_r * cos + d_odd_r * sin
    d_odd = d_odd_r * cos - d_even_r * sin
    if HAS_BIAS:
        pair_sums = tl.reshape(tl.join(tl.sum(d_even, axis=0), tl.sum(d_odd, axis=0)), (2 * BR,))
        tl.store(DBIAS_PART + part * N + offs_n, pair_sums, mask=offs_n < N)
    return d_theta, d_even, d_odd


@triton.jit
def _m3r_block(T, H, G, BT: tl.constexpr, BR: tl.constexpr):
    """The program's batch (int64), group, heads per group, and its block of steps: offsets over steps, pairs and row
    elements, the step mask, and the (batch T + t) row numbers (grid: time blocks x batch groups)."""
    bg = tl.program_id(1)
    b64 = (bg // G).to(tl.int64)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    row = b64 * T + offs_t.to(tl.int64)
    return b64, bg % G, H // G, offs_t, tl.arange(0, BR), tl.arange(0, 2 * BR), offs_t < T, row


@triton.jit
def _m3r_fwd_kernel(
    QV, KV, QB, KB, TH, QR, KR, T, H, G, N, R,
    BT: tl.constexpr, BR: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """One program per (time block, batch, group): the group's q and k rows read once, then per head the bias added
    and the pairs rotated, written as that head's rows (pairs r >= R get angle 0: they pass through)."""
    b64, g, hpg, offs_t, offs_r, offs_n, mask_t, row = _m3r_block(T, H, G, BT, BR)
    q_even, q_odd = _m3r_pairs(QV, row * G + g, offs_n, mask_t, N, BT, BR)
    k_even, k_odd = _m3r_pairs(KV, row * G + g, offs_n, mask_t, N, BT, BR)
    th_mask = mask_t[:, None] & (offs_r < R)[None, :]
    for h in range(g * hpg, (g + 1) * hpg):
        rows = row * H + h
        theta = tl.load(TH + rows[:, None] * R + offs_r[None, :], mask=th_mask, other=0.0)
        cos, sin = m3_cos_sin(theta, FAST)
        live = tl.full((1,), 1, tl.int1)
        even, odd = _m3r_bias(q_even, q_odd, _m3r_bias_row(QB, h, live, offs_n, N, HAS_QB), BR, HAS_QB)
        _m3r_store_pairs(QR, rows, offs_n, mask_t, N, even * cos - odd * sin, even * sin + odd * cos, BT, BR)
        even, odd = _m3r_bias(k_even, k_odd, _m3r_bias_row(KB, h, live, offs_n, N, HAS_KB), BR, HAS_KB)
        _m3r_store_pairs(KR, rows, offs_n, mask_t, N, even * cos - odd * sin, even * sin + odd * cos, BT, BR)


@triton.jit
def _m3r_bwd_kernel(
    QV, KV, QB, KB, TH, DQO, DKO, DQ, DK, DTH, DQB_PART, DKB_PART, T, H, G, N, R,
    BT: tl.constexpr, BR: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """One program per (time block, batch, group) loops over the group's heads: d q and d k summed over them in
    registers, one d theta per head (q's and k's shares together), bias partials per (head, time block). Each
    head's loads are issued during the previous head (`_m3r_head_loads`)."""
    b64, g, hpg, offs_t, offs_r, offs_n, mask_t, row = _m3r_block(T, H, G, BT, BR)
    q_even, q_odd = _m3r_pairs(QV, row * G + g, offs_n, mask_t, N, BT, BR)
    k_even, k_odd = _m3r_pairs(KV, row * G + g, offs_n, mask_t, N, BT, BR)
    dq_even = tl.zeros((BT, BR), dtype=tl.float32)
    dq_odd = tl.zeros((BT, BR), dtype=tl.float32)
    dk_even = tl.zeros((BT, BR), dtype=tl.float32)
    dk_odd = tl.zeros((BT, BR), dtype=tl.float32)
    th_mask = mask_t[:, None] & (offs_r < R)[None, :]
    h_end = (g + 1) * hpg
    nxt = _m3r_head_loads(TH, DQO, DKO, QB, KB, row, g * hpg, h_end, offs_r, offs_n, mask_t, N, R, H, HAS_QB, HAS_KB)
    for h in range(g * hpg, h_end):
        theta, dqo, dko, qb, kb = nxt
        nxt = _m3r_head_loads(TH, DQO, DKO, QB, KB, row, h + 1, h_end, offs_r, offs_n, mask_t, N, R, H, HAS_QB, HAS_KB)
        cos, sin = m3_cos_sin(theta, FAST)
        part = (b64 * H + h) * tl.num_programs(0) + tl.program_id(0)
        d_theta, d_even, d_odd = _m3r_bwd_head(
            q_even, q_odd, qb, dqo, DQB_PART, part, cos, sin, offs_n, N, BT, BR, HAS_QB
        )
        dq_even += d_even
        dq_odd += d_odd
        dk_theta, d_even, d_odd = _m3r_bwd_head(
            k_even, k_odd, kb, dko, DKB_PART, part, cos, sin, offs_n, N, BT, BR, HAS_KB
        )
        dk_even += d_even
        dk_odd += d_odd
        tl.store(DTH + (row * H + h)[:, None] * R + offs_r[None, :], d_theta + dk_theta, mask=th_mask)
    _m3r_store_pairs(DQ, row * G + g, offs_n, mask_t, N, dq_even, dq_odd, BT, BR)
    _m3r_store_pairs(DK, row * G + g, offs_n, mask_t, N, dk_even, dk_odd, BT, BR)


def _m3r_use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def m3_rotary_heads_ref(
    v: torch.Tensor, bias: torch.Tensor | None, theta: torch.Tensor, nheads: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """Head expansion, bias and rotation of v (B,T,G,N) -> (B,T,H,N) in PyTorch: the reference of `m3_rotate_heads`
    (fp32 math, fp64 when v is fp64)."""
    cd = torch.float64 if v.dtype == torch.float64 else torch.float32
    heads = v.to(cd).repeat_interleave(nheads // v.shape[2], dim=2)
    if bias is not None:
        heads = heads + bias.to(cd)
    rdim = theta.shape[-1]
    pairs = heads[..., : 2 * rdim].unflatten(-1, (rdim, 2))
    cos, sin = torch.cos(theta.to(cd)), torch.sin(theta.to(cd))
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((turned, heads[..., 2 * rdim :]), dim=-1).to(out_dtype)


def _m3r_opt(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous() if t is not None else like


# ---- ssm_golf::m3_rotate: the rotated rows per head, and its backward op ----


def _m3r_br(dstate: int) -> int:
    return max(16, triton.next_power_of_2(dstate // 2))


def _m3r_impl(q, k, q_bias, k_bias, theta, nheads):
    if not _m3r_use_triton(q):
        return tuple(m3_rotary_heads_ref(v, b, theta, nheads, v.dtype) for v, b in ((q, q_bias), (k, k_bias)))
    bsz, seqlen, ngroups, dstate = q.shape
    q_c, k_c, theta_c = q.contiguous(), k.contiguous(), theta.float().contiguous()
    q_rot = torch.empty(bsz, seqlen, nheads, dstate, device=q.device, dtype=q.dtype)
    k_rot = torch.empty(bsz, seqlen, nheads, dstate, device=k.device, dtype=k.dtype)
    _m3r_fwd_kernel[(triton.cdiv(seqlen, M3R_BLOCK_T), bsz * ngroups)](
        q_c, k_c, _m3r_opt(q_bias, theta_c), _m3r_opt(k_bias, theta_c), theta_c, q_rot, k_rot,
        seqlen, nheads, ngroups, dstate, theta.shape[-1], BT=M3R_BLOCK_T, BR=_m3r_br(dstate),
        HAS_QB=q_bias is not None, HAS_KB=k_bias is not None, FAST=theta.is_cuda,
    )  # fmt: skip
    return q_rot, k_rot


def _m3r_fake(q, k, q_bias, k_bias, theta, nheads):
    shape = (*q.shape[:2], nheads, q.shape[3])
    return q.new_empty(shape), k.new_empty(shape)


def _m3r_setup(ctx, inputs, output):
    ctx.nheads = inputs[5]
    ctx.save_for_backward(*inputs[:5])


def _m3r_backward(ctx, dq_rot, dk_rot):
    q, k, q_bias, k_bias, theta = ctx.saved_tensors
    shape = (*q.shape[:2], ctx.nheads, q.shape[3])
    dq_rot = dq_rot if dq_rot is not None else q.new_zeros(shape)
    dk_rot = dk_rot if dk_rot is not None else k.new_zeros(shape)
    dq, dk, dqb, dkb, dth = _m3r_bwd_op(q, k, q_bias, k_bias, theta, dq_rot, dk_rot, ctx.nheads)
    return dq, dk, scan_opt(dqb), scan_opt(dkb), dth, None


def _m3r_bwd_impl(q, k, q_bias, k_bias, theta, dq_out, dk_out, nheads):
    """(dq, dk, dq_bias, dk_bias, dtheta): the rotated rows' gradients (B,T,H,N) back to the group rows (B,T,G,N),
    the biases and the angles; a placeholder for an absent bias."""
    if not _m3r_use_triton(q):
        return tuple(scan_ref_vjp(lambda *a: _m3r_impl(*a, nheads), [q, k, q_bias, k_bias, theta], [dq_out, dk_out]))
    bsz, seqlen, ngroups, dstate = q.shape
    q_c, k_c, theta_c = q.contiguous(), k.contiguous(), theta.float().contiguous()
    f32 = {"device": q.device, "dtype": torch.float32}
    # fp32 rows, cast afterwards: storing bf16 straight from the registers made the kernel 0.243 -> 0.275 ms on the
    # H100 at 64 x 1024, more than the two casts' 0.018
    dq, dk = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32)
    dth = torch.empty(theta.shape, **f32)
    n_tb = triton.cdiv(seqlen, M3R_BLOCK_T)
    dqb_part = torch.empty(bsz, nheads, n_tb, dstate, **f32) if q_bias is not None else None
    dkb_part = torch.empty(bsz, nheads, n_tb, dstate, **f32) if k_bias is not None else None
    _m3r_bwd_kernel[(n_tb, bsz * ngroups)](
        q_c, k_c, _m3r_opt(q_bias, dth), _m3r_opt(k_bias, dth), theta_c, dq_out.contiguous(), dk_out.contiguous(),
        dq, dk, dth, dqb_part if dqb_part is not None else dth, dkb_part if dkb_part is not None else dth,
        seqlen, nheads, ngroups, dstate, theta.shape[-1], BT=M3R_BLOCK_T, BR=_m3r_br(dstate),
        HAS_QB=q_bias is not None, HAS_KB=k_bias is not None, FAST=theta.is_cuda, num_warps=M3R_BWD_WARPS,
    )  # fmt: skip

    def bias_grad(part, bias):
        return part.sum((0, 2)).to(bias.dtype) if part is not None else scan_none(dq)

    return dq.to(q.dtype), dk.to(k.dtype), bias_grad(dqb_part, q_bias), bias_grad(dkb_part, k_bias), dth.to(theta.dtype)


def _m3r_bwd_fake(q, k, q_bias, k_bias, theta, dq_out, dk_out, nheads):
    def like(t):
        return t.new_empty(t.shape) if t is not None else scan_none(q)

    return like(q), like(k), like(q_bias), like(k_bias), like(theta)


_m3r_bwd_op = scan_op(
    "m3_rotate_bwd",
    "(Tensor q, Tensor k, Tensor? q_bias, Tensor? k_bias, Tensor theta, Tensor dq_out, Tensor dk_out, int nheads)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _m3r_bwd_impl,
    _m3r_bwd_fake,
)
_m3r_op = scan_op(
    "m3_rotate",
    "(Tensor q, Tensor k, Tensor? q_bias, Tensor? k_bias, Tensor theta, int nheads) -> (Tensor, Tensor)",
    _m3r_impl,
    _m3r_fake,
    _m3r_backward,
    _m3r_setup,
)


def m3_rotate_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    theta: torch.Tensor,
    nheads: int,
) -> tuple:
    """(q~, k~): the group rows q, k (B,T,G,N) expanded to nheads heads, each head's bias (H,N) added and its pairs
    rotated by theta (B,T,H,R), 2R <= N; (B,T,H,N) in q's and k's dtypes. One op (ssm_golf::m3_rotate)."""
    return _m3r_op(q, k, q_bias, k_bias, theta, nheads)


# ---- ssm_golf::m3_gates: trapezoid weights and cumulative angles, one walk over time per (batch, head) ----


@triton.jit
def _m3g_gate(DT, TRAP, base_dt, base_tr, offs_t, mask_t, s_dt, s_tr):
    """dt_t and lambda_t = sigmoid(trap_t) at the given steps (0 where masked)."""
    dt = tl.load(DT + base_dt + offs_t * s_dt, mask=mask_t, other=0.0).to(tl.float32)
    lam = tl.sigmoid(tl.load(TRAP + base_tr + offs_t * s_tr, mask=mask_t, other=0.0).to(tl.float32))
    return dt, lam


@triton.jit
def _m3g_fwd_kernel(
    DT, TRAP, ANG, TH0, W, E, TH, T, H, R,
    s_dt_b, s_dt_t, s_dt_h, s_tr_b, s_tr_t, s_tr_h, s_an_b, s_an_t, s_an_h,
    BT: tl.constexpr, BR: tl.constexpr, HAS_TH0: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    offs_r = tl.arange(0, BR)
    mask_r = offs_r < R
    base_dt = b64 * s_dt_b + h * s_dt_h
    base_tr = b64 * s_tr_b + h * s_tr_h
    base_an = b64 * s_an_b + h * s_an_h
    out_g = b64 * T * H + h  # (B,T,H) outputs, contiguous
    out_th = (b64 * T * H + h) * R  # theta (B,T,H,R) contiguous: row (b T + t) H + h
    if HAS_TH0:
        carry = tl.load(TH0 + bh * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BR,), dtype=tl.float32)
    for tb in tl.range(0, tl.cdiv(T, BT), num_stages=NS):
        offs_t = tb * BT + tl.arange(0, BT)
        mask_t = offs_t < T
        dt, lam = _m3g_gate(DT, TRAP, base_dt, base_tr, offs_t, mask_t, s_dt_t, s_tr_t)
        dt_n, lam_n = _m3g_gate(DT, TRAP, base_dt, base_tr, offs_t + 1, offs_t + 1 < T, s_dt_t, s_tr_t)
        b_next = (1.0 - lam_n) * dt_n
        tl.store(W + out_g + offs_t * H, lam * dt + b_next, mask=mask_t)
        tl.store(E + out_g + offs_t * H, -b_next, mask=mask_t)
        m2 = mask_t[:, None] & mask_r[None, :]
        ang = tl.load(ANG + base_an + offs_t[:, None] * s_an_t + offs_r[None, :], mask=m2, other=0.0).to(tl.float32)
        theta = tl.cumsum(ang * dt[:, None], axis=0) + carry[None, :]
        tl.store(TH + out_th + offs_t[:, None] * (H * R) + offs_r[None, :], theta, mask=m2)
        carry = tl.sum(tl.where((offs_t == tb * BT + BT - 1)[:, None], theta, 0.0), axis=0)
        # the last block may be partial: its carry is never used


@triton.jit
def _m3g_bwd_kernel(
    DT, TRAP, ANG, DW, DE, DTH, DDT, DTRAP, DANG, DTH0, T, H, R,
    s_dt_b, s_dt_t, s_dt_h, s_tr_b, s_tr_t, s_tr_h, s_an_b, s_an_t, s_an_h,
    BT: tl.constexpr, BR: tl.constexpr, HAS_TH0: tl.constexpr, NS: tl.constexpr,
):  # fmt: skip
    """Reverse walk: S_t = sum_{s>=t} d theta_s carried across blocks; dt, trap and angle gradients per step."""
    bh = tl.program_id(0)
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    offs_r = tl.arange(0, BR)
    mask_r = offs_r < R
    base_dt = b64 * s_dt_b + h * s_dt_h
    base_tr = b64 * s_tr_b + h * s_tr_h
    base_an = b64 * s_an_b + h * s_an_h
    out_g = b64 * T * H + h
    out_th = (b64 * T * H + h) * R
    carry = tl.zeros((BR,), dtype=tl.float32)
    nb = tl.cdiv(T, BT)
    for tbb in tl.range(0, nb, num_stages=NS):
        tb = nb - 1 - tbb
        offs_t = tb * BT + tl.arange(0, BT)
        mask_t = offs_t < T
        m2 = mask_t[:, None] & mask_r[None, :]
        dth = tl.load(DTH + out_th + offs_t[:, None] * (H * R) + offs_r[None, :], mask=m2, other=0.0)
        suffix = tl.cumsum(dth, axis=0, reverse=True) + carry[None, :]
        carry = tl.sum(tl.where((offs_t == tb * BT)[:, None], suffix, 0.0), axis=0)
        ang = tl.load(ANG + base_an + offs_t[:, None] * s_an_t + offs_r[None, :], mask=m2, other=0.0).to(tl.float32)
        dt, lam = _m3g_gate(DT, TRAP, base_dt, base_tr, offs_t, mask_t, s_dt_t, s_tr_t)
        dang = (suffix * dt[:, None]).to(DANG.dtype.element_ty)
        tl.store(DANG + out_th + offs_t[:, None] * (H * R) + offs_r[None, :], dang, mask=m2)
        d_gamma = tl.load(DW + out_g + offs_t * H, mask=mask_t, other=0.0)
        prev = mask_t & (offs_t >= 1)
        d_bp = tl.load(DW + out_g + (offs_t - 1) * H, mask=prev, other=0.0)
        d_bp -= tl.load(DE + out_g + (offs_t - 1) * H, mask=prev, other=0.0)
        ddt = d_gamma * lam + d_bp * (1.0 - lam) + tl.sum(suffix * ang, axis=1)
        tl.store(DDT + out_g + offs_t * H, ddt.to(DDT.dtype.element_ty), mask=mask_t)
        dtrap = (d_gamma - d_bp) * dt * lam * (1.0 - lam)
        tl.store(DTRAP + out_g + offs_t * H, dtrap.to(DTRAP.dtype.element_ty), mask=mask_t)
    if HAS_TH0:
        tl.store(DTH0 + bh * R + offs_r, carry, mask=mask_r)


def m3_gates_ref(dt: torch.Tensor, trap: torch.Tensor, angles: torch.Tensor, theta0: torch.Tensor | None) -> tuple:
    """PyTorch reference of `m3_gates`: (w, e, theta), fp32 (fp64 when dt is fp64)."""
    cd = torch.float64 if dt.dtype == torch.float64 else torch.float32
    dtf = dt.to(cd)
    lam = torch.sigmoid(trap.to(cd))
    b_next = torch.nn.functional.pad(((1.0 - lam) * dtf)[:, 1:], (0, 0, 0, 1))
    theta = torch.cumsum(angles.to(cd) * dtf[..., None], dim=1)
    if theta0 is not None:
        theta = theta + theta0.to(cd)[:, None]
    return lam * dtf + b_next, -b_next, theta


def _m3g_stages(t: torch.Tensor, programs: int) -> int:
    """Software-pipeline depth of the gates walks' loops over time blocks: with few (batch, head) programs per SM
    their loads wait unhidden, so three stages prefetch the next blocks; with many, the other programs hide it. On
    the H100: 256 programs (16 x 4096, 16 heads) 0.149 / 0.203 -> 0.081 / 0.121 ms forward / backward at 3 stages;
    1,024 programs (64 x 1024) 0.071 / 0.108 at 1 stage against 0.075 / 0.114 at 3."""
    if not t.is_cuda:
        return 1
    return 3 if programs <= 4 * torch.cuda.get_device_properties(t.device).multi_processor_count else 1


def _m3g_strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride()[:3])


def _m3g_inputs(dt, trap, angles):
    """Strided (B,T,H[,R]) views are read in place; angles need a unit stride along R."""
    return dt, trap, angles if angles.stride(-1) == 1 else angles.contiguous()


def _m3g_impl(dt, trap, angles, theta0):
    if not _m3r_use_triton(dt):
        return m3_gates_ref(dt, trap, angles, theta0)
    bsz, seqlen, nheads, rdim = angles.shape
    dt, trap, angles = _m3g_inputs(dt, trap, angles)
    f32 = {"device": dt.device, "dtype": torch.float32}
    w, e = torch.empty(bsz, seqlen, nheads, **f32), torch.empty(bsz, seqlen, nheads, **f32)
    theta = torch.empty(bsz, seqlen, nheads, rdim, **f32)
    th0 = theta0.float().contiguous() if theta0 is not None else None
    _m3g_fwd_kernel[(bsz * nheads,)](
        dt, trap, angles, th0 if th0 is not None else theta, w, e, theta, seqlen, nheads, rdim,
        *_m3g_strides(dt), *_m3g_strides(trap), *_m3g_strides(angles),
        BT=M3G_BLOCK_T, BR=max(16, triton.next_power_of_2(rdim)), HAS_TH0=th0 is not None,
        NS=_m3g_stages(dt, bsz * nheads),
    )  # fmt: skip
    return w, e, theta


def _m3g_fake(dt, trap, angles, theta0):
    cd = torch.float64 if dt.dtype == torch.float64 and not _m3r_use_triton(dt) else torch.float32
    return dt.new_empty(dt.shape, dtype=cd), dt.new_empty(dt.shape, dtype=cd), angles.new_empty(angles.shape, dtype=cd)


def _m3g_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _m3g_backward(ctx, dw, de, dtheta):
    dt, trap, angles, theta0 = ctx.saved_tensors
    dw = dw if dw is not None else torch.zeros(dt.shape, device=dt.device)
    de = de if de is not None else torch.zeros(dt.shape, device=dt.device)
    dtheta = dtheta if dtheta is not None else torch.zeros(angles.shape, device=dt.device)
    ddt, dtrap, dang, dth0 = _m3g_bwd_op(dt, trap, angles, theta0, dw, de, dtheta)
    return ddt, dtrap, dang, scan_opt(dth0)


def _m3g_bwd_impl(dt, trap, angles, theta0, dw, de, dtheta):
    if not _m3r_use_triton(dt):
        return tuple(scan_ref_vjp(m3_gates_ref, [dt, trap, angles, theta0], [dw, de, dtheta]))
    bsz, seqlen, nheads, rdim = angles.shape
    dt, trap, angles = _m3g_inputs(dt, trap, angles)
    f32 = {"device": dt.device, "dtype": torch.float32}
    # the gradients stored in their inputs' dtypes straight from the registers (no fp32 copies cast afterwards)
    ddt = torch.empty(bsz, seqlen, nheads, device=dt.device, dtype=dt.dtype)
    dtrap = torch.empty(bsz, seqlen, nheads, device=dt.device, dtype=trap.dtype)
    dang = torch.empty(bsz, seqlen, nheads, rdim, device=dt.device, dtype=angles.dtype)
    dth0 = torch.empty(bsz, nheads, rdim, **f32) if theta0 is not None else None
    _m3g_bwd_kernel[(bsz * nheads,)](
        dt, trap, angles, dw.float().contiguous(), de.float().contiguous(), dtheta.float().contiguous(),
        ddt, dtrap, dang, dth0 if dth0 is not None else dang, seqlen, nheads, rdim,
        *_m3g_strides(dt), *_m3g_strides(trap), *_m3g_strides(angles),
        BT=M3G_BLOCK_T, BR=max(16, triton.next_power_of_2(rdim)), HAS_TH0=theta0 is not None,
        NS=_m3g_stages(dt, bsz * nheads),
    )  # fmt: skip
    return ddt, dtrap, dang, dth0.to(theta0.dtype) if dth0 is not None else scan_none(ddt)


def _m3g_bwd_fake(dt, trap, angles, theta0, dw, de, dtheta):
    dth0 = theta0.new_empty(theta0.shape) if theta0 is not None else scan_none(dt)
    return dt.new_empty(dt.shape), trap.new_empty(trap.shape), angles.new_empty(angles.shape), dth0


_m3g_bwd_op = scan_op(
    "m3_gates_bwd",
    "(Tensor dt, Tensor trap, Tensor angles, Tensor? theta0, Tensor dw, Tensor de, Tensor dtheta)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    _m3g_bwd_impl,
    _m3g_bwd_fake,
)
_m3g_op = scan_op(
    "m3_gates",
    "(Tensor dt, Tensor trap, Tensor angles, Tensor? theta0) -> (Tensor, Tensor, Tensor)",
    _m3g_impl,
    _m3g_fake,
    _m3g_backward,
    _m3g_setup,
)


def m3_gates(dt: torch.Tensor, trap: torch.Tensor, angles: torch.Tensor, theta0: torch.Tensor | None) -> tuple:
    """Mamba-3's scan weights and cumulative angles (w, e, theta): dt, trap (B,T,H), angles (B,T,H,R), theta0 (B,H,R)
    or None. Math in the module docstring."""
    return _m3g_op(dt, trap, angles, theta0)
