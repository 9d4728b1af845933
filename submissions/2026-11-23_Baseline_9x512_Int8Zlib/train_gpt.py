"""train_gpt.py: the baseline variant, assembled by ssm-golf from its templates.

the upstream baseline transformer (9x512, GQA 8/4, ReLU^2 MLP, int8+zlib), the reference every SSM variant is measured against.

Run: torchrun --standalone --nproc_per_node=8 train_gpt.py (CUDA), or python train_gpt.py (CPU, tiny
settings through the environment). Every hyperparameter is an environment variable; see Hyperparameters.
"""

import copy
import glob
import hashlib
import io
import json
import math
import numpy as np
import os
import random
import sentencepiece as spm
import sys
import time
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zlib
from pathlib import Path
from torch import Tensor
from torch import nn
from torch.nn.parallel import DistributedDataParallel


# ---------------------------------------------------------------------------------------------------------------------
# templates.bpb: Bits per byte, the canonical way: sentencepiece byte tables and the tokens-to-bytes conversion.
# ---------------------------------------------------------------------------------------------------------------------

SPACE_MARKER = "\u2581"


def build_byte_tables(
    sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base_bytes int16, has_leading_space bool, is_boundary bool), each of length max(vocab_size, pieces)."""
    n = max(vocab_size, sp.get_piece_size())
    base_bytes = torch.zeros(n, dtype=torch.int16)
    leading_space = torch.zeros(n, dtype=torch.bool)
    boundary = torch.ones(n, dtype=torch.bool)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARKER):
            leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return base_bytes.to(device), leading_space.to(device), boundary.to(device)


def target_bytes(
    prev: torch.Tensor, target: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Bytes each target token stands for, given the token before it (same shapes; int32)."""
    base_bytes, leading_space, boundary = tables
    extra = leading_space[target] & ~boundary[prev]
    return base_bytes[target].to(torch.int32) + extra.to(torch.int32)


def bits_per_byte(loss_sum_nats: float, token_count: float, byte_count: float) -> float:
    """val_bpb from summed nats over `token_count` targets that stand for `byte_count` bytes."""
    if token_count <= 0 or byte_count <= 0:
        raise ValueError("bits_per_byte needs at least one token and one byte")
    return (loss_sum_nats / token_count) / math.log(2.0) * (token_count / byte_count)


# ---------------------------------------------------------------------------------------------------------------------
# templates.data: Token shards: the challenge's binary format, a sequential token stream and a distributed batch loader.
# ---------------------------------------------------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256


def load_data_shard(path: str) -> torch.Tensor:
    """Read one shard: 256 little-endian int32 (magic, version, token count, ...), then uint16 tokens."""
    header_bytes = SHARD_HEADER_INTS * 4
    size = os.path.getsize(path)
    if size < header_bytes:
        raise ValueError(f"{path}: shard is {size} bytes, shorter than its {header_bytes}-byte header; re-create it")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {int(header[0])} (want {SHARD_MAGIC}); not a token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {int(header[1])} is not supported (want {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = header_bytes + 2 * num_tokens
    if size != expected:
        raise ValueError(
            f"{path}: size {size} bytes but header says {num_tokens} tokens ({expected} bytes); re-create it"
        )
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=header_bytes)
    return torch.from_numpy(tokens.astype(np.int32))


def shard_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}; set DATA_PATH to a folder with fineweb_*_*.bin files")
    return files


