"""Full-Hessian GPTQ for the integer export, with per-row clip ranges, on calibration text the model writes itself.

For a weight W [rows, cols] fed inputs x (H = sum x x^T over calibration tokens), GPTQ quantises W one input column
at a time (columns by decreasing H_jj) and pushes each column's rounding error onto the columns not yet quantised,
weighted by the inverse Hessian, which minimises tr((W - Q) H (W - Q)^T) far better than rounding each weight:
    q_j = clamp(round(w_j / s), -qmax_r, qmax_r),  e_j = (w_j - s q_j) / U_jj,  w_k -= e_j U_jk  (k after j)
with U the upper Cholesky factor of H^-1 (H damped by `damp` x mean diag). Columns are handled in blocks, the
error of a block applied to the rest in one matrix product. Each row r has its own range qmax_r: int6 (31) by
default, int8 (127) for rows a module names in `wide_rows` (Mamba-3's dt and A rows). The row scale s is the best
(by rounding error) of a few clip percentiles of |w|, floored at 1/qmax_r as the plain integer quantiser does.

The result is written back into the model (weights on their grid) and into the export plan as the "rows_int"
quantiser with the scales fixed, so encoding reproduces GPTQ's codes exactly. `selective_prune` then zeroes the
cheapest +-1 codes (smallest row scale first) until the compressed artifact fits a byte target. Late QAT
(`enable_late_qat`) makes the large float linears see their weights on that grid for the end of training.
"""

import io
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from templates.export import encode_state
from templates.hparams import env_flag, env_float, env_int
from templates.layers import CastedLinear
from templates.quant import Quantiser, integer_decode
from templates.registry import COMPRESSORS, QUANTISERS, STAGES, lookup, register

GPTQ_PERCENTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
GPTQ_QMAX = {"int6": 31, "int8": 127}


def gptq_row_scales(w: Tensor, qmax: Tensor, percentiles: tuple[float, ...] = GPTQ_PERCENTILES) -> Tensor:
    """Per-row scale (fp16-representable, as float32): the clip percentile whose round-to-nearest error is least."""
    a = w.abs().float()
    q = qmax.float().view(-1, 1).to(w.device)
    best, best_err = None, None
    for p in percentiles:
        clip = a.max(dim=1, keepdim=True).values if p >= 1.0 else torch.quantile(a, p, dim=1, keepdim=True)
        scale = torch.maximum(clip / q, 1.0 / q).half().float()
        err = (torch.clamp(torch.round(w / scale), -q, q) * scale - w).square().sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best.view(-1)


def gptq_inverse_factor(h: Tensor, damp: float, retries: int = 4) -> Tensor:
    """The upper Cholesky factor of (H + damp mean(diag H) I)^-1. A Hessian that is not positive definite in floating
    point (sums in low precision, few calibration tokens) gets ten times the damping, up to `retries` times."""
    eye = torch.eye(h.size(0), device=h.device, dtype=h.dtype)
    mean = torch.mean(torch.diag(h))
    for attempt in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(h + damp * 10**attempt * mean * eye)
        if h.is_meta or int(info) == 0:  # (meta tensors have shapes only: nothing to check)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damping {damp * 10**retries:g}")


