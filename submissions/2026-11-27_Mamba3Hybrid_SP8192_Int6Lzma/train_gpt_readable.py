"""train_gpt.py: the mamba3-hybrid variant with the record recipe (600 s on 8 GPUs), assembled by ssm-golf. Origin:
openai/parameter-golf#1890.

5 Mamba-3 SISO mixers + 2 attention layers (7x512, U-Net skips, LeakyReLU(0.5)^2 MLP 3x), sp8192, int6 + int8
embeddings + lzma.

Every hyperparameter is an environment variable; the variant's own values are in VARIANT_DEFAULTS.
"""

import copy
import dataclasses
import glob
import hashlib
import io
import json
import lzma
import math
import os
import sys
import time
import types
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from triton.language.extra import libdevice
from triton.tools.tensor_descriptor import TensorDescriptor

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters: every knob is an environment variable (upstream's names where upstream has one).
#
# The variant's defaults sit in VARIANT_DEFAULTS (written by `builder assemble`); the environment at run time wins.
# ---------------------------------------------------------------------------------------------------------------------

VARIANT_DEFAULTS: dict[str, str] = {
    "ARTIFACT_NAME": "final_model.int6.ptz",
    "ATTN_VALUE_SILU": "1",
    "COMPRESSOR": "lzma",
    "CONTROL_TENSOR_NAME_PATTERNS": "_scale,resid_mix,q_gain,skip_weights,_bias,_norm_weight,D_skip",
    "DATA_PATH": "./data/datasets/fineweb10B_sp8192",
    "EMA_DECAY": "0.997",
    "EVAL_BATCH_SEQS": "32",
    "EVAL_MODE": "ttt",
    "GPTQ_CALIB_LEN": "1024",
    "GPTQ_CALIB_SEQS": "16",
    "GPTQ_RESERVE_SECONDS": "60",
    "LATE_QAT_THRESHOLD": "0.15",
    "LAYER_PATTERN": "mamba3,mamba3,attention",
    "MAMBA3_CHUNK_SIZE": "64",
    "MAMBA3_D_STATE": "64",
    "MAMBA3_EXPAND": "2",
    "MAMBA3_HEADDIM": "64",
    "MAMBA3_ROPE_FRACTION": "0.5",
    "MATRIX_LR": "0.025",
    "MLP_KIND": "leaky_relu2",
    "MLP_MULT": "3",
    "MODEL_DIM": "512",
    "MUON_MOMENTUM": "0.99",
    "MUON_MOMENTUM_WARMUP_START": "0.85",
    "MUON_MOMENTUM_WARMUP_STEPS": "500",
    "MUON_ROW_NORM": "1",
    "MUON_WEIGHT_DECAY": "0.04",
    "NUM_HEADS": "8",
    "NUM_KV_HEADS": "4",
    "NUM_LAYERS": "7",
    "ORTHO_INIT": "1",
    "PRUNE_TARGET_BYTES": "15990000",
    "QAT_BITS": "6",
    "QUANT": "int6",
    "QUANT_OVERRIDES": "tok_emb=int8",
    "SCALAR_LR": "0.02",
    "SCORE_TAG": "final_int6_lzma_roundtrip",
    "TIED_EMBED_LR": "0.05",
    "TOKENIZER_PATH": "./data/tokenizers/fineweb_8192_bpe.model",
    "TRAIN_BATCH_TOKENS": "1048576",
    "TRAIN_SEQ_LEN": "4096",
    "TTT_EPOCHS": "2",
    "TTT_LR": "0.01",
    "TTT_MOMENTUM": "0.9",
    "USE_GPTQ": "1",
    "VOCAB_SIZE": "8192",
    "WARMDOWN_ITERS": "2600",
    "WIDE_ROW_BITS": "8",
}


def env_str(name: str, default: str, choices: tuple[str, ...] = ()) -> str:
    value = os.environ[name] if name in os.environ else VARIANT_DEFAULTS.get(name, default)
    if choices and value not in choices:
        raise SystemExit(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def env_int(name: str, default: int) -> int:
    return int(float(env_str(name, str(default))))


def env_float(name: str, default: float) -> float:
    return float(env_str(name, str(default)))


def env_flag(name: str, default: bool) -> bool:
    return env_str(name, str(int(default))).strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env_str(name, default).split(",") if item.strip())


class Hyperparameters:
    """The run's knobs (data, length, optimisers, export, evaluation), read once when constructed."""

    def __init__(self) -> None:
        # where the data is and who this run is
        self.data_path = env_str("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        self.tokenizer_path = env_str("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
        self.run_id = env_str("RUN_ID", "run")
        self.seed = env_int("SEED", 1337)
        # how long and how much per step
        self.iterations = env_int("ITERATIONS", 20_000)
        self.max_wallclock_seconds = env_float("MAX_WALLCLOCK_SECONDS", 600.0)
        self.train_batch_tokens = env_int("TRAIN_BATCH_TOKENS", 524_288)
        self.train_seq_len = env_int("TRAIN_SEQ_LEN", 1024)
        self.grad_accum_steps = env_int("GRAD_ACCUM_STEPS", 0)  # 0: 8 // WORLD_SIZE
        self.warmup_steps = env_int("WARMUP_STEPS", 20)  # compile warm-up steps, undone before training
        self.lr_warmup_steps = env_int("LR_WARMUP_STEPS", 0)  # linear learning-rate ramp at the start
        self.warmdown_iters = env_int("WARMDOWN_ITERS", 1200)
        # optimisers: Muon for block matrices, Adam for embeddings, head and control tensors
        self.matrix_lr = env_float("MATRIX_LR", 0.04)
        self.scalar_lr = env_float("SCALAR_LR", 0.04)
        self.tied_embed_lr = env_float("TIED_EMBED_LR", 0.05)
        self.embed_lr = env_float("EMBED_LR", 0.6)
        self.head_lr = env_float("HEAD_LR", 0.008)
        self.muon_momentum = env_float("MUON_MOMENTUM", 0.95)
        self.muon_momentum_warmup_start = env_float("MUON_MOMENTUM_WARMUP_START", 0.85)
        self.muon_momentum_warmup_steps = env_int("MUON_MOMENTUM_WARMUP_STEPS", 500)
        self.muon_backend_steps = env_int("MUON_BACKEND_STEPS", 5)
        self.muon_weight_decay = env_float("MUON_WEIGHT_DECAY", 0.0)
        self.muon_row_norm = env_flag("MUON_ROW_NORM", False)  # each gradient row to unit norm before Muon
        self.beta1 = env_float("BETA1", 0.9)
        self.beta2 = env_float("BETA2", 0.95)
        self.adam_eps = env_float("ADAM_EPS", 1e-8)
        self.grad_clip_norm = env_float("GRAD_CLIP_NORM", 0.0)
        self.control_patterns = env_list(
            "CONTROL_TENSOR_NAME_PATTERNS", "branch_scales,mlp_scale,resid_mix,q_gain,skip_weights"
        )
        self.ema_decay = env_float("EMA_DECAY", 0.0)  # 0: no weight averaging
        self.ema_start_step = env_int("EMA_START_STEP", 0)
        # the artifact
        self.quant = env_str("QUANT", "int8")  # large float tensors
        self.quant_ternary = env_str("QUANT_TERNARY", "ternary2")  # weights of ternary linears
        self.quant_overrides = env_list("QUANT_OVERRIDES", "")  # "name_substring=quantiser,..."
        self.ternary_lstsq = env_flag("TERNARY_LSTSQ", False)  # export scale: least squares, not absmean
        self.ternary_warmstart_frac = env_float("TERNARY_WARMSTART_FRAC", 0.0)  # time trained float first
        self.ternary_ramp_frac = env_float("TERNARY_RAMP_FRAC", 0.1)  # then ramped into ternary over this share
        self.keep_float_max_numel = env_int("KEEP_FLOAT_MAX_NUMEL", 65_536)
        self.compressor = env_str("COMPRESSOR", "zlib")
        self.artifact_name = env_str("ARTIFACT_NAME", "final_model.int8.ptz")
        self.score_tag = env_str("SCORE_TAG", "final_int8_zlib_roundtrip")
        # evaluation
        self.val_batch_size = env_int("VAL_BATCH_SIZE", 524_288)
        self.val_loss_every = env_int("VAL_LOSS_EVERY", 1000)
        self.val_tokens = env_int("VAL_TOKENS", 0)  # 0: the whole validation split
        self.eval_seq_len = env_int("EVAL_SEQ_LEN", 0)  # 0: TRAIN_SEQ_LEN
        self.eval_mode = env_str("EVAL_MODE", "windows")  # windows | stateful
        self.eval_batch_seqs = env_int("EVAL_BATCH_SEQS", 0)  # 0: VAL_BATCH_SIZE tokens per step over the ranks
        self.train_log_every = env_int("TRAIN_LOG_EVERY", 200)
        # execution
        self.compile, self.compile_fullgraph = env_flag("COMPILE", True), env_flag("COMPILE_FULLGRAPH", True)  # CUDA
        self.compile_scope = env_str("COMPILE_SCOPE", "model", ("model", "blocks"))  # blocks: one graph reused
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
        self.compile_mode = env_str("COMPILE_MODE", "default", modes)
        self.eval_only = env_flag("EVAL_ONLY", False)
        self.artifact = env_str("ARTIFACT", "")
        self.token_losses = env_str("TOKEN_LOSSES", "")


# ---------------------------------------------------------------------------------------------------------------------
# Parts by name: a variant's declaration names its mixers, MLPs, input features, quantisers and compressors,
# and the stack looks them up here. A mixer file registers its class with `@register_mixer("name")` when it is
# imported; the assembled script holds only the parts its variant names.
# ---------------------------------------------------------------------------------------------------------------------

MIXERS: dict[str, Any] = {}
MLPS: dict[str, Any] = {}
FEATURES: dict[str, Any] = {}
QUANTISERS: dict[str, Any] = {}
COMPRESSORS: dict[str, Any] = {}
STAGES: dict[str, Any] = {}  # optional training/export/scoring stages; "step:<name>" runs after every step


def register(table: dict[str, Any], name: str) -> Callable[[Any], Any]:
    """`register(MLPS, "relu2")(part)`, or as a decorator; a name taken by another part is an error."""

    def add(obj: Any) -> Any:
        if table.get(name, obj) is not obj:
            raise ValueError(f"two parts are registered as {name!r}")
        table[name] = obj
        return obj

    return add


def register_mixer(name: str) -> Callable[[Any], Any]:
    """Class decorator: `@register_mixer("attention")`. The class takes (dim, linear, **options)."""
    return register(MIXERS, name)


def lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    """The part registered as `name`, or a one-line error listing the ones this script has."""
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ValueError(f"unknown {kind} {name!r}: this script has {known} (assemble the variant that uses it)")
    return table[name]


# ---------------------------------------------------------------------------------------------------------------------
# The model's declaration: which mixer (or mixers) and MLP sit at each depth, how the depth loops, which skips
# join the halves, how wide everything is. The stack is built from a `ModelConfig` alone.
#
# LAYER_PATTERN lists positions separated by commas and is repeated until NUM_LAYERS positions are filled:
#   "attention"                 one mixer, then the default MLP (MLP_KIND)
#   "attention|lti_mamba2"      two mixers in parallel on the same normed input, each with its own learned scale
#   "attention+selective"       two mixers one after the other, each its own residual step
#   "selective:none"            a position's own MLP kind (relu2, leaky_relu2, swiglu or none)
# so "s6,s6,s6,attention" with NUM_LAYERS=9 puts attention at depths 3 and 7.
# ---------------------------------------------------------------------------------------------------------------------

MLP_KINDS = ("relu2", "leaky_relu2", "swiglu", "none")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    mixers: tuple[str, ...]
    parallel: bool
    mlp: str


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 1024
    dim: int = 512
    layers: tuple[LayerSpec, ...] = ()
    loops: int = 1  # the unique layers run this many times (depth recurrence)
    unet_skips: bool = True
    x0_mix: bool = True  # each block mixes its input with the embedding (learned per channel)
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    embed_init_std: float = 0.005
    mlp_mult: float = 2.0
    linear_kind: str = "float"
    ternary_per_row: bool = False
    orthogonal_init: bool = False
    loop_embedding: bool = False  # a learned vector added at the start of each loop
    z_loss: float = 0.0  # training loss + z_loss * mean(logsumexp^2)
    features: tuple[str, ...] = ()  # input features added to the token embedding (hashed n-grams, ...)
    feature_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    mixer_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def parse_layer_pattern(pattern: str, num_layers: int, default_mlp: str) -> tuple[LayerSpec, ...]:
    """The LayerSpec of every depth, the pattern's positions repeated to `num_layers`."""
    positions = []
    for raw in pattern.split(","):
        entry = raw.strip()
        if not entry:
            raise ValueError(f"LAYER_PATTERN {pattern!r} has an empty position")
        branches, _, mlp = entry.partition(":")
        mlp = mlp.strip() or default_mlp
        if mlp not in MLP_KINDS:
            raise ValueError(f"LAYER_PATTERN position {entry!r}: MLP kind {mlp!r} is not one of {', '.join(MLP_KINDS)}")
        if "|" in branches and "+" in branches:
            raise ValueError(f"LAYER_PATTERN position {entry!r}: use either | (parallel) or + (serial), not both")
        parallel = "|" in branches
        names = tuple(n.strip() for n in branches.replace("|", "+").split("+"))
        if not all(names):
            raise ValueError(f"LAYER_PATTERN position {entry!r} has an empty mixer name")
        positions.append(LayerSpec(names, parallel, mlp))
    if num_layers < 1:
        raise ValueError(f"NUM_LAYERS must be at least 1, got {num_layers}")
    return tuple(positions[i % len(positions)] for i in range(num_layers))


def options_from_env(table: dict[str, Any], kind: str, names: set[str]) -> dict[str, dict[str, Any]]:
    """Each part's OPTIONS ({keyword: (ENV_NAME, default)}) read from the environment, typed like the default."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(names):
        options = {}
        for key, (env_name, default) in getattr(lookup(table, kind, name), "OPTIONS", {}).items():
            if isinstance(default, bool):
                options[key] = env_flag(env_name, default)
            elif isinstance(default, int):
                options[key] = env_int(env_name, default)
            elif isinstance(default, float):
                options[key] = env_float(env_name, default)
            else:
                options[key] = env_str(env_name, default)
        out[name] = options
    return out


def model_config_from_env() -> ModelConfig:
    """The declaration from the environment over the variant's defaults (VARIANT_DEFAULTS)."""
    default_mlp = env_str("MLP_KIND", "relu2")
    layers = parse_layer_pattern(env_str("LAYER_PATTERN", "attention"), env_int("NUM_LAYERS", 9), default_mlp)
    names = {n for spec in layers for n in spec.mixers}
    features = env_list("INPUT_FEATURES", "")
    return ModelConfig(
        vocab_size=env_int("VOCAB_SIZE", 1024),
        dim=env_int("MODEL_DIM", 512),
        layers=layers,
        loops=env_int("NUM_LOOPS", 1),
        unet_skips=env_flag("UNET_SKIPS", True),
        x0_mix=env_flag("X0_MIX", True),
        tie_embeddings=env_flag("TIE_EMBEDDINGS", True),
        logit_softcap=env_float("LOGIT_SOFTCAP", 30.0),
        embed_init_std=env_float("TIED_EMBED_INIT_STD", 0.005),
        mlp_mult=env_float("MLP_MULT", 2.0),
        linear_kind=env_str("LINEAR_KIND", "float"),
        ternary_per_row=env_flag("TERNARY_PER_ROW", False),
        orthogonal_init=env_flag("ORTHO_INIT", False),
        loop_embedding=env_flag("LOOP_EMBEDDING", False),
        z_loss=env_float("Z_LOSS", 0.0),
        features=features,
        feature_options=options_from_env(FEATURES, "input feature", set(features)),
        mixer_options=options_from_env(MIXERS, "mixer", names),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Token shards and batches. A shard is 256 little-endian int32 (magic 20240520, version 1, token count, then
# unused) followed by that many uint16 tokens. Every shard is checked before training starts; a bad one is named.
# ---------------------------------------------------------------------------------------------------------------------

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
SHARD_MAGIC = 20240520
SHARD_VERSION = 1


class ShardError(ValueError):
    """A shard that is not in the challenge's format; the message names the file and the fix."""


def shard_token_count(path: str) -> int:
    """The number of tokens a shard holds, after checking its header against its size."""
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as exc:
        raise ShardError(f"{path}: cannot read the shard ({exc.strerror})") from exc
    if header.size < HEADER_INTS:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header; re-create the shard")
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: magic {magic}, not {SHARD_MAGIC}: not a token shard; re-create it")
    if version != SHARD_VERSION:
        raise ShardError(f"{path}: shard version {version}; this script reads version {SHARD_VERSION}")
    if size != HEADER_BYTES + 2 * count:
        raise ShardError(f"{path}: header says {count} tokens but the file has {size} bytes; re-create the shard")
    return count


def read_shard(path: str) -> torch.Tensor:
    count = shard_token_count(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    return torch.from_numpy(tokens.astype(np.int32))


def find_shards(data_path: str, split: str) -> list[str]:
    """The split's shards in name order, each checked; an error names the folder when there are none."""
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise ShardError(f"{data_path}: no fineweb_{split}_*.bin shards; set DATA_PATH to a folder of shards")
    for path in files:
        shard_token_count(path)
    return files


class ShardStream:
    """The training shards read front to back, and again from the first when the last runs out."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        self.next_file = 0
        self.tokens = torch.zeros(0, dtype=torch.int32)
        self.pos = 0

    def read(self, n: int) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.int64)
        filled = 0
        while filled < n:
            if self.pos == self.tokens.numel():
                self.tokens = read_shard(self.files[self.next_file])
                self.next_file = (self.next_file + 1) % len(self.files)
                self.pos = 0
                continue
            k = min(n - filled, self.tokens.numel() - self.pos)
            out[filled : filled + k] = self.tokens[self.pos : self.pos + k]
            filled += k
            self.pos += k
        return out


class BatchLoader:
    """One micro-batch per call: every rank reads the same span of the stream and keeps its own contiguous part
    (its sequences plus one token for the shifted targets)."""

    def __init__(self, files: list[str], rank: int, world_size: int, device: torch.device) -> None:
        self.stream = ShardStream(files)
        self.rank, self.world_size, self.device = rank, world_size, device

    def next(self, batch_tokens: int, seq_len: int, accum_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = batch_tokens // (self.world_size * accum_steps) // seq_len * seq_len
        per_rank = max(per_rank, seq_len)
        span = self.stream.read((per_rank + 1) * self.world_size)
        mine = span[self.rank * (per_rank + 1) : (self.rank + 1) * (per_rank + 1)]
        if self.device.type == "cuda":
            mine = mine.pin_memory().to(self.device, non_blocking=True)
        return mine[:-1].view(-1, seq_len), mine[1:].view(-1, seq_len)


def load_validation_tokens(files: list[str], seq_len: int, limit: int = 0) -> torch.Tensor:
    """The validation stream cut to whole sequences plus one target token (its first `limit` tokens if set)."""
    tokens = torch.cat([read_shard(path) for path in files])
    if limit > 0:
        tokens = tokens[: limit + 1]
    usable = (tokens.numel() - 1) // seq_len * seq_len
    if usable <= 0:
        raise ShardError(f"{files[0]}: the validation split is shorter than one sequence of {seq_len} tokens")
    return tokens[: usable + 1]


# ---------------------------------------------------------------------------------------------------------------------
# Bits per byte, the canonical way: sentencepiece byte tables and the tokens-to-bytes conversion.
#
# Bytes of a target token = UTF-8 length of its piece without the leading-space marker, plus one for that space
# unless the previous token is a boundary (control, unknown or unused piece). Byte-fallback pieces <0xNN> are one
# byte. val_bpb = (nats per token / ln 2) * (tokens / bytes).
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


# ---------------------------------------------------------------------------------------------------------------------
# The parts every block is made of: the weightless RMS norm, the two linear kinds (float and ternary) and the MLPs.
#
# A mixer asks for its projections through a `LinearMaker`, so the same mixer is float in one variant and ternary in
# another: `linear(d_in, d_out)` follows the variant's LINEAR_KIND, `linear(d_in, d_out, body=False)` stays float
# (dynamics projections, small tables).
# ---------------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


class CastedLinear(nn.Linear):
    """Bias-free linear map; the master weight stays fp32 and meets the input in the input's dtype."""

    def __init__(self, d_in: int, d_out: int, zero_init: bool = False) -> None:
        super().__init__(d_in, d_out, bias=False)
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def ternary_scale(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The absmean scale of a weight: one per tensor, or one per output row (shape [rows, 1])."""
    a = w.abs()
    scale = a.mean(dim=1, keepdim=True) if per_row else a.mean()
    return scale.clamp_min(1e-8)


def ternarize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, +1}: w / scale rounded and clipped."""
    return torch.clamp(torch.round(w / scale), -1.0, 1.0)


class TernaryLinear(CastedLinear):
    """BitNet-b1.58 linear map: the forward sees scale * ternary(w / scale); gradients pass straight through.

    `quant_mix` (a buffer, 0..1) blends the float and ternary weights, so a warm start can train float first and
    ramp into ternary without recompiling.
    """

    def __init__(self, d_in: int, d_out: int, zero_init: bool = False, per_row: bool = False) -> None:
        super().__init__(d_in, d_out, zero_init)
        self.per_row = per_row
        self.register_buffer("quant_mix", torch.ones(()), persistent=False)

    def effective_weight(self) -> torch.Tensor:
        w = self.weight
        scale = ternary_scale(w.detach(), self.per_row)
        q = ternarize(w.detach(), scale) * scale
        return w + self.quant_mix * (q - w.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight().to(x.dtype))


class LinearMaker:
    """Makes a block's projections of the variant's kind: "float" or "ternary" (absmean per tensor or per row)."""

    def __init__(self, kind: str = "float", ternary_per_row: bool = False) -> None:
        if kind not in ("float", "ternary"):
            raise ValueError(f"LINEAR_KIND must be float or ternary, got {kind!r}")
        self.kind = kind
        self.ternary_per_row = ternary_per_row

    def __call__(self, d_in: int, d_out: int, zero_init: bool = False, body: bool = True) -> CastedLinear:
        if body and self.kind == "ternary":
            return TernaryLinear(d_in, d_out, zero_init, self.ternary_per_row)
        return CastedLinear(d_in, d_out, zero_init)


@register(MLPS, "relu2")
class ReluSquaredMLP(nn.Module):
    """down(relu(up x)^2); `down` starts at zero so a fresh block adds nothing."""

    def __init__(self, dim: int, hidden: int, linear: LinearMaker) -> None:
        super().__init__()
        self.up = linear(dim, hidden)
        self.down = linear(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)).square())


@register(MLPS, "leaky_relu2")
class LeakyReluSquaredMLP(ReluSquaredMLP):
    """down(leaky_relu(up x, 0.5)^2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.leaky_relu(self.up(x), negative_slope=0.5).square())


@register(MLPS, "swiglu")
class SwiGLUMLP(nn.Module):
    """down(silu(gate x) * up x)."""

    def __init__(self, dim: int, hidden: int, linear: LinearMaker) -> None:
        super().__init__()
        self.gate = linear(dim, hidden)
        self.up = linear(dim, hidden)
        self.down = linear(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


# ---------------------------------------------------------------------------------------------------------------------
# The scan core as PyTorch custom operators (namespace `ssm_golf`): each scan is one opaque node for torch.compile,
# forward and backward, so that a model compiles with fullgraph=True around its scans.
#
# Every scan is a pair of ops, the forward and its backward, tied together with `register_autograd`; each op's
# implementation picks the path itself (Triton on CUDA or under TRITON_INTERPRET=1, the PyTorch reference otherwise,
# whose backward is autograd through the reference), and a fake implementation gives the output shapes for tracing.
# Schemas hold no dicts and no None results: configs travel as strings ("BT=16,method=toeplitz") and absent tensors
# come back as empty placeholders that the Python wrappers drop.
#
# An op is defined once per process. A module imported again (importlib.reload in the interpreter tests, an assembled
# script run beside the templates) swaps its own functions in behind the existing definition, through a registry
# kept in sys.modules, so the newest import's kernels are the ones that run.
# ---------------------------------------------------------------------------------------------------------------------

SCAN_OP_NAMESPACE = "ssm_golf"
_SOP_REGISTRY = "_ssm_golf_scan_op_registry"


def _sop_registry() -> dict:
    """Process-wide {op name: (impl, fake, backward, setup_context)}, shared by every copy of this module."""
    holder = sys.modules.get(_SOP_REGISTRY)
    if holder is None:
        holder = types.ModuleType(_SOP_REGISTRY)
        holder.impls = {}
        sys.modules[_SOP_REGISTRY] = holder
    return holder.impls


def scan_op(
    name: str,
    schema: str,
    impl: Callable,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> torch._ops.OpOverload:
    """Define ssm_golf::<name> with `schema` (positional arguments only) on first use, else point the existing
    definition at these functions; returns the op."""
    impls = _sop_registry()
    first = name not in impls
    impls[name] = (impl, fake, backward, setup_context)
    if first:
        op = torch.library.custom_op(
            f"{SCAN_OP_NAMESPACE}::{name}", lambda *args: impls[name][0](*args), mutates_args=(), schema=schema
        )
        op.register_fake(lambda *args: impls[name][1](*args))
        if backward is not None:
            op.register_autograd(
                lambda ctx, *grads: impls[name][2](ctx, *grads),
                setup_context=lambda ctx, inputs, output: impls[name][3](ctx, inputs, output),
            )
    return getattr(getattr(torch.ops, SCAN_OP_NAMESPACE), name).default


def scan_none(ref: torch.Tensor) -> torch.Tensor:
    """The placeholder for an absent tensor result (op schemas cannot return None)."""
    return ref.new_empty(0)


def scan_opt(t: torch.Tensor | None) -> torch.Tensor | None:
    """A placeholder back to None."""
    return None if t is None or t.numel() == 0 and t.dim() == 1 else t


def _autograd_on() -> torch._C._ForceDispatchKeyGuard:
    """Autograd recording back on inside an op's implementation. The dispatcher runs an implementation below the
    autograd keys (it excludes them): there, even under enable_grad, no operation records a graph and every gradient
    taken would be zero. This guard takes them off the excluded set for its block."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def scan_ref_vjp(fn: Callable, inputs: list, grads: list) -> list[torch.Tensor]:
    """Gradients of fn(*inputs) (a tuple of tensors) against `grads`, by autograd through fn: the backward of the
    reference path, run inside a backward op's implementation (so with autograd switched back on there). Returns one
    tensor per input, a placeholder for None or non-float inputs."""
    with _autograd_on(), torch.enable_grad():
        leaves = [x.detach().requires_grad_() if x is not None and x.is_floating_point() else x for x in inputs]
        outs = fn(*leaves)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and g.numel() and o.requires_grad]
        wrt = [x for x in leaves if x is not None and x.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
    found = iter(got)
    res = []
    for x in leaves:
        if x is None or not x.requires_grad:
            res.append(scan_none(grads[0]))
        else:
            g = next(found)
            # a clone: autograd may hand back an incoming gradient itself, and op results must not alias inputs
            res.append(torch.zeros_like(x) if g is None else g.clone())
    return res


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3's per-head preparation: q/k head expansion, bias and rotation; the trapezoid weights and angles.
#
# Head h of Mamba-3 uses q~ = rot(theta_h)(q_g + q_bias_h), k~ = rot(theta_h)(k_g + k_bias_h), rotating the adjacent
# pairs (2r, 2r+1), r < R, by theta[b,t,h,r] (B,T,H,R): (e, o) -> (e cos - o sin, e sin + o cos)
# (`m3_rotary_heads_ref`). `m3_rotate_heads` writes the rotated rows per head (B,T,H,N) once, in q's dtype, so that
# the scan runs the plain SSD kernels on them (one row per head, no trigonometry in any chunk loop; on the H100 the
# rotation inside the five SSD kernels cost 0.18 ms of the forward and 0.3 ms of the backward at 64 x 1024, against
# ~0.1 ms to write and read the rows). One program per (time block, batch, group) reads the group's rows once and
# loops over its heads. The backward (ssm_golf::m3_rotate_bwd) rotates the rows' gradients back (by -theta), sums
# them over the heads of a group in registers, reduces the bias gradients per program, and writes one d theta per head
# with q's and k's shares summed: d theta = -dout_even * out_odd + dout_odd * out_even. Rows move as whole
# contiguous tiles, split into even and odd elements in registers (stride-2 loads and stores of the pairs cost 12x
# the bytes' time on the H100).
#
# `m3_gates(dt, trap, angles, theta0)` gives the scan's per-position weights and the cumulative angles in one pass
# over time per (batch, head), instead of eager (B,T,H)-sized gate tensors and an eager cumsum over (B,T,H,R):
#     lambda_t = sigmoid(trap_t), b'_t = (1 - lambda_t) dt_t, w_t = lambda_t dt_t + b'_{t+1} (b'_{T+1} = 0),
#     e_t = -b'_{t+1}, theta_t = theta0 + sum_{s<=t} angles_s dt_s.
# Its backward is the same walk in reverse: d theta summed from the end (a reverse cumsum carried across blocks) gives
# d angles_t = dt_t S_t and dt's angle term <angles_t, S_t>; d b'_t = dw_{t-1} - de_{t-1}; d theta0 = S_1.
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Chunked state-space-duality scan (Mamba-2 SSD) in Triton, forward and backward, with its PyTorch reference.
#
# Math, per batch b and head h (state h_t is P x N, fp32):
#     h_t = exp(la_t) h_{t-1} + w_t x_t B_t^T        y_t = h_t C_t + D x_t        out_t = y_t * silu(z_t)
# For Mamba-2 (`ssd_scan`): dt_t = softplus(dt_raw_t + dt_bias) (or dt_raw + dt_bias), la_t = dt_t A_h, w_t = dt_t.
# The generic form (`ssd_generic_scan`, used by Mamba-3) takes la, w per position and one extra coefficient e_t on
# the diagonal (the j == t term uses w_t + e_t), so trapezoidal rules fit the same kernels.
#
# Forward, one pass (`_ssd_fwd_kernel`): one program per (batch, head) walks the chunks of Q steps in order
# with the fp32 state in registers; per chunk it stores the chunk-start state for the backward (B x H x chunks x N x P,
# in the dot dtype: bf16 for bf16 inputs on the GPU, which the H100 check measured to cost nothing against fp32
# checkpoints, 4.81e-3 vs 4.80e-3 worst relative RMS error), steps the state (the one serial dot) and forms the chunk's
# output from the state it started with (the intra-chunk quadratic form C B^T masked by exp(G_i - G_j), the carried
# state's term, D x and the gate), so x, B and C are read once per chunk and the states are never read back. On the H100
# at 64 x 1024 it took 0.363 ms against 0.670 for the two kernels it replaced in Mamba-3 (a sequential state kernel,
# then an output kernel per chunk reading the states back), and SSD's graphed forward went from 0.415 to 0.269 ms.
# Every tile moves through tensor descriptors; the rare rows they cannot take (`_ssd_desc_ok`: unaligned bases, P or
# N rows not a multiple of 16 bytes) run the same kernel on zero-padded copies (`_ssd_fwd_padded`). TMA blocks are at
# most 256 long, so chunks, P and N are limited to 256 where the kernels run.
#
# Backward, one pass after an elementwise pre-pass, both forms and any number of groups: the pre-pass
# (`_ssd_bwd_gate_kernel`) gives dz and the gated dy (and a per-column D's shares), then one program per (batch, head)
# walks the chunks in reverse with the fp32 state gradient in registers (`_ssd_bwd_kernel`) and finishes per chunk dx,
# the head's dB and dC shares, the gate gradients (dla, dw, de, or Mamba-2's d dt per position and A's sum) and a
# per-head D's gradient (dy . x per position from its pair tile's diagonal). With G < H the heads of a group add their
# dB and dC shares into fp32 rows by TMA reduce-add (pointer atomics under the interpreter, which lacks the descriptor
# reduce, or where SSD_TUNING["bwd"]["red"] = "ptr"). The decay gradient of step t sums only the terms whose decay
# spans t (pairs j < t <= i, as a dot of the masked pair matrix with a triangular ones matrix; state reads and writes;
# the carry): never a difference of large row and column sums, which loses tiny gradients when decays are near 0. It
# replaced a split backward of three kernels with few live tiles each (a reverse pass storing the state gradient per
# chunk, then per-chunk dx and dB/dC kernels reading it back), measured slower on the H100 at 64 x 1024, graphed
# fwd+bwd: SSD (G = 1) 1.643 ms against 1.103 in one pass, Mamba-3 2.96 against 1.98 (3.35 against 2.94 when the one
# pass first took Mamba-3's call). A gate folded into the loop (dz and the gated dy there, no pre-pass) was tried and
# lost: 1.171 ms against 1.079 for pre-pass and loop, its loop spilling three times as much. Rows that the tensor
# descriptors cannot take run the same kernels on zero-padded copies (`_ssd_bwd_padded`, the chunk states included).
# Both loops run at two stages, Triton prefetching the next chunk's tiles during the current one's work: for the
# latency-bound backward that was worth 22% of SSD's fwd+bwd on the H100. The forward of Mamba-2's ungated form is
# capped at 168 registers, which fits three of its programs per SM (`_ssd_launch`).
#
# Dispatch: Triton when the tensors are on CUDA or TRITON_INTERPRET=1 (CPU tests), else the sequential reference.
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3 SISO scan (trapezoidal discretisation, data-dependent rotary B/C) in the chunked SSD form.
#
# What `mamba3_siso_scan` takes (per batch b, time t, head h; the caller does the B/C RMS-norm and computes DT, A):
#     x       (B,T,H,P)   values v_t (the x slice of in_proj; Mamba-3 has no conv)
#     dt      (B,T,H)     DT_t > 0, already softplus(dd_dt + dt_bias)
#     adt     (B,T,H)     A_t * DT_t <= 0 (A_t = min(-softplus(dd_A), -A_floor) in the seed)
#     trap    (B,T,H)     trapezoid logits; lambda_t = sigmoid(trap_t)
#     q, k    (B,T,G,N)   C and B after RMS-norm, G divides H (shared across the heads of a group)
#     angles  (B,T,H,R)   angle rates, 2R <= N; theta_t = theta_{t-1} + angles_t * DT_t (the caller applies tanh*pi)
#     q_bias, k_bias (H,N) optional per-head biases added to q, k before the rotation
#     D (H,) or (H,P), z (B,T,H,P) optional skip and silu gate
#     initial_state: optional tuple (theta (B,H,R), S (B,H,P,N), k (B,H,N), v (B,H,P)) from a previous window
# Math: q~_t = R(theta_t)(q_t + q_bias), k~_t = R(theta_t)(k_t + k_bias), R rotating the pairs (2r, 2r+1), r < R;
#     alpha_t = exp(adt_t), beta_t = alpha_t DT_t (1 - lambda_t), gamma_t = lambda_t DT_t,
#     S_t = alpha_t S_{t-1} + beta_t v_{t-1} k~_{t-1}^T + gamma_t v_t k~_t^T,   y_t = S_t q~_t + D v_t,  y * silu(z).
# Returns y (B,T,H,P), and with return_final_state the tuple (theta_T mod 2 pi, S_T fp32, k_T + k_bias (unrotated),
# v_T), which is exactly what initial_state takes for the next window.
#
# Chunked form: with b'_t = DT_t (1 - lambda_t), unrolling the trapezoid gives the SSD kernel with input weight
# w_t = gamma_t + b'_{t+1} (b'_{T+1} = 0), log-decay adt, and the diagonal term weighted by gamma_t alone
# (e_t = -b'_{t+1}); the carried-in (v, k) pair folds into the initial state as S_0 + b'_1 v_0 k~_0^T.
# The weights and cumulative angles are one Triton walk over time per (batch, head) each way (`m3_gates`); q and k
# are expanded to the heads, biased and rotated once into per-head rows (`m3_rotate_heads`, whose backward rotates the
# gradients back); the scan is `ssd_generic_scan` over those rows (one group per head).
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Causal self-attention: grouped-query heads, rotary positions, RMS-normed queries and keys with a learned gain
# per query head, optionally SiLU on the values; flash attention through PyTorch's SDPA.
# ---------------------------------------------------------------------------------------------------------------------


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, each [seq_len, head_dim] (the half-dim table written twice)."""
    freqs = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (i, i + d/2) of the last dimension by the tables' angles."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((second, -first), dim=-1) * sin


@register_mixer("attention")
class CausalSelfAttention(nn.Module):
    OPTIONS = {
        "heads": ("NUM_HEADS", 8),
        "kv_heads": ("NUM_KV_HEADS", 4),
        "rope_base": ("ROPE_BASE", 10_000.0),
        "qk_gain": ("QK_GAIN_INIT", 1.5),
        "value_silu": ("ATTN_VALUE_SILU", False),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        heads: int = 8,
        kv_heads: int = 4,
        rope_base: float = 10_000.0,
        qk_gain: float = 1.5,
        value_silu: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads or heads % kv_heads or (dim // heads) % 2:
            raise ValueError(f"attention: MODEL_DIM {dim}, NUM_HEADS {heads}, NUM_KV_HEADS {kv_heads} do not divide")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.rope_base = rope_base
        self.value_silu = value_silu
        self.q_proj = linear(dim, dim)
        self.k_proj = linear(dim, kv_heads * self.head_dim)
        self.v_proj = linear(dim, kv_heads * self.head_dim)
        self.out_proj = linear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((heads,), float(qk_gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x.shape

        def heads_first(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.view(batch, seq_len, n, self.head_dim).transpose(1, 2)

        q = rms_norm(heads_first(self.q_proj(x), self.heads))
        k = rms_norm(heads_first(self.k_proj(x), self.kv_heads))
        v = heads_first(self.v_proj(x), self.kv_heads)
        if self.value_silu:
            v = F.silu(v)
        cos, sin = rotary_tables(seq_len, self.head_dim, self.rope_base, x.device)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = rotate(q, cos, sin) * self.q_gain.to(q.dtype).view(1, -1, 1, 1)
        k = rotate(k, cos, sin)
        grouped = self.kv_heads != self.heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-3 SISO mixer on the scan core's `mamba3_siso_scan` (no mamba_ssm dependency).
#
# One projection `in_proj` (dim -> 2 d_inner + 2 N + 3 H + R rows, d_inner = expand * dim, H = d_inner / head_dim
# heads, N = d_state, R = N * rope_fraction / 2 rotary pairs) gives, per token,
#     z (d_inner) | v (d_inner) | B (N) | C (N) | dd_dt (H) | dd_A (H) | trap (H) | angle (R)
# and the mixer computes, per head h:
#     DT = softplus(dd_dt + dt_bias)                    dt_bias: inverse softplus of log-uniform [dt_min, dt_max]
#     A  = -max(softplus(dd_A), A_floor)                input-dependent decay rate, always negative
#     k  = rms_norm(B) * B_norm_weight + B_bias[h]      q likewise from C (one group shared by all heads)
#     theta_t = theta_{t-1} + pi tanh(angle_t) DT_t     data-dependent rotation of the first 2R state dims of q, k
#     lambda = sigmoid(trap)                            trapezoidal mix of the current and the previous input
#     S_t = e^{A DT} S_{t-1} + e^{A DT} DT (1-lambda) v_{t-1} k~_{t-1}^T + lambda DT v_t k~_t^T
#     y_t = S_t q~_t + D_skip[h] v_t,   out = out_proj(y * silu(z))
# The rows dd_dt and dd_A of in_proj (2 H rows) are the dynamics rows: `in_proj.wide_rows` names them so that the
# export can give them a finer grid. `forward_stateful` carries (theta, S, k, v) across windows.
# ---------------------------------------------------------------------------------------------------------------------


def m3mix_dt_bias(n: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """Biases b with softplus(b) log-uniform in [dt_min, dt_max]: b = dt + log(1 - exp(-dt))."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return dt + torch.log(-torch.expm1(-dt))


@register_mixer("mamba3")
class Mamba3Mixer(nn.Module):
    OPTIONS = {
        "d_state": ("MAMBA3_D_STATE", 64),
        "expand": ("MAMBA3_EXPAND", 2),
        "head_dim": ("MAMBA3_HEADDIM", 64),
        "chunk_size": ("MAMBA3_CHUNK_SIZE", 64),
        "rope_fraction": ("MAMBA3_ROPE_FRACTION", 0.5),
        "a_floor": ("MAMBA3_A_FLOOR", 1e-4),
        "dt_min": ("MAMBA3_DT_MIN", 1e-3),
        "dt_max": ("MAMBA3_DT_MAX", 0.1),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        d_state: int = 64,
        expand: int = 2,
        head_dim: int = 64,
        chunk_size: int = 64,
        rope_fraction: float = 0.5,
        a_floor: float = 1e-4,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        d_inner = expand * dim
        if d_inner % head_dim or d_state % 2:
            raise ValueError(f"mamba3: d_inner {d_inner} must be a multiple of MAMBA3_HEADDIM {head_dim}, "
                             f"MAMBA3_D_STATE {d_state} even")  # fmt: skip
        self.d_inner, self.d_state, self.head_dim = d_inner, d_state, head_dim
        self.heads = d_inner // head_dim
        self.angles = max(1, int(d_state * rope_fraction) // 2)
        self.chunk_size, self.a_floor = chunk_size, a_floor
        self.split = (d_inner, d_inner, d_state, d_state, self.heads, self.heads, self.heads, self.angles)
        self.in_proj = linear(dim, sum(self.split))
        first = 2 * d_inner + 2 * d_state
        self.in_proj.wide_rows = (first, first + 2 * self.heads)  # dd_dt then dd_A
        self.out_proj = linear(d_inner, dim)
        self.dt_bias = nn.Parameter(m3mix_dt_bias(self.heads, dt_min, dt_max))
        self.B_bias = nn.Parameter(torch.ones(self.heads, d_state))
        self.C_bias = nn.Parameter(torch.ones(self.heads, d_state))
        self.B_norm_weight = nn.Parameter(torch.ones(d_state))
        self.C_norm_weight = nn.Parameter(torch.ones(d_state))
        self.D_skip = nn.Parameter(torch.ones(self.heads))

    def _scan(self, x: torch.Tensor, state: tuple | None, keep_state: bool):
        batch, seq_len, _ = x.shape
        z, v, b, c, dd_dt, dd_a, trap, angle = torch.split(self.in_proj(x), self.split, dim=-1)
        dt = F.softplus(dd_dt.float() + self.dt_bias.float())
        adt = -torch.clamp(F.softplus(dd_a.float()), min=self.a_floor) * dt
        k = F.rms_norm(b.unsqueeze(2), (self.d_state,), weight=self.B_norm_weight.to(b.dtype))
        q = F.rms_norm(c.unsqueeze(2), (self.d_state,), weight=self.C_norm_weight.to(c.dtype))
        angles = (math.pi * torch.tanh(angle.float())).unsqueeze(2).expand(batch, seq_len, self.heads, self.angles)
        heads = (batch, seq_len, self.heads, self.head_dim)
        out = mamba3_siso_scan(
            v.reshape(heads), dt, adt, trap, q, k, angles, q_bias=self.C_bias, k_bias=self.B_bias,
            D=self.D_skip, z=z.reshape(heads), chunk_size=self.chunk_size, initial_state=state,
            return_final_state=keep_state,
        )  # fmt: skip
        y, new_state = out if keep_state else (out, None)
        return self.out_proj(y.reshape(batch, seq_len, self.d_inner)), new_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._scan(x, None, False)[0]

    def forward_stateful(self, x: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """The window's output and the state (theta, S, k, v) the next window of the same stream starts from."""
        return self._scan(x, state, True)


# ---------------------------------------------------------------------------------------------------------------------
# The stack, built from a ModelConfig: token embedding (plus optional input features), blocks of mixers and MLPs
# with per-branch learned scales, depth recurrence, U-Net skips between the halves, and a tied or separate output
# head with a logit softcap.
#
# Stateful scoring: `logits(ids, states)` carries each mixer's recurrent state across calls where the mixer supports
# it (a `forward_stateful(x, state) -> (y, state)` method); mixers without one see each window on its own.
# ---------------------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """x <- mix(x, x0); then each mixer branch (parallel: on one normed input; serial: one after the other),
    each added with its own per-channel scale; then the MLP, added with its scale."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig, linear: LinearMaker) -> None:
        super().__init__()
        dim = cfg.dim
        self.parallel = spec.parallel
        self.mixers = nn.ModuleList(
            lookup(MIXERS, "mixer", name)(dim, linear, **cfg.mixer_options.get(name, {})) for name in spec.mixers
        )
        self.branch_scales = nn.Parameter(torch.ones(len(spec.mixers), dim))
        self.mlp = None
        if spec.mlp != "none":
            self.mlp = lookup(MLPS, "MLP", spec.mlp)(dim, int(round(cfg.mlp_mult * dim)), linear)
            self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim)))) if cfg.x0_mix else None

    def _mix(self, i: int, h: torch.Tensor, states: dict | None) -> torch.Tensor:
        mixer = self.mixers[i]
        if states is None or not hasattr(mixer, "forward_stateful"):
            return mixer(h)
        y, states[id(mixer)] = mixer.forward_stateful(h, states.get(id(mixer)))
        return y

    def forward(self, x: torch.Tensor, x0: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        if self.resid_mix is not None:
            w = self.resid_mix.to(x.dtype)
            x = w[0] * x + w[1] * x0
        scales = self.branch_scales.to(x.dtype)
        if self.parallel:
            h = rms_norm(x)
            x = x + sum(scales[i] * self._mix(i, h, states) for i in range(len(self.mixers)))
        else:
            for i in range(len(self.mixers)):
                x = x + scales[i] * self._mix(i, rms_norm(x), states)
        if self.mlp is not None:
            x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))
        return x


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.logit_softcap <= 0:
            raise ValueError(f"LOGIT_SOFTCAP must be positive, got {cfg.logit_softcap}")
        if not cfg.layers:
            raise ValueError("the model has no layers: set LAYER_PATTERN and NUM_LAYERS")
        self.cfg = cfg
        linear = LinearMaker(cfg.linear_kind, cfg.ternary_per_row)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.features = nn.ModuleList(
            lookup(FEATURES, "input feature", name)(cfg.vocab_size, cfg.dim, **cfg.feature_options.get(name, {}))
            for name in cfg.features
        )
        self.blocks = nn.ModuleList(Block(spec, cfg, linear) for spec in cfg.layers)
        self.n_encoder = len(cfg.layers) // 2 if cfg.unet_skips else 0
        n_skips = min(self.n_encoder, len(cfg.layers) - self.n_encoder)
        self.skip_weights = nn.Parameter(torch.ones(cfg.loops, n_skips, cfg.dim)) if n_skips else None
        self.loop_pos = nn.Parameter(0.02 * torch.randn(cfg.loops, cfg.dim)) if cfg.loop_embedding else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.dim, cfg.vocab_size, zero_init=True)
        with torch.no_grad():
            self.tok_emb.weight.normal_(0.0, cfg.embed_init_std)
            if cfg.orthogonal_init:
                for m in self.modules():
                    if isinstance(m, CastedLinear) and not m.zero_init and min(m.weight.shape) >= 16:
                        nn.init.orthogonal_(m.weight)

    def embed(self, ids: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        x = self.tok_emb(ids)
        for f in self.features:  # a feature that looks back gets the previous window's tokens when scoring with state
            if states is None or not hasattr(f, "forward_stateful"):
                x = x + f(ids)
                continue
            out, states[id(f)] = f.forward_stateful(ids, states.get(id(f)))
            x = x + out
        x = rms_norm(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def hidden(self, ids: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        x = x0 = self.embed(ids, states)
        for loop in range(self.cfg.loops):
            if self.loop_pos is not None:
                x = x + self.loop_pos[loop].to(x.dtype)
            skips = []
            for depth, block in enumerate(self.blocks):
                if depth >= self.n_encoder and skips:
                    x = x + self.skip_weights[loop, depth - self.n_encoder].to(x.dtype) * skips.pop()
                x = block(x, x0, states)
                if depth < self.n_encoder:
                    skips.append(x)
        return rms_norm(x)

    def logits(self, ids: torch.Tensor, states: dict | None = None) -> torch.Tensor:
        x = self.hidden(ids, states)
        raw = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(raw.float() / cap)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Mean training loss, or (reduction="none") the per-token losses shaped like `targets`."""
        logits = self.logits(ids)
        flat = logits.view(-1, logits.size(-1))
        losses = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
        if reduction == "none":
            return losses.view(targets.shape)
        loss = losses.mean()
        if self.cfg.z_loss > 0 and self.training:
            loss = loss + self.cfg.z_loss * torch.logsumexp(flat, dim=-1).square().mean()
        return loss


# ---------------------------------------------------------------------------------------------------------------------
# Optimisers and schedules: Muon for the blocks' matrices, Adam for everything else, which tensor goes where
# decided by the declaration (control-tensor name patterns); the wall-clock warmdown; an EMA of the weights.
# ---------------------------------------------------------------------------------------------------------------------

# quintic Newton-Schulz coefficients: x <- a x + (b G + c G^2) x with G = x x^T
NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


def orthogonalize(g: Tensor, steps: int) -> Tensor:
    """Approximate U V^T of each matrix in a stack [n, rows, cols] (g = U S V^T), iterated in bf16."""
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = NS_A * x + (NS_B * gram + NS_C * (gram @ gram)) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov), orthogonalised, scaled by sqrt(max(1, rows / cols)); decoupled weight decay.

    Matrices of one shape are stacked and orthogonalised as a batch. With several ranks each rank orthogonalises
    an equal slice of every stack and an all-gather hands every rank the whole stack. Gradients must already be
    averaged across ranks (DDP does this).
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        momentum: float,
        steps: int,
        weight_decay: float = 0.0,
        row_norm: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, steps=steps, weight_decay=weight_decay, row_norm=row_norm)
        super().__init__(params, defaults)
        self.orthogonalize = orthogonalize

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 (torch's signature)
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if ranks > 1 else 0
        for group in self.param_groups:
            stacks: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    stacks[tuple(p.shape)].append(p)
            for shape, params in stacks.items():
                state = self.state[params[0]]
                grads = torch.stack([p.grad for p in params])
                if "stack_momentum" not in state:
                    state["stack_momentum"] = torch.zeros_like(grads)
                velocity = state["stack_momentum"]
                velocity.mul_(group["momentum"]).add_(grads)
                direction = grads.add(velocity, alpha=group["momentum"])
                if group["row_norm"]:
                    direction = direction / (direction.norm(dim=-1, keepdim=True) + 1e-7)
                share = math.ceil(len(params) / ranks)
                if ranks > 1:
                    pad = share * ranks - len(params)
                    if pad:
                        direction = torch.cat((direction, direction.new_zeros(pad, *shape)))
                    mine = self.orthogonalize(direction[rank * share : (rank + 1) * share], group["steps"])
                    update = mine.new_empty(share * ranks, *shape)
                    dist.all_gather_into_tensor(update, mine.contiguous())
                else:
                    update = self.orthogonalize(direction, group["steps"])
                gain = max(1.0, shape[0] / shape[1]) ** 0.5
                for i, p in enumerate(params):
                    if group["weight_decay"]:
                        p.mul_(1.0 - group["lr"] * group["weight_decay"])
                    p.add_(update[i].to(p.dtype), alpha=-group["lr"] * gain)


def split_parameters(model: nn.Module, control_patterns: tuple[str, ...]) -> dict[str, list[Tensor]]:
    """{"muon": block matrices, "embed": embedding tables, "head": untied head, "scalar": the rest}.

    A matrix inside a block or an input feature goes to Muon unless its name contains a control pattern;
    embedding tables (the token embedding and any feature tables) go to the embedding group; vectors,
    convolutions, control tensors and the model's own top-level tensors go to the scalar group.
    """
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} if head is not None else set()
    inside = ("blocks.", "features.")
    groups: dict[str, list[Tensor]] = {"muon": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():
        if id(p) in tables:
            groups["embed"].append(p)
        elif id(p) in head_ids:
            groups["head"].append(p)
        elif p.ndim == 2 and name.startswith(inside) and not any(pattern in name for pattern in control_patterns):
            groups["muon"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def lr_scale(
    step: int,
    elapsed_ms: float,
    iterations: int,
    warmup_steps: int,
    warmdown_iters: int,
    cap_ms: float | None,
) -> float:
    """Learning-rate multiplier: a linear ramp over `warmup_steps`, flat, then a linear warmdown to zero.

    With a wall-clock cap the warmdown spans the last `warmdown_iters` steps' worth of time at the pace so far;
    without one it spans the last `warmdown_iters` of `iterations`.
    """
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if warmdown_iters <= 0:
        return ramp
    if cap_ms is None:
        left = (iterations - step) / warmdown_iters
    else:
        pace_ms = elapsed_ms / max(step, 1)
        left = (cap_ms - elapsed_ms) / max(warmdown_iters * pace_ms, 1e-9)
    return ramp * min(1.0, max(left, 0.0))


def past_cap(elapsed_ms: float, steps: int, cap_ms: float | None, ahead: int = 1) -> bool:
    """Whether `ahead` more steps at the pace so far would end past the wall-clock cap: training stops before it."""
    return cap_ms is not None and elapsed_ms + ahead * elapsed_ms / max(steps, 1) > cap_ms


def momentum_at(step: int, start: float, end: float, ramp_steps: int) -> float:
    """Muon momentum, linear from `start` to `end` over the first `ramp_steps` steps."""
    t = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return start + t * (end - start)


class WeightAverage:
    """An fp32 exponential moving average of the parameters from `start_step` on, bias-corrected like Adam's moments
    (zero start, divided by 1 - decay**n): a short run's average is not pulled toward its first weights."""

    def __init__(self, model: nn.Module, decay: float, start_step: int) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.decay, self.start_step, self.updates = decay, start_step, 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step >= self.start_step:
            self.updates += 1
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_into_model(self) -> str:
        for p, s in zip(self.params, self.shadow) if self.updates else ():  # nothing averaged: the weights stay
            p.copy_(s.div(1.0 - self.decay**self.updates).to(p.dtype))
        return f"ema:applied decay={self.decay} updates={self.updates}"


# ---------------------------------------------------------------------------------------------------------------------
# Quantisers: each turns one float tensor into a few small tensors (`encode`) and back (`decode`), with
# everything `decode` needs stored among them. Registered by name; the export pipeline picks one per tensor.
#
#   float16 / float32   the tensor as it is, in that dtype
#   int8 / int6         per output row (1-D tensors: per tensor) symmetric integers with a clip at a high quantile
#                       of |w|; the row scale never drops below 1/qmax, so rows whose clip is under 1 share the fixed
#                       grid k/qmax, which compresses far better than a grid per row
# (The ternary quantisers are in their own section, present only in the variants with ternary linears.)
# ---------------------------------------------------------------------------------------------------------------------

CLIP_QUANTILE = 0.9999984


class Quantiser(NamedTuple):
    encode: Any  # (tensor, options) -> dict[str, Tensor]
    decode: Any  # dict[str, Tensor] -> float32 tensor


def _as_float(fields: dict[str, Tensor]) -> Tensor:
    return fields["w"].float()


register(QUANTISERS, "float16")(Quantiser(lambda t, opts: {"w": t.detach().to(torch.float16)}, _as_float))


register(QUANTISERS, "float32")(Quantiser(lambda t, opts: {"w": t.detach().to(torch.float32)}, _as_float))


def clip_values(w: Tensor) -> Tensor:
    """|w| at CLIP_QUANTILE, per row of a matrix ([rows, 1]) or of the whole tensor (a scalar)."""
    a = w.abs()
    if w.ndim == 2 and w.size(1) > 1:
        return torch.quantile(a, CLIP_QUANTILE, dim=1, keepdim=True)
    flat = a.flatten()
    if flat.numel() > 1 << 24:  # torch.quantile's input limit: use the k-th value
        k = max(1, int(round(CLIP_QUANTILE * flat.numel())))
        return flat.kthvalue(k).values
    return torch.quantile(flat, CLIP_QUANTILE)


def integer_encode(t: Tensor, qmax: int) -> dict[str, Tensor]:
    w = t.detach().float()
    if w.numel() == 0:
        return {"q": torch.zeros(w.shape, dtype=torch.int8), "scale": torch.ones(1, dtype=torch.float16)}
    clip = clip_values(w)
    scale = torch.maximum(clip / qmax, torch.full_like(clip, 1.0 / qmax)).to(torch.float16)
    bound = clip if w.ndim == 2 else clip.reshape(())
    q = torch.round(w.clamp(-bound, bound) / scale.float()).clamp(-qmax, qmax).to(torch.int8)
    return {"q": q, "scale": scale}


def integer_decode(fields: dict[str, Tensor]) -> Tensor:
    return fields["q"].float() * fields["scale"].float()


register(QUANTISERS, "int8")(Quantiser(lambda t, opts: integer_encode(t, 127), integer_decode))


register(QUANTISERS, "int6")(Quantiser(lambda t, opts: integer_encode(t, 31), integer_decode))


# ---------------------------------------------------------------------------------------------------------------------
# The artifact: a quantiser per tensor, the encoded tensors saved with torch.save, the blob compressed, behind a
# plain header naming format and compressor; the score is always computed on the model read back from the file.
#
# Which quantiser a tensor gets (first rule that applies):
#   QUANT_OVERRIDES "name_substring=quantiser"      e.g. "tok_emb=int8"
#   weights of ternary linears                      QUANT_TERNARY (ternary2 or ternary5)
#   small tensors (<= KEEP_FLOAT_MAX_NUMEL)         float32 if a control tensor, else float16
#   everything else                                 QUANT (int8 or int6)
# ---------------------------------------------------------------------------------------------------------------------

FORMAT = "ssm-golf-artifact/1"
MAGIC = b"SSMG1 "  # then the compressor's name, a newline, the compressed torch.save blob
register(COMPRESSORS, "zlib")((lambda raw: zlib.compress(raw, 9), zlib.decompress))
register(COMPRESSORS, "lzma")((lambda raw: lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME), lzma.decompress))


class ArtifactError(ValueError):
    """An artifact that cannot be written or read back; the message names the file."""


def choose_quantisers(
    model: nn.Module,
    quant: str,
    quant_ternary: str,
    overrides: tuple[str, ...],
    control_patterns: tuple[str, ...],
    keep_float_max_numel: int,
    ternary_lstsq: bool = False,
) -> dict[str, tuple[str, dict]]:
    """{tensor name: (quantiser, options)} for every floating tensor of the model's state dict."""
    ternary = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}
    rules = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"QUANT_OVERRIDES item {item!r} is not name_substring=quantiser")
        rules.append((key, value))
    plan = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        chosen = next((q for key, q in rules if key in name), None)
        if chosen is None and name in ternary:
            chosen = quant_ternary
        if chosen is None and t.numel() <= keep_float_max_numel:
            chosen = "float32" if any(p in name for p in control_patterns) else "float16"
        chosen = chosen or quant
        lookup(QUANTISERS, "quantiser", chosen)
        options = {}
        if chosen.startswith("ternary"):
            if name not in ternary:
                raise ValueError(f"{name}: {chosen} is only for the weights of ternary linears (LINEAR_KIND=ternary)")
            options = {"per_row": ternary[name].per_row, "lstsq": ternary_lstsq}
        plan[name] = (chosen, options)
    return plan


def encode_state(state: dict[str, Tensor], plan: dict[str, tuple[str, dict]]) -> dict:
    """The serialisable container: format tag and, per tensor, its quantiser, dtype and encoded fields."""
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if name not in plan:
            tensors[name] = {"quantiser": "raw", "dtype": str(t.dtype), "fields": {"w": t.clone()}}
            continue
        quantiser, options = plan[name]
        q: Quantiser = lookup(QUANTISERS, "quantiser", quantiser)
        tensors[name] = {"quantiser": quantiser, "dtype": str(t.dtype), "fields": q.encode(t, options)}
    return {"format": FORMAT, "tensors": tensors}


def decode_state(container: dict) -> dict[str, Tensor]:
    if not isinstance(container, dict) or container.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} container")
    out = {}
    for name, entry in container["tensors"].items():
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        if entry["quantiser"] == "raw":
            out[name] = entry["fields"]["w"]
            continue
        q: Quantiser = lookup(QUANTISERS, "quantiser", entry["quantiser"])
        out[name] = q.decode(entry["fields"]).to(dtype)
    return out