class TokenStream:
    """Reads shards in order, forever, and hands out contiguous runs of tokens."""

    def __init__(self, pattern: str) -> None:
        self.files = shard_files(pattern)
        self.file_idx = 0
        self.tokens = load_data_shard(self.files[0])
        self.pos = 0

    def _advance(self) -> None:
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = load_data_shard(self.files[self.file_idx])
        self.pos = 0

    def take(self, n: int) -> torch.Tensor:
        chunks = []
        while n > 0:
            avail = self.tokens.numel() - self.pos
            if avail <= 0:
                self._advance()
                continue
            k = min(n, avail)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class DistributedTokenLoader:
    """Each call takes one global batch from the stream; every rank keeps its own contiguous span."""

    def __init__(self, pattern: str, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.stream = TokenStream(pattern)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        local_tokens = max(seq_len, local_tokens // seq_len * seq_len)
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = chunk[self.rank * span : (self.rank + 1) * span].to(dtype=torch.int64)
        x = local[:-1].reshape(-1, seq_len)
        y = local[1:].reshape(-1, seq_len)
        pin = self.device.type == "cuda"
        return x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)


def load_validation_tokens(pattern: str, seq_len: int, limit: int = 0) -> torch.Tensor:
    """The validation stream, cut to whole sequences plus one token (optionally only its first `limit` tokens)."""
    tokens = torch.cat([load_data_shard(f) for f in shard_files(pattern)])
    if limit > 0:
        tokens = tokens[: limit + 1]
    usable = (tokens.numel() - 1) // seq_len * seq_len
    if usable <= 0:
        raise ValueError(f"validation split {pattern} is shorter than one sequence of {seq_len} tokens")
    return tokens[: usable + 1]


# ---------------------------------------------------------------------------------------------------------------------
# templates.evaluate: Validation: non-overlapping windows over the validation stream, split across ranks; loss, bpb, token losses.
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_tokens: torch.Tensor,
    byte_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seq_len: int,
    batch_tokens: int,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    keep_token_losses: bool = False,
) -> tuple[float, float, torch.Tensor | None]:
    """(val_loss in nats per token, val_bpb, the per-token losses of this rank's windows in order, or None).

    `model(x, y, reduction="none")` must return per-token losses. Each rank scores a contiguous range of windows.
    """
    total_seqs = (val_tokens.numel() - 1) // seq_len
    first = total_seqs * rank // world_size
    last = total_seqs * (rank + 1) // world_size
    seqs_per_batch = max(1, batch_tokens // (world_size * seq_len))
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    token_count = torch.zeros((), device=device, dtype=torch.float64)
    byte_count = torch.zeros((), device=device, dtype=torch.float64)
    kept = []
    was_training = model.training
    model.eval()
    for s in range(first, last, seqs_per_batch):
        e = min(s + seqs_per_batch, last)
        chunk = val_tokens[s * seq_len : e * seq_len + 1].to(device=device, dtype=torch.int64, non_blocking=True)
        x = chunk[:-1].reshape(-1, seq_len)
        y = chunk[1:].reshape(-1, seq_len)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = model(x, y, reduction="none").float()
        loss_sum += losses.double().sum()
        token_count += y.numel()
        byte_count += target_bytes(x, y, byte_tables).double().sum()
        if keep_token_losses:
            kept.append(losses.reshape(-1).cpu())
    if world_size > 1:
        for t in (loss_sum, token_count, byte_count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    model.train(was_training)
    val_loss = (loss_sum / token_count).item()
    val_bpb = val_loss / math.log(2.0) * (token_count / byte_count).item()
    return val_loss, val_bpb, (torch.cat(kept) if kept else torch.zeros(0)) if keep_token_losses else None


def gather_token_losses(local: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's per-token losses in rank order (ranks hold contiguous ranges)."""
    if world_size == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64, device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float32, device=device)
    padded[: local.numel()] = local.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())].cpu() for p, n in zip(parts, sizes)])


# ---------------------------------------------------------------------------------------------------------------------
# templates.export: The artifact: int8 per-row quantisation of the weights, zlib compression, and the exact read-back.
# ---------------------------------------------------------------------------------------------------------------------

INT8_CLIP_QUANTILE = 0.9999984
INT8_KEEP_FLOAT_MAX_NUMEL = 65_536
INT8_FORMAT = "int8_clean_per_row_v1"


