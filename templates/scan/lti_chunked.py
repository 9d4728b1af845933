"""LTI scan h_t = a * h_{t-1} + x_t with one constant decay per head, on tensor cores: the Toeplitz form.

Inside a chunk of BT steps, y = L x + a^(i+1) h_prev with L[i, j] = a^(i-j) for i >= j, one BT x BT matrix shared
by every channel of the head, so the recurrence becomes a small matrix product per chunk and only the carry h
crosses chunks. One program walks the chunks of (one sequence, BP channels) in order with the carry in registers,
so each element is read and written once. The carry is held as a BT x BP tile with the same row repeated, the
product of x with one row of L repeated on every row (a second small matrix product): the next chunk finds it on
every row of its own tile, with no reduction across rows on the chunk-to-chunk path. The backward is the same with
L transposed, walking the chunks in reverse; it also gives d h_0 = a lambda_1 and d log_a = a sum lambda_t h_{t-1}
as one partial sum per program (a small [heads, programs] buffer summed after it, in a fixed order: deterministic).
The kernels read the decays as log_a per head, so nothing but that sum runs around them. bf16 inputs multiply by L
split into two bf16 halves (hi + lo), keeping about 16 bits of L (config prec=tf32: one tf32 product, 11 bits); fp32
inputs use tf32x3 dots; the interpreter uses plain fp32 dots.
Chosen through `lti_scan(..., config={"method": "toeplitz"})` in templates/scan/first_order.py.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _ltc_dot(m, x, x_lp, acc, SPLIT: tl.constexpr):
    # SPLIT 1: L as two bf16 halves (about 16 bits of it); 2: one tf32 dot (11 bits of L, bf16 x exact), one MMA
    # chain instead of two; 0: tf32x3 (fp32 inputs, about fp32 accuracy). acc (the carry term) enters the
    # accumulator: a constant zero accumulator would get another MMA layout, and a conversion between the two dots
    if SPLIT == 1:
        m_hi = m.to(tl.bfloat16)
        m_lo = (m - m_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(m_hi, x_lp, acc=acc, out_dtype=tl.float32)
        acc = tl.dot(m_lo, x_lp, acc=acc, out_dtype=tl.float32)
    elif SPLIT == 2:
        acc = tl.dot(m, x, acc=acc, input_precision="tf32", out_dtype=tl.float32)
    else:
        acc = tl.dot(m, x, acc=acc, input_precision="tf32x3", out_dtype=tl.float32)
    return acc


@triton.jit
def _ltc_kernel(
    x_ptr,
    la_ptr,
    c0_ptr,
    out_ptr,
    fin_ptr,
    hp_ptr,
    h0_ptr,
    da_ptr,
    T,
    D,
    W,
    REVERSE: tl.constexpr,
    HAS_C0: tl.constexpr,
    STORE_FIN: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_H0: tl.constexpr,
    SPLIT: tl.constexpr,
    BT: tl.constexpr,
    BP: tl.constexpr,
):
    """Forward: out = h, fin = h_T. REVERSE: x = dL/dh, c0 = dL/dh_T, out = lambda, fin = dL/dh_0, and with
    HAS_DA, da = this program's share of dL/dlog_a of its head, a * sum_{t, its channels} lambda_t h_{t-1}
    (hp = forward h, h0 = forward h_0), stored at [head, sequence, program within the head]."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, BT)
    cols = pid_d * BP + tl.arange(0, BP)
    mask_d = cols < D
    base = pid_b * T * D
    # la: the log decay of each head of W channels, read as it is (no exp launch before the kernel): powers of a
    # are exp2 of multiples of log2(a) = log(a) * log2(e)
    head = (pid_d * BP) // W
    l2a = tl.load(la_ptr + head).to(tl.float32) * 1.4426950408889634
    diff = rows[:, None] - rows[None, :]
    if REVERSE:
        diff = -diff
    mat = tl.where(diff >= 0, tl.math.exp2(tl.maximum(diff, 0).to(tl.float32) * l2a), 0.0)
    # the carry's chunk term, one row of `mat` (the chunk's last row forward, its first in reverse) repeated on
    # every row: its product with x is the carry on every row of the tile, where the next chunk needs it, with no
    # reduction across rows (nor a barrier) on the chunk-to-chunk path
    if REVERSE:
        wpow = rows
    else:
        wpow = BT - 1 - rows
    wmat = tl.zeros([BT, BT], dtype=tl.float32) + tl.math.exp2(wpow.to(tl.float32) * l2a)[None, :]
    if HAS_C0:
        c0 = tl.load(c0_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    else:
        c0 = tl.zeros([BP], dtype=tl.float32)
    carry = tl.zeros([BT, BP], dtype=tl.float32) + c0[None, :]
    h = tl.zeros([BT, BP], dtype=tl.float32)
    if HAS_DA:
        # the elementwise products are summed over time once, at the end (no cross-row reduction per chunk)
        da_acc = tl.zeros([BT, BP], dtype=tl.float32)
        if HAS_H0:
            h0v = tl.load(h0_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    n_chunks = tl.cdiv(T, BT)
    if HAS_DA:
        # h_{t-1} of the first chunk walked; each chunk loads the next one's before its own dot, so that this load
        # (which feeds no dot, and so is not pipelined by the compiler) overlaps a chunk of work
        t_n = (n_chunks - 1) * BT + rows
        m_n = (t_n < T)[:, None] & mask_d[None, :]
        hp_n = tl.load(
            hp_ptr + base + t_n.to(tl.int64)[:, None] * D + cols[None, :] - D, mask=m_n & (t_n >= 1)[:, None], other=0.0
        )
    for kk in range(0, n_chunks):
        if REVERSE:
            k = n_chunks - 1 - kk
        else:
            k = kk
        t0 = k * BT
        t = t0 + rows
        mask_t = t < T
        m2 = mask_t[:, None] & mask_d[None, :]
        off = base + t.to(tl.int64)[:, None] * D + cols[None, :]
        if HAS_DA:
            hp = hp_n.to(tl.float32)
            t_n = t - BT
            m_n = (t_n >= 1)[:, None] & mask_d[None, :]
            hp_n = tl.load(hp_ptr + off - (BT + 1) * D, mask=m_n, other=0.0)
        x_lp = tl.load(x_ptr + off, mask=m2, other=0.0)
        x = x_lp.to(tl.float32)
        if REVERSE:
            # the carry is lambda at row `end` (the later chunk's first row), or dL/dh_T entering at row T - 1
            end = tl.minimum(t0 + BT, T)
            shift = tl.where(end == T, 1, 0)
            power = tl.maximum(end - t - shift, 0)
            step = (end - t0 - shift).to(tl.float32)
        else:
            power = rows + 1
            step = BT * 1.0  # only full chunks pass their carry on; the last one's final state is read from h
        decay = tl.math.exp2(power.to(tl.float32) * l2a)
        h = _ltc_dot(mat, x, x_lp, decay[:, None] * carry, SPLIT)
        tl.store(out_ptr + off, h.to(out_ptr.dtype.element_ty), mask=m2)
        carry = _ltc_dot(wmat, x, x_lp, tl.math.exp2(step * l2a) * carry, SPLIT)
        if HAS_DA:
            if HAS_H0:
                hp += tl.where((t == 0)[:, None], h0v[None, :], 0.0)
            da_acc += tl.where(m2, h * hp, 0.0)
    if HAS_DA:
        # one deterministic partial per program, already times a (d log_a = a d a): a launch summing the [H, rest]
        # partials over their contiguous last axis is all that is left after the kernel, in a fixed order
        per_head = W // BP
        slot = (head * tl.num_programs(0) + pid_b) * per_head + pid_d % per_head
        tl.store(da_ptr + slot, tl.sum(tl.sum(da_acc, axis=1), axis=0) * tl.math.exp2(l2a))
    if STORE_FIN:
        # one row of a tile, stored through a row mask: dL/dh_0 = a lambda_0 in reverse, h at step T - 1 forward
        if REVERSE:
            fin = carry * tl.math.exp2(l2a)
            pick = 0
        else:
            fin = h
            pick = T - 1 - (n_chunks - 1) * BT
        fmask = (rows == pick)[:, None] & mask_d[None, :]
        tl.store(fin_ptr + pid_b * D + cols[None, :] + 0 * rows[:, None], fin.to(fin_ptr.dtype.element_ty), mask=fmask)


def lti_toeplitz_block(D: int, n_heads: int) -> int:
    """Channels per program: a power of two dividing the head width (at least 16 on the GPU, for tl.dot); 0 when
    the Toeplitz form does not apply (per-channel decays, narrow heads)."""
    width = D // n_heads
    block = 1
    while block * 2 <= min(width, 64) and width % (block * 2) == 0:
        block *= 2
    min_block = 1 if os.environ.get("TRITON_INTERPRET") == "1" else 16
    return block if block >= min_block and n_heads < D else 0


def lti_toeplitz_config(D: int, n_heads: int, user: dict) -> dict:
    """Launch config of the Toeplitz kernels: BT steps per chunk, BP channels per program (inside one head)."""
    # 4 warps: one warpgroup, so the products and the carry tile share one MMA layout (offline sm_90: one layout
    # conversion per chunk, for the store; 8 warps gave two MMA layouts and five conversions)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    cfg = {"BT": 16 if interp else 64, "BP": 32, "num_warps": 4, **user}
    cfg["BP"] = min(cfg["BP"], lti_toeplitz_block(D, n_heads))  # a program must stay inside one head
    return cfg


def _ltc_launch(
    x: torch.Tensor,
    log_a: torch.Tensor,
    c0: torch.Tensor | None,
    reverse: bool,
    cfg: dict,
    fin_dtype: torch.dtype | None,
    hp: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
) -> tuple:
    """One `_ltc_kernel` launch over contiguous x (B, T, D) with log decays (H,); returns (out, fin or None,
    partials of d log_a or None). fin (B, D) comes in fin_dtype (None: not stored); the partials (H, B * W / BP),
    fp32, sum over their last axis to d log_a. Every output element is written by the kernel: no zero-fill."""
    B, T, D = x.shape
    out = torch.empty((B, T, D), device=x.device, dtype=x.dtype)
    fin = torch.empty((B, D), device=x.device, dtype=fin_dtype) if fin_dtype is not None else None
    width = D // log_a.shape[0]
    da = None
    if hp is not None:
        da = torch.empty((log_a.shape[0], B * (width // cfg["BP"])), device=x.device, dtype=torch.float32)
    split = 0
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1":
        split = 2 if cfg.get("prec") == "tf32" else 1
    grid = (B, triton.cdiv(D, cfg["BP"]))
    _ltc_kernel[grid](
        x, log_a, c0 if c0 is not None else x, out, fin if fin is not None else out,
        hp if hp is not None else x, h0 if h0 is not None else x, da if da is not None else x,
        T, D, width,
        REVERSE=reverse, HAS_C0=c0 is not None, STORE_FIN=fin is not None, HAS_DA=hp is not None,
        HAS_H0=h0 is not None, SPLIT=split, BT=cfg["BT"], BP=cfg["BP"], num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3),
    )  # fmt: skip
    return out, fin, da