def payload_bytes(container: dict) -> int:
    """Bytes of the encoded tensors themselves, before torch.save and compression."""
    fields = (f for entry in container["tensors"].values() for f in entry["fields"].values())
    return sum(t.numel() * t.element_size() for t in fields)


def write_artifact(path: str, container: dict, compressor: str) -> tuple[int, int]:
    """Write the artifact (temporary name, then rename); (bytes of the file, bytes of the torch.save blob)."""
    compress, _ = lookup(COMPRESSORS, "compressor", compressor)
    buf = io.BytesIO()
    torch.save(container, buf)
    raw = buf.getvalue()
    blob = MAGIC + compressor.encode() + b"\n" + compress(raw)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob), len(raw)


def read_artifact(path: str) -> dict[str, Tensor]:
    """The state dict stored in an artifact file; ArtifactError (one line, naming the file) if it cannot be read."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the artifact ({exc.strerror}); pass the file the run wrote") from exc
    header, newline, body = blob.partition(b"\n")
    if not header.startswith(MAGIC) or not newline:
        raise ArtifactError(f"{path}: not an ssm-golf artifact (no {MAGIC.decode().strip()} header); re-export it")
    compressor = header[len(MAGIC) :].decode("ascii", errors="replace")
    if compressor not in COMPRESSORS:
        raise ArtifactError(f"{path}: compressed with {compressor!r}, which this script cannot read")
    _, decompress = COMPRESSORS[compressor]
    try:
        container = torch.load(io.BytesIO(decompress(body)), map_location="cpu", weights_only=True)
        return decode_state(container)
    except Exception as exc:  # any decoding failure means a damaged file
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: damaged or truncated artifact ({reason}); re-export it") from exc


# ---------------------------------------------------------------------------------------------------------------------
# Full-Hessian GPTQ for the integer export, with per-row clip ranges, on calibration text the model writes itself.
#
# For a weight W [rows, cols] fed inputs x (H = sum x x^T over calibration tokens), GPTQ quantises W one input column
# at a time (columns by decreasing H_jj) and pushes each column's rounding error onto the columns not yet quantised,
# weighted by the inverse Hessian, which minimises tr((W - Q) H (W - Q)^T) far better than rounding each weight:
#     q_j = clamp(round(w_j / s), -qmax_r, qmax_r),  e_j = (w_j - s q_j) / U_jj,  w_k -= e_j U_jk  (k after j)
# with U the upper Cholesky factor of H^-1 (H damped by `damp` x mean diag). Columns are handled in blocks, the
# error of a block applied to the rest in one matrix product. Each row r has its own range qmax_r: int6 (31) by
# default, int8 (127) for rows a module names in `wide_rows` (Mamba-3's dt and A rows). The row scale s is the best
# (by rounding error) of a few clip percentiles of |w|, floored at 1/qmax_r as the plain integer quantiser does.
#
# The result is written back into the model (weights on their grid) and into the export plan as the "rows_int"
# quantiser with the scales fixed, so encoding reproduces GPTQ's codes exactly. `selective_prune` then zeroes the
# cheapest +-1 codes (smallest row scale first) until the compressed artifact fits a byte target. Late QAT
# (`enable_late_qat`) makes the large float linears see their weights on that grid for the end of training.
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Scoring the validation split: every target token scored once, summed over ranks into loss and bits per byte.
#
# Two ways to walk the split (EVAL_MODE):
#   windows    non-overlapping windows of EVAL_SEQ_LEN tokens, each seen on its own (upstream's evaluation)
#   stateful   each rank's range cut into EVAL_BATCH_SEQS contiguous streams, each stream scored window after
#              window with the recurrent mixers' states carried over, so most tokens see far more context than
#              one window at the cost of a single pass; windows left over at the end are scored on their own
# ---------------------------------------------------------------------------------------------------------------------


class Tally:
    """Running sums of nats, tokens and bytes (float64), reduced over ranks at the end."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, losses: torch.Tensor, x: torch.Tensor, y: torch.Tensor, tables: tuple) -> None:
        self.sums[0] += losses.double().sum()
        self.sums[1] += y.numel()
        self.sums[2] += target_bytes(x, y, tables).double().sum()

    def result(self, world_size: int) -> tuple[float, float]:
        if world_size > 1:
            dist.all_reduce(self.sums)
        nats, tokens, nbytes = self.sums.tolist()
        loss = nats / tokens
        return loss, loss / math.log(2.0) * tokens / nbytes


