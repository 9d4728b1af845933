"""LTI scan h_t = a * h_{t-1} + x_t with one constant decay per head, on tensor cores: the Toeplitz form.

Inside a chunk of BT steps, h = x L + a^(i+1) h_prev with L[j, i] = a^(i-j) for i >= j, one BT x BT matrix shared
by every channel of the head, so the recurrence becomes a small matrix product per chunk and only the carry h
crosses chunks. One program walks the chunks of (one sequence, BP channels) in order with the carry in registers,
so each element is read and written once. Tiles are (channels x steps): the channels are the product's rows (M 64:
one sm_90 MMA of one warpgroup), the steps its columns, and L, loop-invariant, is the product's second operand, kept
in shared memory. A row of the product lies within one warp, so the next carry, one column of h (the chunk's last),
is a sum across a few lanes of a warp: no second product, no shared memory and no barrier on the chunk-to-chunk
path. The backward is the same with L transposed, walking the chunks in reverse; it also gives d h_0 = a lambda_1
and d log_a = a sum lambda_t h_{t-1} as one partial sum per program (a small [heads, programs] buffer summed after
it, in a fixed order: deterministic). The kernels read the decays as log_a per head, so nothing but that sum runs
around them. bf16 inputs multiply by L split into two bf16 halves (hi + lo), keeping about 16 bits of L; fp32
inputs use tf32x3 dots; the interpreter uses plain fp32 dots.
Chosen through `lti_scan(..., config={"method": "toeplitz"})` in templates/scan/first_order.py.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _ltc_dot(x, x_lp, m, acc, SPLIT: tl.constexpr):
    # x (channels x steps) times m (steps x steps), added to acc. SPLIT: m as two bf16 halves (about 16 bits of
    # it; bf16 x exact); else tf32x3 (fp32 inputs, about fp32 accuracy). acc (the carry term) enters the
    # accumulator: a constant zero accumulator would get another MMA layout, and a conversion between the two dots
    if SPLIT:
        m_hi = m.to(tl.bfloat16)
        m_lo = (m - m_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(x_lp, m_hi, acc=acc, out_dtype=tl.float32)
        acc = tl.dot(x_lp, m_lo, acc=acc, out_dtype=tl.float32)
    else:
        acc = tl.dot(x, m, acc=acc, input_precision="tf32x3", out_dtype=tl.float32)
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
    (hp = forward h, h0 = forward h_0), stored at [head, sequence, program within the head]. Every tile is
    (BP channels) x (BT steps): channels on the rows (the products' M), steps on the columns."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    # BP divides the head width W and W divides D: the channels need no mask
    cols = pid_d * BP + tl.arange(0, BP)
    steps = tl.arange(0, BT)
    tile = cols[:, None] + steps[None, :] * D  # a chunk's offsets from its first step, (BP, BT), int32
    # la: the log decay of each head of W channels, read as it is (no exp launch before the kernel): powers of a
    # are exp2 of multiples of log2(a) = log(a) * log2(e)
    head = (pid_d * BP) // W
    l2a = tl.load(la_ptr + head).to(tl.float32) * 1.4426950408889634
    # mat[j, i]: the weight of step j's input in step i's output, a^(i - j) for i >= j (a^(j - i), j >= i, reverse)
    diff = steps[None, :] - steps[:, None]
    if REVERSE:
        diff = -diff
    mat = tl.where(diff >= 0, tl.math.exp2(tl.maximum(diff, 0).to(tl.float32) * l2a), 0.0)
    if HAS_C0:
        carry = tl.load(c0_ptr + pid_b * D + cols).to(tl.float32)
    else:
        carry = tl.zeros([BP], dtype=tl.float32)
    n_chunks = tl.cdiv(T, BT)
    if HAS_DA:
        # per channel, summed over each chunk's steps (within a warp, like the carry), over channels at the end
        da_acc = tl.zeros([BP], dtype=tl.float32)
        # h_{t-1} of the first chunk walked (the last); each chunk loads the next one's before its own dot, so that
        # this load (which feeds no dot, and so is not pipelined by the compiler) overlaps a chunk of work. Steps
        # past T and step 0 (h_0: its term is added at the end) read zeros
        t_n = (n_chunks - 1) * BT + steps
        m_n = ((t_n < T) & (t_n >= 1))[None, :]
        hp_n = tl.load(hp_ptr + (pid_b * T + (n_chunks - 1) * BT - 1) * D + tile, mask=m_n, other=0.0)
    for kk in range(0, n_chunks):
        if REVERSE:
            k = n_chunks - 1 - kk
        else:
            k = kk
        t0 = k * BT
        t = t0 + steps
        m2 = (t < T)[None, :]
        start = (pid_b * T + t0) * D
        if HAS_DA:
            hp = hp_n.to(tl.float32)
            hp_n = tl.load(hp_ptr + (start - (BT + 1) * D) + tile, mask=(t >= BT + 1)[None, :], other=0.0)
        x_lp = tl.load(x_ptr + start + tile, mask=m2, other=0.0)
        x = x_lp.to(tl.float32)
        if REVERSE:
            # the carry is lambda at step `end` (the later chunk's first step), or dL/dh_T entering at step T - 1
            end = tl.minimum(t0 + BT, T)
            shift = tl.where(end == T, 1, 0)
            power = tl.maximum(end - t - shift, 0)
        else:
            power = steps + 1
        decay = tl.math.exp2(power.to(tl.float32) * l2a)
        h = _ltc_dot(x, x_lp, mat, carry[:, None] * decay[None, :], SPLIT)
        tl.store(out_ptr + start + tile, h.to(out_ptr.dtype.element_ty), mask=m2)
        # the next carry is one column of h, the chunk's first step in reverse, its last forward (the sequence's
        # last in a partial chunk: the final state). Each row of the product lies within one warp, so this is a
        # sum across a few lanes: no shared memory and no barrier on the chunk-to-chunk path
        if REVERSE:
            pick = 0
        else:
            pick = tl.minimum(T - 1 - t0, BT - 1)
        carry = tl.sum(tl.where(steps[None, :] == pick, h, 0.0), axis=1)
        if HAS_DA:
            da_acc += tl.sum(h * hp, axis=1)
    if HAS_DA:
        if HAS_H0:
            # step 0's term: lambda_0 (the last carry) times h_0
            da_acc += carry * tl.load(h0_ptr + pid_b * D + cols).to(tl.float32)
        # one deterministic partial per program, already times a (d log_a = a d a): a launch summing the [H, rest]
        # partials over their contiguous last axis is all that is left after the kernel, in a fixed order
        per_head = W // BP
        slot = (head * tl.num_programs(0) + pid_b) * per_head + pid_d % per_head
        tl.store(da_ptr + slot, tl.sum(da_acc, axis=0) * tl.math.exp2(l2a))
    if STORE_FIN:
        # dL/dh_0 = a lambda_0 in reverse, h at step T - 1 forward
        if REVERSE:
            carry = carry * tl.math.exp2(l2a)
        tl.store(fin_ptr + pid_b * D + cols, carry.to(fin_ptr.dtype.element_ty))


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
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    cfg = {"BT": 16 if interp else 32, "BP": 64, **user}
    cfg["BP"] = min(cfg["BP"], lti_toeplitz_block(D, n_heads))  # a program must stay inside one head
    # one warp per 16 channels, at most one warpgroup: the warps split the channels (the products' M) only, so
    # that a row of a product, whose one column is the next carry, lies within one warp (64 channels: one
    # warpgroup, one sm_90 MMA of M 64)
    cfg.setdefault("num_warps", max(1, min(4, cfg["BP"] // 16)))
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
    split = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1"
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