def _quantize_rows_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 with a clip at a high quantile of |w|; fp16 scales."""
    w = t.float()
    if w.numel() == 0:
        return torch.zeros_like(w, dtype=torch.int8), torch.ones(w.shape[0], dtype=torch.float16)
    clip = torch.quantile(w.abs(), INT8_CLIP_QUANTILE, dim=1) if w.shape[1] > 1 else w.abs().amax(dim=1)
    scale = (clip / 127.0).clamp_min(1e-7).to(torch.float16)  # an all-zero row keeps a tiny, nonzero scale
    s = scale.float()[:, None]
    q = torch.clamp(torch.round(torch.clamp(w, -clip[:, None], clip[:, None]) / s), -127, 127).to(torch.int8)
    return q, scale


def _quantize_tensor_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = t.float()
    clip = torch.quantile(w.abs().flatten(), INT8_CLIP_QUANTILE) if w.numel() else torch.tensor(0.0)
    scale = (clip / 127.0).clamp_min(1e-12)
    q = torch.clamp(torch.round(torch.clamp(w, -clip, clip) / scale), -127, 127).to(torch.int8)
    return q, scale.reshape(1).to(torch.float32)


def quantize_state_dict_int8(state: dict[str, torch.Tensor], keep_fp32_patterns: tuple[str, ...]) -> dict:
    """Large float tensors -> int8 (+ scales); small ones pass through (fp32 if a control tensor, else fp16)."""
    quantized, scales, passthrough, dtypes = {}, {}, {}, {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        if not t.is_floating_point():
            passthrough[name] = t
            continue
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        if t.numel() <= INT8_KEEP_FLOAT_MAX_NUMEL:
            keep32 = any(p in name for p in keep_fp32_patterns)
            passthrough[name] = t.float() if keep32 else t.to(torch.float16)
            continue
        q, s = _quantize_rows_int8(t) if t.ndim == 2 else _quantize_tensor_int8(t)
        quantized[name], scales[name] = q, s
    return dict(format=INT8_FORMAT, quantized=quantized, scales=scales, passthrough=passthrough, dtypes=dtypes)


def dequantize_state_dict_int8(obj: dict) -> dict[str, torch.Tensor]:
    if obj.get("format") != INT8_FORMAT:
        raise ValueError(f"artifact format {obj.get('format')!r} is not {INT8_FORMAT!r}")
    out = {}
    for name, q in obj["quantized"].items():
        s = obj["scales"][name].float()
        w = q.float() * (s[:, None] if q.ndim == 2 else s)
        out[name] = w.to(getattr(torch, obj["dtypes"][name]))
    for name, t in obj["passthrough"].items():
        out[name] = t.to(getattr(torch, obj["dtypes"][name])) if name in obj["dtypes"] else t
    return out


def payload_bytes(obj: dict) -> int:
    parts = ("quantized", "scales", "passthrough")
    return sum(t.numel() * t.element_size() for part in parts for t in obj[part].values())


def serialize_artifact(obj: dict) -> tuple[bytes, int]:
    """(compressed blob, raw torch.save size)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    return zlib.compress(raw, level=9), len(raw)