def rank_windows(tokens: torch.Tensor, seq_len: int, rank: int, world_size: int) -> tuple[int, int]:
    """[first, last) of the whole windows of `seq_len` targets that this rank scores (contiguous ranges)."""
    n_windows = (tokens.numel() - 1) // seq_len
    return n_windows * rank // world_size, n_windows * (rank + 1) // world_size


def window_batch(
    tokens: torch.Tensor, indices: list[int], seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and shifted targets of the given windows, [len(indices), seq_len] each, moved in one copy."""
    runs = torch.stack([tokens[i * seq_len : (i + 1) * seq_len + 1] for i in indices])
    runs = runs.to(device=device, dtype=torch.int64, non_blocking=True)
    return runs[:, :-1], runs[:, 1:]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seq_len: int,
    batch_seqs: int,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    stateful: bool = False,
    keep_losses: bool = False,
) -> tuple[float, float, torch.Tensor | None]:
    """(loss in nats per token, bits per byte, this rank's per-token losses in token order or None)."""
    first, last = rank_windows(tokens, seq_len, rank, world_size)
    tally = Tally(device)
    kept = torch.zeros(last - first, seq_len) if keep_losses else None
    was_training = model.training
    model.eval()

    def score(indices: list[int], states: dict | None) -> None:
        x, y = window_batch(tokens, indices, seq_len, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if states is None:
                losses = model(x, y, reduction="none").float()
            else:
                logits = core.logits(x, states)
                losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        tally.add(losses, x, y, tables)
        if kept is not None:
            kept[torch.tensor(indices) - first] = losses.cpu()

    core = getattr(model, "_orig_mod", model)  # under torch.compile, the module itself: states are Python objects
    streams = max(1, min(batch_seqs, last - first))
    rest = list(range(first, last))
    if stateful and rest:
        per_stream = len(rest) // streams
        states: dict = {}
        for step in range(per_stream):
            score([first + s * per_stream + step for s in range(streams)], states)
        rest = rest[streams * per_stream :]
    for start in range(0, len(rest), streams):
        score(rest[start : start + streams], None)
    model.train(was_training)
    loss, bpb = tally.result(world_size)
    return loss, bpb, kept.flatten() if kept is not None else None


def gather_token_losses(local: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """Every rank's per-token losses concatenated in rank order (each rank holds a contiguous range)."""
    if world_size == 1:
        return local
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([local.numel()], device=device))
    size = int(max(c.item() for c in counts))
    padded = torch.zeros(size, device=device)
    padded[: local.numel()] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())].cpu() for part, c in zip(parts, counts)])


