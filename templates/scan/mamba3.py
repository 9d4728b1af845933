"""Mamba-3 SISO scan (trapezoidal discretisation, data-dependent rotary B/C) in the chunked SSD form.

What `mamba3_siso_scan` takes (per batch b, time t, head h; the caller does the B/C RMS-norm and computes DT, A):
    x       (B,T,H,P)   values v_t (the x slice of in_proj; Mamba-3 has no conv)
    dt      (B,T,H)     DT_t > 0, already softplus(dd_dt + dt_bias)
    adt     (B,T,H)     A_t * DT_t <= 0 (A_t = min(-softplus(dd_A), -A_floor) in the seed)
    trap    (B,T,H)     trapezoid logits; lambda_t = sigmoid(trap_t)
    q, k    (B,T,G,N)   C and B after RMS-norm, G divides H (shared across the heads of a group)
    angles  (B,T,H,R)   angle rates, 2R <= N; theta_t = theta_{t-1} + angles_t * DT_t (the caller applies tanh*pi)
    q_bias, k_bias (H,N) optional per-head biases added to q, k before the rotation
    D (H,) or (H,P), z (B,T,H,P) optional skip and silu gate
    initial_state: optional tuple (theta (B,H,R), S (B,H,P,N), k (B,H,N), v (B,H,P)) from a previous window
Math: q~_t = R(theta_t)(q_t + q_bias), k~_t = R(theta_t)(k_t + k_bias), R rotating the pairs (2r, 2r+1), r < R;
    alpha_t = exp(adt_t), beta_t = alpha_t DT_t (1 - lambda_t), gamma_t = lambda_t DT_t,
    S_t = alpha_t S_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T,   y_t = S_t q~_t + D v_t,  y * silu(z).
Returns y (B,T,H,P), and with return_final_state the tuple (theta_T mod 2 pi, S_T fp32, k_T + k_bias (unrotated),
v_T), which is exactly what initial_state takes for the next window.

Chunked form: with b'_t = DT_t (1 - lambda_t), unrolling the trapezoid gives the SSD kernel with input weight
w_t = gamma_t + b'_{t+1} (b'_{T+1} = 0), log-decay adt, and the diagonal term weighted by gamma_t alone
(e_t = -b'_{t+1}); the carried-in (v, k) pair folds into the initial state as S_0 + b'_1 v_0 k~_0^T.
The weights and cumulative angles are one Triton walk over time per (batch, head) each way (`m3_gates`); q and k
are expanded to the heads, biased and rotated once into per-head rows (`m3_rotate_heads`, whose backward rotates the
gradients back); the scan is `ssd_generic_scan` over those rows (one group per head).
"""

import math

import torch
import torch.nn.functional as F

from templates.scan.m3_rotary import m3_gates, m3_rotate_heads
from templates.scan.ssd import ssd_generic_scan, ssd_use_triton