def gptq_quantize(
    w: Tensor, hessian: Tensor, qmax: Tensor, block_size: int = 128, damp: float = 0.01, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """GPTQ codes (int8 [rows, cols]) and row scales (float32 [rows]) of w given its input Hessian [cols, cols]."""
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    q_max = qmax.float().view(-1, 1).to(w.device)
    s = (scale if scale is not None else gptq_row_scales(w, qmax)).float().view(-1, 1).to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    u = gptq_inverse_factor(h, damp)
    codes = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u_block = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = block[:, j : j + 1]
            q = torch.clamp(torch.round(col / s), -q_max, q_max)
            codes[:, i1 + j : i1 + j + 1] = q
            err = (col - q * s) / u_block[j, j]
            block[:, j:] -= err * u_block[j : j + 1, j:]
            errors[:, j : j + 1] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    inverse = torch.argsort(order)
    return codes[:, inverse].to(torch.int8), s.view(-1)


def rows_int_encode(t: Tensor, opts: dict) -> dict[str, Tensor]:
    """Integers with a range per row (opts["qmax"], one per row) on fixed scales (opts["scale"]) or searched ones."""
    w = t.detach().float()
    qmax = torch.as_tensor(opts["qmax"], dtype=torch.float32).view(-1)
    scale = torch.as_tensor(opts["scale"]).float() if opts.get("scale") is not None else gptq_row_scales(w, qmax)
    q = torch.clamp(torch.round(w / scale.view(-1, 1)), -qmax.view(-1, 1), qmax.view(-1, 1))
    return {"q": q.to(torch.int8), "scale": scale.view(-1, 1).to(torch.float16)}


register(QUANTISERS, "rows_int")(Quantiser(rows_int_encode, integer_decode))


def gptq_row_ranges(module: nn.Module, rows: int, qmax: int, wide_qmax: int) -> Tensor:
    """qmax per row: `qmax`, and `wide_qmax` for the rows the module names in `wide_rows` (start, stop)."""
    out = torch.full((rows,), qmax, dtype=torch.int32)
    wide = getattr(module, "wide_rows", None)
    if wide is not None:
        out[wide[0] : wide[1]] = wide_qmax
    return out


@torch.no_grad()
def generate_calibration(
    model: nn.Module,
    n_seqs: int,
    seq_len: int,
    temperature: float = 0.8,
    seed: int = 42,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    deadline: float | None = None,
) -> Tensor:
    """[n_seqs, seq_len] token ids sampled from the model itself, from a random first token; shorter sequences (at
    least 2 tokens) when time.perf_counter() passes `deadline` first.

    Each step runs the model over the sampled prefix padded to a power of two (at least 64 tokens, at most seq_len):
    the model is causal, so the padding never reaches the logits read, and the forward sees a handful of shapes
    rather than one per length. A prefix growing one token a step took 86 s for 16 x 1024 tokens on an H200, past
    the 60 s kept for GPTQ: 84 ms a step for about 1 ms of arithmetic, so per-shape setup (cuDNN builds an attention
    plan for each new length) is the likely cost; the log's generation time says whether this removed it."""
    device = device or next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.zeros((n_seqs, seq_len), dtype=torch.long, device=device)
    ids[:, 0] = torch.randint(0, model.cfg.vocab_size, (n_seqs,), generator=gen, device=device)
    was_training = model.training
    model.eval()
    length = seq_len
    for t in range(seq_len - 1):
        if deadline is not None and t > 0 and time.perf_counter() > deadline:
            length = t + 1
            break
        width = min(seq_len, max(64, 1 << t.bit_length()))  # > t: position t is inside
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model.logits(ids[:, :width])[:, t].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        ids[:, t + 1] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    model.train(was_training)
    return ids[:, :length]


@torch.no_grad()
def collect_hessians(
    model: nn.Module, calibration: Tensor, batch_seqs: int = 4, autocast_dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """{weight name: mean x x^T} of every float linear's inputs over the calibration tokens, and for a tied
    embedding, of the final hidden state it multiplies as the output head."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, x: Tensor) -> None:  # in float64: TF32 or float32 sums can leave H not positive definite
        x = x.detach().double().reshape(-1, x.size(-1))
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + x.size(0)

    hooks = [
        m.register_forward_hook(lambda mod, inp, out, key=f"{name}.weight": add(key, inp[0]))
        for name, m in model.named_modules()
        if isinstance(m, CastedLinear)
    ]
    tied = getattr(model, "lm_head", None) is None
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, calibration.size(0), batch_seqs):
            ids = calibration[start : start + batch_seqs].to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                hidden = model.hidden(ids)
            if tied:
                add("tok_emb.weight", hidden)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: (s / counts[name]).float() for name, s in sums.items()}


@torch.no_grad()
def gptq_refine_plan(
    model: nn.Module,
    hessians: dict[str, Tensor],
    plan: dict[str, tuple[str, dict]],
    wide_bits: int = 8,
    block_size: int = 128,
    damp: float = 0.01,
) -> dict[str, tuple[str, dict]]:
    """GPTQ every int6/int8 weight that has a Hessian: the model's weight is replaced by its quantised value and its
    plan entry by ("rows_int", fixed qmax per row and scales). Other entries are kept."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    wide_qmax = 2 ** (wide_bits - 1) - 1
    out = dict(plan)
    for name, (quantiser, _) in plan.items():
        if quantiser not in GPTQ_QMAX or name not in hessians or name not in params:
            continue
        weight = params[name]
        if weight.ndim != 2:
            continue
        module = modules.get(name.removesuffix(".weight"))
        qmax = gptq_row_ranges(module, weight.size(0), GPTQ_QMAX[quantiser], wide_qmax)
        codes, scale = gptq_quantize(weight, hessians[name].to(weight.device), qmax, block_size, damp)
        weight.copy_((codes.float() * scale.view(-1, 1)).to(weight.dtype))
        out[name] = ("rows_int", {"qmax": qmax.tolist(), "scale": scale.cpu()})
    return out


def wide_rows_plan(model: nn.Module, plan: dict[str, tuple[str, dict]], wide_bits: int = 8) -> dict[str, tuple]:
    """Without GPTQ: the int6/int8 weights of modules that name `wide_rows` get those rows at `wide_bits`."""
    out = dict(plan)
    wide_qmax = 2 ** (wide_bits - 1) - 1
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if getattr(module, "wide_rows", None) is None or key not in plan or plan[key][0] not in GPTQ_QMAX:
            continue
        rows = module.weight.size(0)
        out[key] = ("rows_int", {"qmax": gptq_row_ranges(module, rows, GPTQ_QMAX[plan[key][0]], wide_qmax).tolist()})
    return out


def compressed_size(container: dict, compressor: str) -> int:
    compress, _ = lookup(COMPRESSORS, "compressor", compressor)
    buf = io.BytesIO()
    torch.save(container, buf)
    return len(compress(buf.getvalue()))


def selective_prune(container: dict, target_bytes: int, compressor: str) -> tuple[dict, int, int]:
    """Zero the +-1 codes of per-row integer tensors, cheapest (smallest row scale) first, until the compressed
    container is at most `target_bytes`; (container, codes zeroed, candidates). The container is changed in place."""
    size = compressed_size(container, compressor)
    if size <= target_bytes:
        return container, 0, 0
    entries = []
    for entry in container["tensors"].values():
        fields = entry["fields"]
        if entry["quantiser"] in ("int6", "int8", "rows_int") and fields["q"].ndim == 2:
            entries.append(fields)
    costs, where = [], []
    for i, fields in enumerate(entries):
        flat = fields["q"].view(-1)
        idx = torch.nonzero(flat.abs() == 1).view(-1)
        row_scale = fields["scale"].float().view(-1)
        costs.append(row_scale[idx // fields["q"].size(1)] ** 2)
        where.append(torch.stack((torch.full_like(idx, i), idx)))
    if not where:
        return container, 0, 0
    cost = torch.cat(costs)
    order = torch.argsort(cost, stable=True)
    location = torch.cat(where, dim=1)[:, order]
    n = location.size(1)
    originals = [f["q"].clone() for f in entries]

    def apply(k: int) -> int:
        for fields, orig in zip(entries, originals):
            fields["q"].copy_(orig)
        for i, fields in enumerate(entries):
            mine = location[1, :k][location[0, :k] == i]
            fields["q"].view(-1)[mine] = 0
        return compressed_size(container, compressor)

    full = apply(n)
    if full > target_bytes:
        return container, n, n
    k = min(n, math.ceil(1.1 * n * (size - target_bytes) / max(size - full, 1)) + 1)
    while apply(k) > target_bytes and k < n:
        k = min(n, math.ceil(k * 1.25))
    return container, k, n


def gptq_hessian_loss(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the output error GPTQ minimises."""
    d = (w - w_hat).double()
    return float(torch.einsum("ri,ij,rj->", d, hessian.double(), d))


def gptq_plain_round(w: Tensor, qmax: Tensor, scale: Tensor) -> Tensor:
    """Round-to-nearest on the same grid (what GPTQ is compared against)."""
    q = qmax.float().view(-1, 1).to(w.device)
    return torch.clamp(torch.round(w / scale.view(-1, 1)), -q, q) * scale.view(-1, 1)


def fake_quant_rows(w: Tensor, qmax: Tensor) -> Tensor:
    """w on the per-row integer grid (scale = max(|w|_max / qmax, 1 / qmax)), qmax [rows, 1]."""
    scale = torch.maximum(w.abs().amax(dim=1, keepdim=True) / qmax, 1.0 / qmax)
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


class QATLinear(CastedLinear):
    """A CastedLinear whose forward sees its weight on the export grid (`qat_qmax` per row); the gradient passes
    straight through to the float master. Same parameters and state dict as the CastedLinear it replaces."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = w + (fake_quant_rows(w.detach(), self.qat_qmax) - w.detach())
        return F.linear(x, w.to(x.dtype))


def enable_late_qat(model: nn.Module, bits: int, wide_bits: int, min_numel: int) -> int:
    """Turn every float CastedLinear with more than `min_numel` weights into a QATLinear (rows it names in
    `wide_rows` at `wide_bits`); returns how many."""
    count = 0
    for m in model.modules():
        if type(m) is CastedLinear and m.weight.numel() > min_numel:
            rows = gptq_row_ranges(m, m.weight.size(0), 2 ** (bits - 1) - 1, 2 ** (wide_bits - 1) - 1)
            m.register_buffer("qat_qmax", rows.to(m.weight.device, torch.float32).view(-1, 1), persistent=False)
            m.__class__ = QATLinear
            count += 1
    return count


@register(STAGES, "step:late_qat")
def gptq_late_qat(
    model: nn.Module, hp: Any, lr_multiplier: float, elapsed_ms: float, cap_ms: float | None, log
) -> None:
    """Once the LR multiplier drops below LATE_QAT_THRESHOLD (0: never), QAT_BITS fake-quantisation from then on."""
    threshold = env_float("LATE_QAT_THRESHOLD", 0.0)
    if threshold <= 0 or lr_multiplier >= threshold or getattr(model, "qat_enabled", False):
        return
    model.qat_enabled = True
    bits, wide = env_int("QAT_BITS", 6), env_int("WIDE_ROW_BITS", 8)
    n = enable_late_qat(model, bits, wide, env_int("KEEP_FLOAT_MAX_NUMEL", 65_536))
    log(f"late_qat:enabled bits={bits} wide_bits={wide} linears:{n} lr_multiplier:{lr_multiplier:.4f}")


@register(STAGES, "reserve_s")
def gptq_reserve_seconds() -> float:
    """Seconds taken off the training cap so that GPTQ runs inside it (GPTQ_RESERVE_SECONDS, with USE_GPTQ=1)."""
    return env_float("GPTQ_RESERVE_SECONDS", 0.0) if env_flag("USE_GPTQ", False) else 0.0


@register(STAGES, "export")
def gptq_export(
    model: nn.Module,
    plan: dict[str, tuple[str, dict]],
    code_bytes: int,
    hp: Any,
    autocast_dtype: torch.dtype | None,
    log: Callable[[str], None],
) -> dict:
    """The export container: wide rows at WIDE_ROW_BITS, GPTQ with USE_GPTQ=1 (GPTQ_CALIB_SEQS x GPTQ_CALIB_LEN
    self-generated tokens, shorter if generating them would take more than GPTQ_GENERATION_SHARE of the
    GPTQ_RESERVE_SECONDS kept off the cap), then +-1 pruning to PRUNE_TARGET_BYTES (artifact + code; 0: none)."""
    wide = env_int("WIDE_ROW_BITS", 8)
    plan = wide_rows_plan(model, plan, wide)
    if env_flag("USE_GPTQ", False):
        started, reserve, capped = time.perf_counter(), gptq_reserve_seconds(), hp.max_wallclock_seconds > 0
        if capped:
            log(f"gptq:reserving {reserve:g}s, effective={1000 * (hp.max_wallclock_seconds - reserve):.0f}ms")
        seqs, length = env_int("GPTQ_CALIB_SEQS", 32), env_int("GPTQ_CALIB_LEN", 0) or hp.train_seq_len
        # inside the cap, generation may take GPTQ_GENERATION_SHARE of the reserve; the sequences stop where it ends
        share = env_float("GPTQ_GENERATION_SHARE", 0.7)
        deadline = started + share * reserve if capped and reserve > 0 else None
        calibration = generate_calibration(model, seqs, length, autocast_dtype=autocast_dtype, deadline=deadline)
        generated = time.perf_counter()
        cut = f" (cut from {length} at the reserve's generation share)" if calibration.size(1) < length else ""
        log(f"gptq:generated {seqs} seqs of {calibration.size(1)} tokens in {generated - started:.1f}s{cut}")
        hessians = collect_hessians(model, calibration, autocast_dtype=autocast_dtype)
        log(f"gptq:collected {len(hessians)} hessians in {time.perf_counter() - generated:.1f}s")
        plan = gptq_refine_plan(model, hessians, plan, wide)
        total = time.perf_counter() - started
        log(f"gptq:quantization complete in {total:.1f}s")
        if capped and total > reserve:
            log(f"gptq:over_reserve {total:.1f}s > {reserve:g}s: training + GPTQ passed the cap; raise the reserve")
    container = encode_state(model.state_dict(), plan)
    target = env_int("PRUNE_TARGET_BYTES", 0)
    if target > 0:
        header = len(b"SSMG1 ") + len(hp.compressor) + 1
        _, zeroed, candidates = selective_prune(container, target - code_bytes - header, hp.compressor)
        log(f"selective_prune: zeroed {zeroed} of {candidates} +-1 codes for {target} bytes")
    return container