# ---------------------------------------------------------------------------------------------------------------------
# Legal score-first test-time training: the validation split is walked in chunks of windows, and each chunk is
# first scored (no gradients, the model as it stands) and only then trained on, so no token is ever scored by a model
# that has seen it. Training is plain SGD with momentum on the chunk's mean loss for TTT_EPOCHS passes; the adapted
# weights carry on to the next chunk. Each rank walks its own contiguous share with its own copy of the adaptation
# (no gradient exchange), so the rule holds per rank; the sums of nats, tokens and bytes are reduced at the end.
# The model is changed in place: score a copy if the original is needed afterwards.
# ---------------------------------------------------------------------------------------------------------------------


def ttt_evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    seq_len: int,
    chunk_seqs: int,
    epochs: int,
    lr: float,
    momentum: float,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    keep_losses: bool = False,
) -> tuple[float, float, torch.Tensor | None]:
    """(loss in nats per token, bits per byte, this rank's per-token losses in token order or None)."""
    first, last = rank_windows(tokens, seq_len, rank, world_size)
    tally = Tally(device)
    kept = torch.zeros(last - first, seq_len) if keep_losses else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    was_training = model.training

    for start in range(first, last, chunk_seqs):
        stop = min(start + chunk_seqs, last)
        x, y = window_batch(tokens, list(range(start, stop)), seq_len, device)
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            losses = model(x, y, reduction="none").float()
        tally.add(losses, x, y, tables)
        if kept is not None:
            kept[start - first : stop - first] = losses.cpu()
        if stop == last:
            break  # nothing left to score with what this chunk would teach
        model.train()
        for _ in range(epochs):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    model.train(was_training)
    loss, bpb = tally.result(world_size)
    return loss, bpb, kept.flatten() if kept is not None else None