def _m3_rotate(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate the first R adjacent pairs of the last dim of v (..., N) by theta (..., R)."""
    rdim = theta.shape[-1]
    rot = v[..., : 2 * rdim].unflatten(-1, (rdim, 2))
    cos, sin = torch.cos(theta), torch.sin(theta)
    even, odd = rot[..., 0], rot[..., 1]
    turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((turned, v[..., 2 * rdim :]), dim=-1)


def _m3_heads(v: torch.Tensor, nheads: int, bias: torch.Tensor | None) -> torch.Tensor:
    """(B,T,G,N) -> (B,T,H,N), each head taking its group's row, plus the per-head bias."""
    out = v.repeat_interleave(nheads // v.shape[2], dim=2)
    return out + bias.to(out.dtype) if bias is not None else out


def _m3_check(x, dt, adt, trap, q, k, angles):
    bsz, seqlen, nheads, _ = x.shape
    for name, t in (("dt", dt), ("adt", adt), ("trap", trap)):
        if t.shape != (bsz, seqlen, nheads):
            raise ValueError(f"mamba3 scan: {name} must be (batch, time, heads) = {(bsz, seqlen, nheads)}")
    if q.shape != k.shape or q.dim() != 4 or nheads % q.shape[2]:
        raise ValueError("mamba3 scan: q and k must be (batch, time, groups, N) with heads a multiple of groups")
    if q.shape[3] % 2:
        raise ValueError(f"mamba3 scan: the state size N ({q.shape[3]}) must be even (rotary pairs)")
    if angles.shape[:3] != (bsz, seqlen, nheads) or 2 * angles.shape[3] > q.shape[3]:
        raise ValueError("mamba3 scan: angles must be (batch, time, heads, R) with 2R <= N")


def _m3_gates(dt, adt, trap, angles, theta0, cd):
    dtf = dt.to(cd)
    lam = torch.sigmoid(trap.to(cd))
    gamma = lam * dtf
    bprime = (1.0 - lam) * dtf
    theta = torch.cumsum(angles.to(cd) * dtf[..., None], dim=1)
    if theta0 is not None:
        theta = theta + theta0.to(cd)[:, None]
    return adt.to(cd), gamma, bprime, theta


def mamba3_siso_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    adt: torch.Tensor,
    trap: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    angles: torch.Tensor,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: tuple | None = None,
    return_final_state: bool = False,
):
    """Mamba-3 SISO scan; shapes and math in the module docstring. Falls back to the reference off CUDA."""
    _m3_check(x, dt, adt, trap, q, k, angles)
    if not ssd_use_triton(x):
        return mamba3_siso_scan_ref(
            x, dt, adt, trap, q, k, angles, q_bias, k_bias, D, z, chunk_size, initial_state, return_final_state
        )
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    nheads = x.shape[2]
    theta0, s0, k0, v0 = initial_state if initial_state is not None else (None, None, None, None)
    w, e, theta = m3_gates(dt, trap, angles, theta0)
    h0 = None
    if initial_state is not None:
        k0_rot = _m3_rotate(k0.to(cd), theta0.to(cd))
        bprime0 = (1.0 - torch.sigmoid(trap[:, 0].to(cd))) * dt[:, 0].to(cd)
        h0 = s0.to(cd) + bprime0[..., None, None] * v0.to(cd)[..., :, None] * k0_rot[..., None, :]
    q_rot, k_rot = m3_rotate_heads(q, k, q_bias, k_bias, theta, nheads)
    y, s_last = ssd_generic_scan(x, adt, w, k_rot, q_rot, chunk_size, e=e, D=D, z=z, h0=h0, return_final_state=True)
    if not return_final_state:
        return y
    k_last = _m3_heads(k[:, -1:], nheads, k_bias)[:, 0]
    return y, (torch.remainder(theta[:, -1], 2 * math.pi), s_last, k_last, x[:, -1])


def mamba3_siso_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    adt: torch.Tensor,
    trap: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    angles: torch.Tensor,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: tuple | None = None,
    return_final_state: bool = False,
):
    """Sequential reference of the trapezoidal recurrence itself, step by step (float64 when x is float64)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    bsz, seqlen, nheads, hdim = x.shape
    theta0, s0, k0, v0 = initial_state if initial_state is not None else (None, None, None, None)
    la, gamma, bprime, theta = _m3_gates(dt, adt, trap, angles, theta0, cd)
    kh = _m3_heads(k, nheads, k_bias).to(cd)
    q_rot = _m3_rotate(_m3_heads(q, nheads, q_bias).to(cd), theta)
    k_rot = _m3_rotate(kh, theta)
    xs = x.to(cd)
    state = s0.to(cd) if s0 is not None else xs.new_zeros(bsz, nheads, hdim, q.shape[3])
    k_prev = _m3_rotate(k0.to(cd), theta0.to(cd)) if k0 is not None else xs.new_zeros(bsz, nheads, q.shape[3])
    v_prev = v0.to(cd) if v0 is not None else xs.new_zeros(bsz, nheads, hdim)
    k_prev = torch.cat((k_prev[:, None], k_rot[:, :-1]), dim=1)
    v_prev = torch.cat((v_prev[:, None], xs[:, :-1]), dim=1)
    alpha = torch.exp(la)
    beta = alpha * bprime
    inputs = (beta[..., None, None] * v_prev[..., :, None] * k_prev[..., None, :]) + (
        gamma[..., None, None] * xs[..., :, None] * k_rot[..., None, :]
    )
    states = []
    for alpha_t, input_t in zip(alpha[..., None, None].unbind(1), inputs.unbind(1)):
        state = torch.addcmul(input_t, alpha_t, state)
        states.append(state)
    y = torch.einsum("bthpn,bthn->bthp", torch.stack(states, dim=1), q_rot)
    if D is not None:
        y = y + (D.to(cd)[:, None] if D.dim() == 1 else D.to(cd)) * xs
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    final_s = state if cd == torch.float64 else state.to(torch.float32)
    return y, (torch.remainder(theta[:, -1], 2 * math.pi), final_s, kh[:, -1].to(k.dtype), x[:, -1])
