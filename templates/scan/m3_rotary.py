"""Mamba-3's per-head q/k preparation as one Triton kernel each way: head expansion, per-head bias, rotation.

`m3_rotary_heads(v, bias, theta, nheads, out_dtype)` maps v (B,T,G,N) to (B,T,H,N): each head h takes its group's
row, adds bias[h] (H,N), and rotates the adjacent pairs (2r, 2r+1), r < R, by theta[b,t,h,r] (B,T,H,R):
    (e, o) -> (e cos - o sin, e sin + o cos).
One read of v and theta, one write of the result, instead of a chain of eager fp32 tensors. Rows move as whole
contiguous tiles, split into even and odd elements in registers (stride-2 loads and stores of the pairs cost 12x
the bytes' time on the H100). The backward rotates the gradient back (by -theta), sums it over the heads of a
group in registers (one program per time block, batch and group), reduces the bias gradient per program, and gives
d theta = -dout_even * out_odd + dout_odd * out_even.

Both directions are one custom op each (ssm_golf::m3_rotary and its backward); off CUDA without the interpreter
they run `m3_rotary_heads_ref`, the same map in PyTorch.
"""

import os

import torch
import triton
import triton.language as tl

from templates.scan.ops import scan_none, scan_op, scan_opt, scan_ref_vjp

M3R_BLOCK_T = 32


@triton.jit
def _m3r_pairs(ptr, rows, offs_n, mask_t, N, BT: tl.constexpr, BR: tl.constexpr):
    """Whole rows (contiguous [BT, 2 BR] loads), split into their even and odd elements (fp32)."""
    mask = mask_t[:, None] & (offs_n < N)[None, :]
    tile = tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(tile, (BT, BR, 2)))