@register(STAGES, "ttt")
def ttt_stage(model: nn.Module, tokens: torch.Tensor, tables: tuple, seq_len: int, chunk_seqs: int, rank: int,
              world_size: int, device: torch.device, autocast_dtype: torch.dtype | None, stateful: bool = False,
              keep_losses: bool = False) -> tuple[float, float, torch.Tensor | None]:  # fmt: skip
    """EVAL_MODE=ttt, called like `evaluate` (`stateful` unused): `ttt_evaluate` with TTT_EPOCHS (2), TTT_LR (0.01)
    and TTT_MOMENTUM (0.9) from the environment."""
    epochs, lr, momentum = env_int("TTT_EPOCHS", 2), env_float("TTT_LR", 0.01), env_float("TTT_MOMENTUM", 0.9)
    return ttt_evaluate(model, tokens, tables, seq_len, chunk_seqs, epochs, lr, momentum, rank, world_size, device,
                        autocast_dtype, keep_losses)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Training and scoring, top to bottom: set up ranks and logging, read the data, build the model from its
# declaration, train under the wall-clock cap, write the artifact, read it back and score it.
#
#   torchrun --standalone --nproc_per_node=8 train_gpt.py     CUDA; the rank count must divide 8
#   python train_gpt.py                                       one process (CPU works, with tiny settings)
#   EVAL_ONLY=1 ARTIFACT=final_model.int8.ptz python train_gpt.py     score an artifact, no training
#   TOKEN_LOSSES=losses.npz                                   also save the scored tokens and each one's loss
# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    hp = Hyperparameters()
    started_at = time.perf_counter()  # start-up, compilation and export times are logged against this
    cfg = model_config_from_env()
    code = Path(__file__).read_bytes()

    # ----- ranks, device, logging -----
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    distributed = "RANK" in os.environ and world_size > 1
    if 8 % world_size:
        raise SystemExit(f"WORLD_SIZE={world_size}: the rank count must divide 8")
    accum_steps = hp.grad_accum_steps or 8 // world_size
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    master = rank == 0
    amp_dtype = torch.bfloat16 if cuda else None
    compiled = hp.compile and cuda

    log_file = Path("logs") / f"{hp.run_id}.txt"
    if master:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(code.decode("utf-8", errors="replace") + "\n" + "=" * 100 + "\n", encoding="utf-8")

    def log(line: str, console: bool = True) -> None:
        if master:
            if console:
                print(line, flush=True)
            with log_file.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    wait_for_device = torch.cuda.synchronize if cuda else lambda: None

    log(f"Running Python {sys.version} PyTorch {torch.__version__}", console=False)
    if cuda:
        log(f"device:{torch.cuda.get_device_name(device)} count:{torch.cuda.device_count()}", console=False)
    log("Hyperparameters:")
    for name, value in sorted(vars(hp).items()):
        log(f"  {name}: {value}")
    log(f"model: {cfg}")
    log(f"seed:{hp.seed}")
    log(f"world_size:{world_size} grad_accum_steps:{accum_steps}")
    torch.manual_seed(hp.seed)  # the only generator the run draws from

    # ----- data: every shard checked before anything else -----
    try:
        train_files = [] if hp.eval_only else find_shards(hp.data_path, "train")
        val_files = find_shards(hp.data_path, "val")
    except ShardError as exc:
        raise SystemExit(f"error: {exc}") from None
    sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    if sp.get_piece_size() != cfg.vocab_size:
        raise SystemExit(f"{hp.tokenizer_path}: {sp.get_piece_size()} pieces, but VOCAB_SIZE={cfg.vocab_size}")
    tables = build_byte_tables(sp, cfg.vocab_size, device)
    eval_seq_len = hp.eval_seq_len or hp.train_seq_len
    if hp.eval_mode not in ("windows", "stateful") + (("ttt",) if "ttt" in STAGES else ()):
        raise SystemExit(f"EVAL_MODE={hp.eval_mode!r}: choose windows or stateful (ttt: a variant with the TTT module)")
    eval_batch_seqs = hp.eval_batch_seqs or max(1, hp.val_batch_size // (world_size * eval_seq_len))
    val_tokens = load_validation_tokens(val_files, eval_seq_len, hp.val_tokens)
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    log(f"val_loader:shards pattern={hp.data_path}/fineweb_val_*.bin tokens:{val_tokens.numel() - 1}")

    def validate(net: torch.nn.Module, keep: bool = False, score=evaluate) -> tuple[float, float, torch.Tensor | None]:
        return score(
            net, val_tokens, tables, eval_seq_len, eval_batch_seqs, rank, world_size, device, amp_dtype,
            stateful=hp.eval_mode == "stateful", keep_losses=keep,
        )  # fmt: skip

    # ----- model -----
    base = LanguageModel(cfg).to(device)
    log(f"model_params:{sum(p.numel() for p in base.parameters())}")
    if compiled and hp.compile_scope == "blocks":  # one block graph reused by every block: deep stacks compile fast
        for block in base.blocks:
            block.compile(dynamic=False, fullgraph=hp.compile_fullgraph, mode=hp.compile_mode)
    whole = compiled and hp.compile_scope == "model"
    model = torch.compile(base, dynamic=False, fullgraph=hp.compile_fullgraph, mode=hp.compile_mode) if whole else base

    steps, train_ms, pre_quant_bpb = 0, 0.0, None
    artifact = Path(hp.artifact if hp.eval_only else hp.artifact_name)
    if hp.eval_only:
        if not artifact.is_file():
            raise SystemExit(f"EVAL_ONLY=1 needs ARTIFACT=<file> of an existing artifact, got {str(artifact)!r}")
        log(f"eval_only: scoring {artifact.name} without training")
    else:
        # ----- optimisers: who goes where is the declaration's control patterns -----
        groups = split_parameters(base, hp.control_patterns)
        adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=cuda)
        embed_lr = hp.tied_embed_lr if cfg.tie_embeddings else hp.embed_lr
        muon = Muon(
            groups["muon"], hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_weight_decay,
            hp.muon_row_norm,
        )  # fmt: skip
        optimizers: list[torch.optim.Optimizer] = [muon]
        for key, lr in (("embed", embed_lr), ("scalar", hp.scalar_lr), ("head", hp.head_lr)):
            if groups[key]:
                optimizers.append(torch.optim.Adam([{"params": groups[key], "lr": lr}], **adam))
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        muon.orthogonalize = torch.compile(muon.orthogonalize) if compiled else muon.orthogonalize
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None) if distributed else model
        graph_grads = compiled and accum_steps > 1 and hp.compile_mode in ("reduce-overhead", "max-autotune")

        def step_once(loader: BatchLoader, scale: float, momentum: float) -> torch.Tensor:
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum_steps):
                if distributed:
                    ddp.require_backward_grad_sync = micro == accum_steps - 1
                x, y = loader.next(hp.train_batch_tokens, hp.train_seq_len, accum_steps)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = ddp(x, y)
                (loss / accum_steps).backward()
                if micro == 0 and graph_grads:  # .grad is the backward graph's output, which the next replay overwrites
                    for param in base.parameters():
                        param.grad = None if param.grad is None else param.grad.clone()
                loss_sum += loss.detach()
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * scale
            for group in muon.param_groups:
                group["momentum"] = momentum
            if hp.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(base.parameters(), hp.grad_clip_norm)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss_sum / accum_steps

        # ----- compile warm-up on real batches, then back to the initial weights and optimiser state -----
        log(f"train_loader:dataset:{Path(hp.data_path).name} train_shards:{len(train_files)}")
        if hp.warmup_steps > 0:
            saved = copy.deepcopy((base.state_dict(), [opt.state_dict() for opt in optimizers]))
            warm_loader = BatchLoader(train_files, rank, world_size, device)
            for i in range(1, hp.warmup_steps + 1):
                step_once(warm_loader, 1.0, hp.muon_momentum_warmup_start)
                if i % 10 == 0 or i == hp.warmup_steps:
                    log(f"warmup_step:{i}/{hp.warmup_steps} since_start:{time.perf_counter() - started_at:.0f}s")
            base.load_state_dict(saved[0])
            for opt, state in zip(optimizers, saved[1]):
                opt.load_state_dict(state)
            del saved, warm_loader

        # ----- training under the wall-clock cap -----
        loader = BatchLoader(train_files, rank, world_size, device)
        average = WeightAverage(base, hp.ema_decay, hp.ema_start_step) if hp.ema_decay > 0 else None
        reserve_s = STAGES.get("reserve_s", lambda: 0.0)()  # time kept for GPTQ at export
        cap_ms = 1000.0 * (hp.max_wallclock_seconds - reserve_s) if hp.max_wallclock_seconds > 0 else None
        stop_at = hp.iterations
        log("phase:train begin")
        wait_for_device()
        started = time.perf_counter()
        while True:
            final = steps >= stop_at
            if final or (hp.val_loss_every > 0 and steps > 0 and steps % hp.val_loss_every == 0):
                wait_for_device()
                train_ms += 1000.0 * (time.perf_counter() - started)
                if final and average is not None:  # the final score (before quantisation) is the averaged model's
                    log(average.copy_into_model())
                log("phase:val begin")  # validation is not training time; the sandbox's clock pauses too
                val_loss, pre_quant_bpb, _ = validate(model)
                log(
                    f"step:{steps}/{hp.iterations} val_loss:{val_loss:.4f} val_bpb:{pre_quant_bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(steps, 1):.2f}ms"
                )
                log("phase:val end")
                wait_for_device()
                started = time.perf_counter()
            if final:
                if stop_at < hp.iterations:
                    log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{steps}/{hp.iterations}")
                break
            elapsed = train_ms + 1000.0 * (time.perf_counter() - started)
            scale = lr_scale(steps, elapsed, hp.iterations, hp.lr_warmup_steps, hp.warmdown_iters, cap_ms)
            for name, stage in STAGES.items():  # per-step stages of the variant's parts (ternary ramp, late QAT)
                if name.startswith("step:"):
                    stage(base, hp, scale, elapsed, cap_ms, log)
            momentum = momentum_at(
                steps, hp.muon_momentum_warmup_start, hp.muon_momentum, hp.muon_momentum_warmup_steps
            )
            train_loss = step_once(loader, scale, momentum)
            steps += 1
            if average is not None:
                average.update(steps)
            elapsed = train_ms + 1000.0 * (time.perf_counter() - started)
            if hp.train_log_every > 0 and (steps <= 10 or steps % hp.train_log_every == 0):
                log(
                    f"step:{steps}/{hp.iterations} train_loss:{train_loss.item():.4f} "
                    f"train_time:{elapsed:.0f}ms step_avg:{elapsed / steps:.2f}ms"
                )
            if past_cap(elapsed, steps, cap_ms, ahead=2):  # within two steps of the cap: the device's clock
                wait_for_device()
                elapsed = train_ms + 1000.0 * (time.perf_counter() - started)
            out_of_time = past_cap(elapsed, steps, cap_ms)
            if distributed and cap_ms is not None:
                flag = torch.tensor(float(out_of_time), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = flag.item() > 0
            if out_of_time and stop_at == hp.iterations:
                stop_at = steps
        log("phase:train end")
        if cuda:
            log(
                f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB"
            )

        # ----- the artifact: quantise, compress, write -----
        log("phase:serialize begin")
        if master:
            plan = choose_quantisers(
                base, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, hp.keep_float_max_numel,
                hp.ternary_lstsq,
            )  # fmt: skip
            state = base.state_dict()
            raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
            export = STAGES.get("export", lambda net, p, *_: encode_state(state, p))  # GPTQ, pruning
            container = export(base, plan, len(code), hp, amp_dtype, log)
            file_bytes, torch_bytes = write_artifact(str(artifact), container, hp.compressor)
            payload = payload_bytes(container)
            used = {q for q, _ in plan.values()} - {"float16", "float32"}
            label = "+".join(sorted(used | {hp.quant}) + [hp.compressor])
            log(f"Serialized model: {raw_bytes} bytes")
            log(f"Code size: {len(code)} bytes")
            log(f"Total submission size: {raw_bytes + len(code)} bytes")
            log(
                f"Serialized model {label}: {file_bytes} bytes "
                f"(payload:{payload} raw_torch:{torch_bytes} payload_ratio:{raw_bytes / max(payload, 1):.2f}x "
                f"since_start:{time.perf_counter() - started_at:.0f}s)"
            )
            log(f"Total submission size {label}: {file_bytes + len(code)} bytes")
        if distributed:
            dist.barrier()
        log("phase:serialize end")

    # ----- score the model read back from the artifact -----
    model_bytes = artifact.stat().st_size
    if hp.eval_only:
        label = f"{hp.quant}+{hp.compressor}"
        log(f"Serialized model {label}: {model_bytes} bytes")
        log(f"Code size: {len(code)} bytes")
        log(f"Total submission size {label}: {model_bytes + len(code)} bytes")
    log("phase:eval begin")
    wait_for_device()
    eval_started = time.perf_counter()
    try:
        base.load_state_dict(read_artifact(str(artifact)), strict=True)
    except (ArtifactError, RuntimeError) as exc:
        raise SystemExit(f"error: {str(exc).splitlines()[0]}") from None
    final_score = STAGES["ttt"] if hp.eval_mode == "ttt" else evaluate
    val_loss, val_bpb, token_losses = validate(model, keep=bool(hp.token_losses), score=final_score)
    wait_for_device()
    eval_ms = 1000.0 * (time.perf_counter() - eval_started)
    log(f"{hp.score_tag} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{eval_ms:.0f}ms")
    log(f"{hp.score_tag}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    log("phase:eval end")
    if hp.token_losses:
        losses = gather_token_losses(token_losses, world_size, device)
        if master:
            target = Path(hp.token_losses)
            tmp = target.with_name(target.name + ".tmp.npz")
            scored = val_tokens[: losses.numel() + 1].numpy().astype(np.int32)
            np.savez(tmp, tokens=scored, losses=losses.numpy().astype(np.float32))
            os.replace(tmp, target)
            log(f"token_losses: {losses.numel()} written to {target.name}")

    summary = dict(
        seed=hp.seed, world_size=world_size, steps=steps, train_time_ms=round(train_ms, 1),
        eval_time_ms=round(eval_ms, 1), val_loss=val_loss, val_bpb=val_bpb, pre_quant_val_bpb=pre_quant_bpb,
        bytes_model=model_bytes, bytes_code=len(code), bytes_total=model_bytes + len(code), artifact=artifact.name,
        artifact_sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(), score_tag=f"{hp.score_tag}_exact",
        eval_only=hp.eval_only, torch=torch.__version__,
    )  # fmt: skip
    log("result_json " + json.dumps(summary, sort_keys=True))
    if distributed:
        dist.barrier()  # leave together: a rank torn down early once aborted its peer's teardown (gloo, in a rerun)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