def read_artifact(path: str) -> dict[str, torch.Tensor]:
    """Read an artifact file back into a state dict of the training dtypes."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        raw = zlib.decompress(blob)
    except zlib.error as exc:
        raise ValueError(f"{path}: not a zlib-compressed artifact ({exc}); pass the file the run wrote") from exc
    obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return dequantize_state_dict_int8(obj)


# ---------------------------------------------------------------------------------------------------------------------
# templates.hparams: Hyperparameters: every knob read from an environment variable, upstream names first.
# ---------------------------------------------------------------------------------------------------------------------

VARIANT_DEFAULTS: dict[str, str] = {}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, VARIANT_DEFAULTS.get(name, default))


def env_int(name: str, default: int) -> int:
    return int(float(env_str(name, str(default))))


def env_float(name: str, default: float) -> float:
    return float(env_str(name, str(default)))


def env_flag(name: str, default: bool) -> bool:
    return env_str(name, "1" if default else "0").strip().lower() in ("1", "true", "yes", "on")


class Hyperparameters:
    """A snapshot of the knobs, read when constructed (so tests can set the environment first)."""

    def __init__(self) -> None:
        # data and run identity
        self.data_path = env_str("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        self.tokenizer_path = env_str("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
        self.run_id = env_str("RUN_ID", "run")
        self.seed = env_int("SEED", 1337)
        # validation
        self.val_batch_size = env_int("VAL_BATCH_SIZE", 524_288)
        self.val_loss_every = env_int("VAL_LOSS_EVERY", 1000)
        self.val_tokens = env_int("VAL_TOKENS", 0)  # 0 = the whole validation split
        self.train_log_every = env_int("TRAIN_LOG_EVERY", 200)
        # length of training
        self.iterations = env_int("ITERATIONS", 20_000)
        self.warmdown_iters = env_int("WARMDOWN_ITERS", 1200)
        self.warmup_steps = env_int("WARMUP_STEPS", 20)
        self.train_batch_tokens = env_int("TRAIN_BATCH_TOKENS", 524_288)
        self.train_seq_len = env_int("TRAIN_SEQ_LEN", 1024)
        self.max_wallclock_seconds = env_float("MAX_WALLCLOCK_SECONDS", 600.0)
        # model shape
        self.vocab_size = env_int("VOCAB_SIZE", 1024)
        self.num_layers = env_int("NUM_LAYERS", 9)
        self.model_dim = env_int("MODEL_DIM", 512)
        self.num_heads = env_int("NUM_HEADS", 8)
        self.num_kv_heads = env_int("NUM_KV_HEADS", 4)
        self.mlp_mult = env_int("MLP_MULT", 2)
        self.tie_embeddings = env_flag("TIE_EMBEDDINGS", True)
        self.rope_base = env_float("ROPE_BASE", 10_000.0)
        self.logit_softcap = env_float("LOGIT_SOFTCAP", 30.0)
        self.qk_gain_init = env_float("QK_GAIN_INIT", 1.5)
        self.tied_embed_init_std = env_float("TIED_EMBED_INIT_STD", 0.005)
        # optimisers
        self.embed_lr = env_float("EMBED_LR", 0.6)
        self.head_lr = env_float("HEAD_LR", 0.008)
        self.tied_embed_lr = env_float("TIED_EMBED_LR", 0.05)
        self.matrix_lr = env_float("MATRIX_LR", 0.04)
        self.scalar_lr = env_float("SCALAR_LR", 0.04)
        self.muon_momentum = env_float("MUON_MOMENTUM", 0.95)
        self.muon_backend_steps = env_int("MUON_BACKEND_STEPS", 5)
        self.muon_momentum_warmup_start = env_float("MUON_MOMENTUM_WARMUP_START", 0.85)
        self.muon_momentum_warmup_steps = env_int("MUON_MOMENTUM_WARMUP_STEPS", 500)
        self.beta1 = env_float("BETA1", 0.9)
        self.beta2 = env_float("BETA2", 0.95)
        self.adam_eps = env_float("ADAM_EPS", 1e-8)
        self.grad_clip_norm = env_float("GRAD_CLIP_NORM", 0.0)
        control = env_str("CONTROL_TENSOR_NAME_PATTERNS", "attn_scale,mlp_scale,resid_mix,q_gain,skip_weight")
        self.control_patterns = tuple(p for p in control.split(",") if p)
        # execution
        self.compile = env_flag("COMPILE", True)
        self.eval_only = env_flag("EVAL_ONLY", False)
        self.artifact = env_str("ARTIFACT", "")
        self.token_losses = env_str("TOKEN_LOSSES", "")

    def items(self) -> list[tuple[str, object]]:
        return sorted(vars(self).items())


# ---------------------------------------------------------------------------------------------------------------------
# templates.layers: Building blocks shared by every variant: RMS norm, a linear layer kept in fp32 and cast at use, the ReLU^2 MLP.
# ---------------------------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class RMSNorm(nn.Module):
    """Weightless RMS norm over the last dimension."""

    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps)


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose master weight stays fp32 and is cast to the input's dtype at each call."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class ReluSquaredMLP(nn.Module):
    """x -> proj(relu(fc(x))^2); the output projection starts at zero so each block starts as the identity."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim)
        self.proj = CastedLinear(mult * dim, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


def keep_control_params_fp32(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """After a bf16 cast, put small and control parameters (gains, mixes, scales) back in fp32."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.ndim < 2 or any(pat in name for pat in patterns)) and p.dtype != torch.float32:
                p.data = p.data.float()


# ---------------------------------------------------------------------------------------------------------------------
# templates.mixers.attention: Causal self-attention with grouped-query heads, rotary positions, QK RMS norm and a learned per-head query gain.
# ---------------------------------------------------------------------------------------------------------------------

class Rotary(nn.Module):
    """Rotary position tables, cached for the last sequence length and device seen."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos()[None, None], freqs.sin()[None, None])
        return self._cache[2].to(dtype), self._cache[3].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float) -> None:
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"MODEL_DIM {dim} / NUM_HEADS {num_heads} / NUM_KV_HEADS {num_kv_heads} do not divide")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = self.head_dim * num_kv_heads
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(t, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


# ---------------------------------------------------------------------------------------------------------------------
# templates.model: The stack: token embedding, blocks with residual mixing and U-Net skips, tied output head with a logit softcap.
# ---------------------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """x <- mix(x, x0); x <- x + attn_scale * attn(norm x); x <- x + mlp_scale * mlp(norm x)."""

    def __init__(self, hp: Hyperparameters) -> None:
        super().__init__()
        dim = hp.model_dim
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(dim, hp.num_heads, hp.num_kv_heads, hp.rope_base, hp.qk_gain_init)
        self.mlp = ReluSquaredMLP(dim, hp.mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.attn_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Blocks in two halves: the first half stores its outputs, the second half adds them back in reverse order."""

    def __init__(self, hp: Hyperparameters) -> None:
        super().__init__()
        if hp.logit_softcap <= 0:
            raise ValueError(f"LOGIT_SOFTCAP must be positive, got {hp.logit_softcap}")
        self.logit_softcap = hp.logit_softcap
        self.tie_embeddings = hp.tie_embeddings
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        self.num_encoder_layers = hp.num_layers // 2
        self.num_decoder_layers = hp.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, hp.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList(Block(hp) for _ in range(hp.num_layers))
        self.final_norm = RMSNorm()
        self.lm_head = None if hp.tie_embeddings else CastedLinear(hp.model_dim, hp.vocab_size, zero_init=True)
        with torch.no_grad():
            std = hp.tied_embed_init_std if hp.tie_embeddings else 1.0
            self.tok_emb.weight.normal_(mean=0.0, std=std)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = rms_norm(self.tok_emb(input_ids))
        x0 = x
        skips = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0)
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = self.blocks[self.num_encoder_layers + i](x, x0)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = F.linear(x, self.tok_emb.weight.to(x.dtype))
        else:
            logits = self.lm_head(x)
        return self.logit_softcap * torch.tanh(logits.float() / self.logit_softcap)

    def forward(self, input_ids: torch.Tensor, target_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.logits(input_ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction=reduction)
        return loss if reduction == "mean" else loss.reshape(target_ids.shape)


# ---------------------------------------------------------------------------------------------------------------------
# templates.optim: Optimisers and schedules: Muon (orthogonalised momentum) for matrices, Adam for the rest, wall-clock warmdown.
# ---------------------------------------------------------------------------------------------------------------------

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz_orthogonalize(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T of g = U S V^T by a quintic Newton-Schulz iteration, in bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised per matrix; matrices are shared round-robin between ranks.

    Each rank orthogonalises its share of the parameters into one flat buffer; an all-reduce sums the buffers so
    every rank applies every update. The update is scaled by sqrt(max(1, rows / cols)).
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.orthogonalize = newton_schulz_orthogonalize

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            total = sum(p.numel() for p in params)
            flat = torch.zeros(total, device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=group["momentum"])
                    else:
                        g = buf
                    update = self.orthogonalize(g, group["backend_steps"])
                    update = update * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = update.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def lr_multiplier(
    step: int, elapsed_ms: float, iterations: int, warmdown_iters: int, max_wallclock_ms: float | None
) -> float:
    """1 until the warmdown, then linear to 0: by steps, or by wall-clock when a cap is set."""
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_ms is None:
        start = max(iterations - warmdown_iters, 0)
        return max((iterations - step) / warmdown_iters, 0.0) if step >= start else 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = warmdown_iters * step_ms
    remaining_ms = max(max_wallclock_ms - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


# ---------------------------------------------------------------------------------------------------------------------
# templates.train: main(): setup, training under the wall-clock cap, serialisation, round-trip evaluation of the artifact, logs.
# ---------------------------------------------------------------------------------------------------------------------

ARTIFACT_NAME = "final_model.int8.ptz"
SCORE_TAG = "final_int8_zlib_roundtrip"


def main() -> None:
    hp = Hyperparameters()
    code = Path(__file__).read_bytes()

    # ----------------------------------------------------------------------------- distributed and device
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world_size != 0:
        raise SystemExit(f"WORLD_SIZE={world_size} must divide 8 (the batch is split into 8 micro-batches)")
    grad_accum_steps = env_int("GRAD_ACCUM_STEPS", 0) or 8 // world_size
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = rank == 0
    autocast_dtype = torch.bfloat16 if use_cuda else None
    compile_model = hp.compile and use_cuda

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()

    # ----------------------------------------------------------------------------- logging
    log_path = Path("logs") / f"{hp.run_id}.txt"
    if master:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w", encoding="utf-8") as f:
            f.write(code.decode("utf-8", errors="replace"))
            f.write("\n" + "=" * 100 + "\n")

    def log0(msg: str, console: bool = True) -> None:
        if not master:
            return
        if console:
            print(msg, flush=True)
        with log_path.open("a", encoding="utf-8") as f:
            f.write(msg + "\n")

    log0(f"Running Python {sys.version}", console=False)
    log0(f"Running PyTorch {torch.__version__}", console=False)
    if use_cuda:
        log0(f"device:{torch.cuda.get_device_name(device)} count:{torch.cuda.device_count()}", console=False)
    log0("Hyperparameters:")
    for name, value in hp.items():
        log0(f"  {name}: {value}")
    log0(f"seed:{hp.seed}")
    log0(f"world_size:{world_size} grad_accum_steps:{grad_accum_steps}")

    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    if use_cuda:
        torch.cuda.manual_seed_all(hp.seed)

    # ----------------------------------------------------------------------------- tokenizer and validation data
    sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    if sp.get_piece_size() != hp.vocab_size:
        raise SystemExit(f"{hp.tokenizer_path}: {sp.get_piece_size()} pieces but VOCAB_SIZE={hp.vocab_size}")
    byte_tables = build_byte_tables(sp, hp.vocab_size, device)
    train_pattern = os.path.join(hp.data_path, "fineweb_train_*.bin")
    val_pattern = os.path.join(hp.data_path, "fineweb_val_*.bin")
    val_tokens = load_validation_tokens(val_pattern, hp.train_seq_len, hp.val_tokens)
    log0(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    log0(f"val_loader:shards pattern={val_pattern} tokens:{val_tokens.numel() - 1}")

    # ----------------------------------------------------------------------------- model
    base_model = GPT(hp).to(device)
    if use_cuda:
        base_model = base_model.bfloat16()
        for module in base_model.modules():
            if isinstance(module, CastedLinear):
                module.float()
    keep_control_params_fp32(base_model, hp.control_patterns)
    log0(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    model = torch.compile(base_model, dynamic=False, fullgraph=True) if compile_model else base_model

    steps_done = 0
    train_time_ms = 0.0
    pre_quant_bpb = None
    if hp.eval_only:
        if not hp.artifact or not os.path.isfile(hp.artifact):
            raise SystemExit(f"EVAL_ONLY=1 needs ARTIFACT=<file> of an existing artifact (got {hp.artifact!r})")
        artifact_path = Path(hp.artifact)
        log0(f"eval_only: scoring {artifact_path.name} without training")
        bytes_model = artifact_path.stat().st_size
    else:
        # ------------------------------------------------------------------------- optimisers
        named = list(base_model.named_parameters())
        is_control = [p.ndim < 2 or any(c in n for c in hp.control_patterns) for n, p in named]
        matrix_params = [p for (n, p), c in zip(named, is_control) if n.startswith("blocks.") and not c]
        scalar_params = [p for (n, p), c in zip(named, is_control) if n.startswith("blocks.") and c]
        scalar_params.append(base_model.skip_weights)
        fused = use_cuda
        embed_lr = hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr
        adam_kw = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=fused)
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.Adam([{"params": [base_model.tok_emb.weight], "lr": embed_lr, "base_lr": embed_lr}], **adam_kw),
            Muon(matrix_params, lr=hp.matrix_lr, momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps),
            torch.optim.Adam([{"params": scalar_params, "lr": hp.scalar_lr, "base_lr": hp.scalar_lr}], **adam_kw),
        ]
        for group in optimizers[1].param_groups:
            group["base_lr"] = hp.matrix_lr
        if base_model.lm_head is not None:
            head = [{"params": [base_model.lm_head.weight], "lr": hp.head_lr, "base_lr": hp.head_lr}]
            optimizers.append(torch.optim.Adam(head, **adam_kw))
        if compile_model:
            optimizers[1].orthogonalize = torch.compile(newton_schulz_orthogonalize)
        train_model = (
            DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False)
            if distributed
            else model
        )

        def train_step(loader: DistributedTokenLoader, lr_scale: float, momentum: float) -> torch.Tensor:
            total = torch.zeros((), device=device)
            for micro in range(grad_accum_steps):
                if distributed:
                    train_model.require_backward_grad_sync = micro == grad_accum_steps - 1
                x, y = loader.next_batch(hp.train_batch_tokens, hp.train_seq_len, grad_accum_steps)
                with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = train_model(x, y)
                (loss / grad_accum_steps).backward()
                total += loss.detach() / grad_accum_steps
            for group in optimizers[1].param_groups:
                group["momentum"] = momentum
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr_scale
            if hp.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(base_model.parameters(), hp.grad_clip_norm)
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return total

        # ------------------------------------------------------------------------- compile warm-up, then restore
        log0(f"train_loader:dataset:{os.path.basename(hp.data_path)} train_shards:{len(shard_files(train_pattern))}")
        if hp.warmup_steps > 0:
            model_state = copy.deepcopy(base_model.state_dict())
            opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
            warm_loader = DistributedTokenLoader(train_pattern, rank, world_size, device)
            for i in range(hp.warmup_steps):
                train_step(warm_loader, 1.0, hp.muon_momentum_warmup_start)
                if i + 1 == hp.warmup_steps or (i + 1) % 10 == 0:
                    log0(f"warmup_step:{i + 1}/{hp.warmup_steps}")
            base_model.load_state_dict(model_state)
            for opt, state in zip(optimizers, opt_states):
                opt.load_state_dict(state)
            del model_state, opt_states, warm_loader

        # ------------------------------------------------------------------------- training under the cap
        loader = DistributedTokenLoader(train_pattern, rank, world_size, device)
        max_wallclock_ms = 1000.0 * hp.max_wallclock_seconds if hp.max_wallclock_seconds > 0 else None
        stop_after_step = None
        log0("phase:train begin")
        sync()
        t0 = time.perf_counter()
        step = 0
        while True:
            last_step = step == hp.iterations or (stop_after_step is not None and step >= stop_after_step)
            if last_step or (hp.val_loss_every > 0 and step > 0 and step % hp.val_loss_every == 0):
                sync()
                train_time_ms += 1000.0 * (time.perf_counter() - t0)
                val_loss, val_bpb, _ = evaluate(
                    model, val_tokens, byte_tables, hp.train_seq_len, hp.val_batch_size, rank, world_size, device,
                    autocast_dtype,
                )  # fmt: skip
                pre_quant_bpb = val_bpb
                log0(
                    f"step:{step}/{hp.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                    f"train_time:{train_time_ms:.0f}ms step_avg:{train_time_ms / max(step, 1):.2f}ms"
                )
                sync()
                t0 = time.perf_counter()
            if last_step:
                if stop_after_step is not None and step < hp.iterations:
                    log0(f"stopping_early: wallclock_cap train_time:{train_time_ms:.0f}ms step:{step}/{hp.iterations}")
                break
            elapsed_ms = train_time_ms + 1000.0 * (time.perf_counter() - t0)
            lr_scale = lr_multiplier(step, elapsed_ms, hp.iterations, hp.warmdown_iters, max_wallclock_ms)
            momentum = muon_momentum_at(
                step, hp.muon_momentum_warmup_start, hp.muon_momentum, hp.muon_momentum_warmup_steps
            )
            train_loss = train_step(loader, lr_scale, momentum)
            step += 1
            approx_ms = train_time_ms + 1000.0 * (time.perf_counter() - t0)
            if hp.train_log_every > 0 and (step <= 10 or step % hp.train_log_every == 0):
                log0(
                    f"step:{step}/{hp.iterations} train_loss:{train_loss.item():.4f} "
                    f"train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms"
                )
            reached_cap = max_wallclock_ms is not None and approx_ms >= max_wallclock_ms
            if distributed and max_wallclock_ms is not None:
                flag = torch.tensor(int(reached_cap), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                reached_cap = bool(flag.item())
            if stop_after_step is None and reached_cap:
                stop_after_step = step
        steps_done = step
        log0("phase:train end")
        if use_cuda:
            log0(
                f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB"
            )

        # ------------------------------------------------------------------------- serialisation
        log0("phase:serialize begin")
        artifact_path = Path(ARTIFACT_NAME)
        if master:
            state = base_model.state_dict()
            raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
            quant = quantize_state_dict_int8(state, hp.control_patterns)
            blob, raw_torch = serialize_artifact(quant)
            tmp = artifact_path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, artifact_path)
            payload = payload_bytes(quant)
            log0(f"Serialized model: {raw_bytes} bytes")
            log0(f"Code size: {len(code)} bytes")
            log0(f"Total submission size: {raw_bytes + len(code)} bytes")
            log0(
                f"Serialized model int8+zlib: {len(blob)} bytes "
                f"(payload:{payload} raw_torch:{raw_torch} payload_ratio:{raw_bytes / max(payload, 1):.2f}x)"
            )
            log0(f"Total submission size int8+zlib: {len(blob) + len(code)} bytes")
        if distributed:
            dist.barrier()
        bytes_model = artifact_path.stat().st_size
        log0("phase:serialize end")

    # ----------------------------------------------------------------------------- round-trip evaluation
    if hp.eval_only:
        log0(f"Serialized model int8+zlib: {bytes_model} bytes")
        log0(f"Code size: {len(code)} bytes")
        log0(f"Total submission size int8+zlib: {bytes_model + len(code)} bytes")
    log0("phase:eval begin")
    sync()
    t_eval = time.perf_counter()
    base_model.load_state_dict(read_artifact(str(artifact_path)), strict=True)
    val_loss, val_bpb, token_losses = evaluate(
        model, val_tokens, byte_tables, hp.train_seq_len, hp.val_batch_size, rank, world_size, device, autocast_dtype,
        keep_token_losses=bool(hp.token_losses),
    )  # fmt: skip
    sync()
    eval_time_ms = 1000.0 * (time.perf_counter() - t_eval)
    log0(f"{SCORE_TAG} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{eval_time_ms:.0f}ms")
    log0(f"{SCORE_TAG}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    log0("phase:eval end")
    if hp.token_losses:
        all_losses = gather_token_losses(token_losses, world_size, device)
        if master:
            out = Path(hp.token_losses)
            tmp = out.with_name(out.name + ".tmp.npz")
            tokens = val_tokens[: all_losses.numel() + 1].numpy().astype(np.int32)
            np.savez(tmp, tokens=tokens, losses=all_losses.numpy().astype(np.float32))
            os.replace(tmp, out)
            log0(f"token_losses: {all_losses.numel()} written to {out.name}")

    result = {
        "seed": hp.seed,
        "world_size": world_size,
        "steps": steps_done,
        "train_time_ms": round(train_time_ms, 1),
        "eval_time_ms": round(eval_time_ms, 1),
        "val_loss": val_loss,
        "val_bpb": val_bpb,
        "pre_quant_val_bpb": pre_quant_bpb,
        "bytes_model": bytes_model,
        "bytes_code": len(code),
        "bytes_total": bytes_model + len(code),
        "artifact": artifact_path.name,
        "artifact_sha256": hashlib.sha256(artifact_path.read_bytes()).hexdigest(),
        "score_tag": f"{SCORE_TAG}_exact",
        "eval_only": hp.eval_only,
        "torch": torch.__version__,
    }
    log0("result_json " + json.dumps(result, sort_keys=True))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
