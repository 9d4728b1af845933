"""Mamba-3's per-head q/k preparation as one Triton kernel each way: head expansion, per-head bias, rotation.

`m3_rotary_heads(v, bias, theta, nheads, out_dtype)` maps v (B,T,G,N) to (B,T,H,N): each head h takes its group's
row, adds bias[h] (H,N), and rotates the adjacent pairs (2r, 2r+1), r < R, by theta[b,t,h,r] (B,T,H,R):
    (e, o) -> (e cos - o sin, e sin + o cos).
One read of v and theta, one write of the result, instead of a chain of eager fp32 tensors. The backward rotates the
gradient back (by -theta), sums it over the heads of a group (fp32 atomics when G < H), reduces the bias gradient
per program, and gives d theta = -dout_even * out_odd + dout_odd * out_even.
"""

import torch
import triton
import triton.language as tl

M3R_BLOCK_T = 32


@triton.jit
def _m3r_load(V, BIAS, TH, b64, h, g, offs_t, offs_r, T, H, G, N, NH, R, HAS_BIAS: tl.constexpr):
    mask_t = offs_t < T
    mask_r = offs_r < NH
    mask = mask_t[:, None] & mask_r[None, :]
    row = b64 * T + offs_t.to(tl.int64)
    v_ptr = V + (row * G + g)[:, None] * N + 2 * offs_r[None, :]
    even = tl.load(v_ptr, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(v_ptr + 1, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        even += tl.load(BIAS + h * N + 2 * offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
        odd += tl.load(BIAS + h * N + 2 * offs_r + 1, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    th_mask = mask_t[:, None] & (offs_r < R)[None, :]
    theta = tl.load(TH + (row * H + h)[:, None] * R + offs_r[None, :], mask=th_mask, other=0.0).to(tl.float32)
    return even, odd, tl.cos(theta), tl.sin(theta), row, mask, th_mask


@triton.jit
def _m3r_fwd_kernel(
    V, BIAS, TH, OUT, T, H, G, N, NH, R, BT: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr
):  # fmt: skip
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    g = h // (H // G)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_r = tl.arange(0, BR)
    even, odd, cos, sin, row, mask, th_mask = _m3r_load(
        V, BIAS, TH, b64, h, g, offs_t, offs_r, T, H, G, N, NH, R, HAS_BIAS
    )
    out = OUT + (row * H + h)[:, None] * N + 2 * offs_r[None, :]
    tl.store(out, (even * cos - odd * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + 1, (even * sin + odd * cos).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _m3r_bwd_kernel(
    V, BIAS, TH, DOUT, DV, DTH, DBIAS_PART, T, H, G, N, NH, R,
    BT: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    g = h // (H // G)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_r = tl.arange(0, BR)
    even, odd, cos, sin, row, mask, th_mask = _m3r_load(
        V, BIAS, TH, b64, h, g, offs_t, offs_r, T, H, G, N, NH, R, HAS_BIAS
    )
    dout = DOUT + (row * H + h)[:, None] * N + 2 * offs_r[None, :]
    d_even_r = tl.load(dout, mask=mask, other=0.0).to(tl.float32)
    d_odd_r = tl.load(dout + 1, mask=mask, other=0.0).to(tl.float32)
    d_theta = -d_even_r * (even * sin + odd * cos) + d_odd_r * (even * cos - odd * sin)
    tl.store(DTH + (row * H + h)[:, None] * R + offs_r[None, :], d_theta, mask=th_mask)
    d_even = d_even_r * cos + d_odd_r * sin
    d_odd = d_odd_r * cos - d_even_r * sin
    dv = DV + (row * G + g)[:, None] * N + 2 * offs_r[None, :]
    if ATOMIC:
        tl.atomic_add(dv, d_even, mask=mask)
        tl.atomic_add(dv + 1, d_odd, mask=mask)
    else:
        tl.store(dv, d_even, mask=mask)
        tl.store(dv + 1, d_odd, mask=mask)
    if HAS_BIAS:
        part = DBIAS_PART + (bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * N + 2 * offs_r
        tl.store(part, tl.sum(d_even, axis=0), mask=offs_r < NH)
        tl.store(part + 1, tl.sum(d_odd, axis=0), mask=offs_r < NH)


class _M3RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, bias, theta, nheads, out_dtype):
        bsz, seqlen, ngroups, dstate = v.shape
        v, theta = v.contiguous(), theta.float().contiguous()
        bias_c = bias.float().contiguous() if bias is not None else None
        out = torch.empty(bsz, seqlen, nheads, dstate, device=v.device, dtype=out_dtype)
        grid = (triton.cdiv(seqlen, M3R_BLOCK_T), bsz * nheads)
        npairs, nangles = dstate // 2, theta.shape[-1]
        br = max(16, triton.next_power_of_2(npairs))
        _m3r_fwd_kernel[grid](
            v, bias_c if bias_c is not None else v, theta, out, seqlen, nheads, ngroups, dstate, npairs, nangles,
            BT=M3R_BLOCK_T, BR=br, HAS_BIAS=bias_c is not None,
        )  # fmt: skip
        ctx.save_for_backward(v, bias_c, theta)
        ctx.meta = (nheads, br, bias.dtype if bias is not None else None, theta.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        v, bias_c, theta = ctx.saved_tensors
        nheads, br, bias_dtype, _ = ctx.meta
        bsz, seqlen, ngroups, dstate = v.shape
        atomic = ngroups != nheads
        f32 = {"device": v.device, "dtype": torch.float32}
        dv = (torch.zeros if atomic else torch.empty)(v.shape, **f32)
        dth = torch.empty(theta.shape, **f32)
        n_tb = triton.cdiv(seqlen, M3R_BLOCK_T)
        dbias_part = torch.empty(bsz, nheads, n_tb, dstate, **f32) if bias_c is not None else None
        _m3r_bwd_kernel[(n_tb, bsz * nheads)](
            v, bias_c if bias_c is not None else v, theta, dout.contiguous(), dv, dth,
            dbias_part if dbias_part is not None else dv, seqlen, nheads, ngroups, dstate, dstate // 2,
            theta.shape[-1], BT=M3R_BLOCK_T, BR=br, HAS_BIAS=bias_c is not None, ATOMIC=atomic,
        )  # fmt: skip
        dbias = dbias_part.sum((0, 2)).to(bias_dtype) if dbias_part is not None else None
        return dv.to(v.dtype), dbias, dth, None, None


@torch.compiler.disable
def m3_rotary_heads(
    v: torch.Tensor, bias: torch.Tensor | None, theta: torch.Tensor, nheads: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """(B,T,G,N) -> (B,T,H,N): group row per head, plus bias (H,N), pairs r < R rotated by theta (B,T,H,R)."""
    return _M3RotaryFn.apply(v, bias, theta, nheads, out_dtype)