@triton.jit
def _m3r_head(even, odd, BIAS, TH, row, h, offs_r, offs_n, th_mask, H, N, R, BR: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Head h's side of the rotation: its group's pairs plus its bias row, and cos/sin of its angles [BT, BR]."""
    if HAS_BIAS:
        bias = tl.load(BIAS + h * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        b_even, b_odd = tl.split(tl.reshape(bias, (BR, 2)))
        even += b_even[None, :]
        odd += b_odd[None, :]
    theta = tl.load(TH + (row * H + h)[:, None] * R + offs_r[None, :], mask=th_mask, other=0.0).to(tl.float32)
    return even, odd, tl.cos(theta), tl.sin(theta)


@triton.jit
def _m3r_store_pairs(ptr, rows, offs_n, mask_t, N, even, odd, BT: tl.constexpr, BR: tl.constexpr):
    """Interleave even and odd back into whole rows and write them with one contiguous store."""
    mask = mask_t[:, None] & (offs_n < N)[None, :]
    tile = tl.reshape(tl.join(even, odd), (BT, 2 * BR))
    tl.store(ptr + rows[:, None] * N + offs_n[None, :], tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _m3r_fwd_kernel(
    V, BIAS, TH, OUT, T, H, G, N, R, BT: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr
):  # fmt: skip
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h = bh % H
    g = h // (H // G)
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_r = tl.arange(0, BR)
    offs_n = tl.arange(0, 2 * BR)
    mask_t = offs_t < T
    row = b64 * T + offs_t.to(tl.int64)
    even, odd = _m3r_pairs(V, row * G + g, offs_n, mask_t, N, BT, BR)
    th_mask = mask_t[:, None] & (offs_r < R)[None, :]
    even, odd, cos, sin = _m3r_head(even, odd, BIAS, TH, row, h, offs_r, offs_n, th_mask, H, N, R, BR, HAS_BIAS)
    _m3r_store_pairs(OUT, row * H + h, offs_n, mask_t, N, even * cos - odd * sin, even * sin + odd * cos, BT, BR)


@triton.jit
def _m3r_bwd_kernel(
    V, BIAS, TH, DOUT, DV, DTH, DBIAS_PART, T, H, G, N, R,
    BT: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One program per (time block, batch, group) loops over the group's heads and sums their dv in registers."""
    bg = tl.program_id(1)
    b64 = (bg // G).to(tl.int64)
    g = bg % G
    hpg = H // G
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_r = tl.arange(0, BR)
    offs_n = tl.arange(0, 2 * BR)
    mask_t = offs_t < T
    row = b64 * T + offs_t.to(tl.int64)
    v_even, v_odd = _m3r_pairs(V, row * G + g, offs_n, mask_t, N, BT, BR)
    dv_even = tl.zeros((BT, BR), dtype=tl.float32)
    dv_odd = tl.zeros((BT, BR), dtype=tl.float32)
    th_mask = mask_t[:, None] & (offs_r < R)[None, :]
    for h in range(g * hpg, (g + 1) * hpg):
        even, odd, cos, sin = _m3r_head(v_even, v_odd, BIAS, TH, row, h, offs_r, offs_n, th_mask, H, N, R, BR, HAS_BIAS)
        d_even_r, d_odd_r = _m3r_pairs(DOUT, row * H + h, offs_n, mask_t, N, BT, BR)
        d_theta = -d_even_r * (even * sin + odd * cos) + d_odd_r * (even * cos - odd * sin)
        tl.store(DTH + (row * H + h)[:, None] * R + offs_r[None, :], d_theta, mask=th_mask)
        d_even = d_even_r * cos + d_odd_r * sin
        d_odd = d_odd_r * cos - d_even_r * sin
        dv_even += d_even
        dv_odd += d_odd
        if HAS_BIAS:
            part = DBIAS_PART + ((b64 * H + h) * tl.num_programs(0) + tl.program_id(0)) * N
            pair_sums = tl.reshape(tl.join(tl.sum(d_even, axis=0), tl.sum(d_odd, axis=0)), (2 * BR,))
            tl.store(part + offs_n, pair_sums, mask=offs_n < N)
    _m3r_store_pairs(DV, row * G + g, offs_n, mask_t, N, dv_even, dv_odd, BT, BR)


def _m3r_use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def m3_rotary_heads_ref(
    v: torch.Tensor, bias: torch.Tensor | None, theta: torch.Tensor, nheads: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """PyTorch reference of `m3_rotary_heads` (fp32 math, fp64 when v is fp64)."""
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


def _m3r_impl(v, bias, theta, nheads, out_dtype):
    if not _m3r_use_triton(v):
        return m3_rotary_heads_ref(v, bias, theta, nheads, out_dtype)
    bsz, seqlen, ngroups, dstate = v.shape
    v, theta = v.contiguous(), theta.float().contiguous()
    bias_c = bias.float().contiguous() if bias is not None else None
    out = torch.empty(bsz, seqlen, nheads, dstate, device=v.device, dtype=out_dtype)
    grid = (triton.cdiv(seqlen, M3R_BLOCK_T), bsz * nheads)
    _m3r_fwd_kernel[grid](
        v, bias_c if bias_c is not None else v, theta, out, seqlen, nheads, ngroups, dstate, theta.shape[-1],
        BT=M3R_BLOCK_T, BR=max(16, triton.next_power_of_2(dstate // 2)), HAS_BIAS=bias_c is not None,
    )  # fmt: skip
    return out


def _m3r_fake(v, bias, theta, nheads, out_dtype):
    return v.new_empty((v.shape[0], v.shape[1], nheads, v.shape[3]), dtype=out_dtype)


def _m3r_setup(ctx, inputs, output):
    v, bias, theta, nheads, _ = inputs
    ctx.nheads = nheads
    ctx.save_for_backward(v, bias, theta)


def _m3r_backward(ctx, dout):
    v, bias, theta = ctx.saved_tensors
    dv, dbias, dth = _m3r_bwd_op(v, bias, theta, dout, ctx.nheads)
    return dv, scan_opt(dbias), dth, None, None


def _m3r_bwd_impl(v, bias, theta, dout, nheads):
    if not _m3r_use_triton(v):
        fwd = lambda v, b, t: (m3_rotary_heads_ref(v, b, t, nheads, dout.dtype),)  # noqa: E731
        return tuple(scan_ref_vjp(fwd, [v, bias, theta], [dout]))
    bsz, seqlen, ngroups, dstate = v.shape
    v_c, theta_c = v.contiguous(), theta.float().contiguous()
    bias_c = bias.float().contiguous() if bias is not None else None
    f32 = {"device": v.device, "dtype": torch.float32}
    dv = torch.empty(v.shape, **f32)
    dth = torch.empty(theta.shape, **f32)
    n_tb = triton.cdiv(seqlen, M3R_BLOCK_T)
    dbias_part = torch.empty(bsz, nheads, n_tb, dstate, **f32) if bias_c is not None else None
    _m3r_bwd_kernel[(n_tb, bsz * ngroups)](
        v_c, bias_c if bias_c is not None else v_c, theta_c, dout.contiguous(), dv, dth,
        dbias_part if dbias_part is not None else dv, seqlen, nheads, ngroups, dstate, theta.shape[-1],
        BT=M3R_BLOCK_T, BR=max(16, triton.next_power_of_2(dstate // 2)), HAS_BIAS=bias_c is not None,
    )  # fmt: skip
    dbias = dbias_part.sum((0, 2)).to(bias.dtype) if dbias_part is not None else scan_none(dv)
    return dv.to(v.dtype), dbias, dth.to(theta.dtype)


def _m3r_bwd_fake(v, bias, theta, dout, nheads):
    dbias = bias.new_empty(bias.shape) if bias is not None else scan_none(v)
    return v.new_empty(v.shape), dbias, theta.new_empty(theta.shape)


_m3r_bwd_op = scan_op(
    "m3_rotary_bwd",
    "(Tensor v, Tensor? bias, Tensor theta, Tensor dout, int nheads) -> (Tensor, Tensor, Tensor)",
    _m3r_bwd_impl,
    _m3r_bwd_fake,
)
_m3r_op = scan_op(
    "m3_rotary",
    "(Tensor v, Tensor? bias, Tensor theta, int nheads, ScalarType out_dtype) -> Tensor",
    _m3r_impl,
    _m3r_fake,
    _m3r_backward,
    _m3r_setup,
)


def m3_rotary_heads(
    v: torch.Tensor, bias: torch.Tensor | None, theta: torch.Tensor, nheads: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """(B,T,G,N) -> (B,T,H,N): group row per head, plus bias (H,N), pairs r < R rotated by theta (B,T,H,R)."""
    return _m3r_op(v, bias, theta, nheads, out_dtype)
