"""train_gpt.py: the kill-mamba2 variant with the record recipe (600 s on 8 GPUs), assembled by ssm-golf. Origin:
openai/parameter-golf#1994.

7 unique blocks x 3 loops of attention in parallel with a time-invariant Mamba-2 (per-head EMAs), SwiGLU 8x,
BitNet-b1.58 ternary body, 2-bit packed + brotli.

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

import brotli
import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters: every knob is an environment variable (upstream's names where upstream has one).
#
# The variant's defaults sit in VARIANT_DEFAULTS (written by `builder assemble`); the environment at run time wins.
# ---------------------------------------------------------------------------------------------------------------------

VARIANT_DEFAULTS: dict[str, str] = {
    "ARTIFACT_NAME": "final_model.ternary.ptz",
    "COMPRESSOR": "brotli",
    "CONTROL_TENSOR_NAME_PATTERNS": "branch_scales,mlp_scale,resid_mix,q_gain,A_log,D_skip,dt_bias,conv_,B_const,C_const",
    "DEAD_ROWS": "1",
    "EMA_DECAY": "0.999",
    "EMA_START_STEP": "30",
    "EVAL_MODE": "windows",
    "GRAD_ACCUM_STEPS": "2",
    "GRAD_CLIP_NORM": "0",
    "LAYER_PATTERN": "attention|lti_mamba2:swiglu",
    "LINEAR_KIND": "ternary",
    "LR_WARMUP_STEPS": "30",
    "LTI_SCAN_METHOD": "toeplitz",
    "MATRIX_LR": "0.045",
    "MAX_WALLCLOCK_SECONDS": "600",
    "MLP_KIND": "swiglu",
    "MLP_MULT": "8",
    "MODEL_DIM": "512",
    "MUON_BACKEND_STEPS": "15",
    "MUON_MOMENTUM": "0.95",
    "MUON_MOMENTUM_WARMUP_START": "0.85",
    "MUON_MOMENTUM_WARMUP_STEPS": "500",
    "NUM_HEADS": "8",
    "NUM_KV_HEADS": "4",
    "NUM_LAYERS": "7",
    "NUM_LOOPS": "3",
    "QK_GAIN_INIT": "1.5",
    "QUANT": "int8",
    "QUANT_TERNARY": "ternary2",
    "SCALAR_LR": "0.04",
    "SCORE_TAG": "final_ternary_brotli_roundtrip",
    "SSM_CONV": "4",
    "SSM_EXPAND": "2",
    "SSM_HEAD_DIM": "64",
    "SSM_STATE": "64",
    "TERNARY_PER_ROW": "0",
    "TIED_EMBED_INIT_STD": "0.05",
    "TIED_EMBED_LR": "0.05",
    "TRAIN_BATCH_TOKENS": "524288",
    "TRAIN_SEQ_LEN": "1024",
    "UNET_SKIPS": "0",
    "VAL_LOSS_EVERY": "0",
    "WARMDOWN_ITERS": "890",
    "WARMUP_STEPS": "20",
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
# LTI scan h_t = a * h_{t-1} + x_t with one constant decay per head, on tensor cores: the Toeplitz form.
#
# Inside a chunk of BT steps, h = x L + a^(i+1) h_prev with L[j, i] = a^(i-j) for i >= j, one BT x BT matrix shared
# by every channel of the head, so the recurrence becomes a small matrix product per chunk and only the carry h
# crosses chunks. One program walks the chunks of (one sequence, BP channels) in order with the carry in registers,
# so each element is read and written once. Tiles are (channels x steps): the channels are the product's rows (M 64:
# one sm_90 MMA of one warpgroup), the steps its columns, and L, loop-invariant, is the product's second operand, kept
# in shared memory. A row of the product lies within one warp, so the next carry, one column of h (the chunk's last),
# is a sum across a few lanes of a warp: no second product, no shared memory and no barrier on the chunk-to-chunk
# path. The backward is the same with L transposed, walking the chunks in reverse; it also gives d h_0 = a lambda_1
# and d log_a = a sum lambda_t h_{t-1} as one partial sum per program (a small [heads, programs] buffer summed after
# it, in a fixed order: deterministic). The kernels read the decays as log_a per head, so nothing but that sum runs
# around them. bf16 inputs multiply by L split into two bf16 halves (hi + lo), keeping about 16 bits of L; fp32
# inputs use tf32x3 dots; the interpreter uses plain fp32 dots.
# Chosen through `lti_scan(..., config={"method": "toeplitz"})` in templates/scan/first_order.py.
# ---------------------------------------------------------------------------------------------------------------------


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


def scan_config_str(config: dict | None) -> str:
    """A config dict of ints and strings as the op's string argument (traceable: only constants are formatted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) if config else ""


def scan_config_dict(text: str) -> dict:
    """The inverse of `scan_config_str`: integers back as int, anything else as str."""
    out: dict = {}
    for item in text.split(","):
        if item:
            key, value = item.split("=", 1)
            out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


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
# First-order diagonal linear recurrence h_t = a_t * h_{t-1} + b_t over (batch, time, channels) in Triton.
#
# Real decays, complex decays (LRU, as pairs of reals) and constant-in-time decays (LTI) share one design: a program
# owns (one sequence, BD channels) and walks time in tiles of BT steps, scanning each tile with
# `tl.associative_scan` and carrying the state across tiles in fp32 registers. The backward is the same kernel run
# in reverse time with the decays shifted by one step (adjoint lambda_t = g_t + conj(a_{t+1}) lambda_{t+1}), which
# also yields d a_t = lambda_t * conj(h_{t-1}) and d h_0 = conj(a_1) lambda_1. Every op has a sequential PyTorch
# reference (`*_ref`, float64-capable) used on machines without CUDA.
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _fo_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _fo_ccombine(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    ar = ar2 * ar1 - ai2 * ai1
    ai = ar2 * ai1 + ai2 * ar1
    br = ar2 * br1 - ai2 * bi1 + br2
    bi = ar2 * bi1 + ai2 * br1 + bi2
    return ar, ai, br, bi


@triton.jit
def _fo_scan_kernel(
    a_ptr,
    b_ptr,
    c0_ptr,
    out_ptr,
    fin_ptr,
    hp_ptr,
    h0_ptr,
    da_ptr,
    T,
    D,
    REVERSE: tl.constexpr,
    CONST_A: tl.constexpr,
    HAS_C0: tl.constexpr,
    STORE_FIN: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_H0: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """One (sequence, channel block): forward h = scan(a, b), or (REVERSE) the adjoint scan with a shifted by one.

    Forward: c0 = h_0, out = h, fin = h_T. Reverse: b = dL/dh, c0 = dL/dh_T, out = lambda (= dL/db),
    fin = dL/dh_0, and with HAS_DA: da = lambda * h_{t-1} (hp = forward h, h0 = forward h_0), summed over time
    per (sequence, channel) when CONST_A.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    mask_d = cols < D
    base = pid_b * T * D
    cols2 = cols[None, :]
    if CONST_A:
        a_vec = tl.load(a_ptr + cols, mask=mask_d, other=1.0).to(tl.float32)
    if HAS_C0:
        carry = tl.load(c0_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BD], dtype=tl.float32)
    if HAS_DA:
        if HAS_H0:
            h0v = tl.load(h0_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        if CONST_A:
            da_acc = tl.zeros([BD], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BT)
    for k in range(0, n_tiles):
        if REVERSE:
            t = T - 1 - (k * BT + rows)
            mask_t = t >= 0
            ta = t + 1
        else:
            t = k * BT + rows
            mask_t = t < T
            ta = t
        mask_a = mask_t & (ta < T)
        m2 = mask_t[:, None] & mask_d[None, :]
        off = base + t.to(tl.int64)[:, None] * D + cols2
        if CONST_A:
            a = tl.where(mask_a[:, None] & mask_d[None, :], a_vec[None, :], 1.0)
        else:
            off_a = base + ta.to(tl.int64)[:, None] * D + cols2
            a = tl.load(a_ptr + off_a, mask=mask_a[:, None] & mask_d[None, :], other=1.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=m2, other=0.0).to(tl.float32)
        acc_a, acc_b = tl.associative_scan((a, b), 0, _fo_combine)
        h = acc_b + acc_a * carry[None, :]
        tl.store(out_ptr + off, h.to(out_ptr.dtype.element_ty), mask=m2)
        carry = tl.sum(tl.where(rows[:, None] == BT - 1, h, 0.0), axis=0)
        if HAS_DA:
            hp = tl.load(hp_ptr + off - D, mask=m2 & (t >= 1)[:, None], other=0.0).to(tl.float32)
            if HAS_H0:
                hp += tl.where((t == 0)[:, None], h0v[None, :], 0.0)
            da = h * hp
            if CONST_A:
                da_acc += tl.sum(tl.where(m2, da, 0.0), axis=0)
            else:
                tl.store(da_ptr + off, da.to(da_ptr.dtype.element_ty), mask=m2)
    if HAS_DA:
        if CONST_A:
            tl.store(da_ptr + pid_b * D + cols, da_acc, mask=mask_d)
    if STORE_FIN:
        if REVERSE:
            if CONST_A:
                a0 = a_vec
            else:
                a0 = tl.load(a_ptr + base + cols, mask=mask_d, other=0.0).to(tl.float32)
            carry = carry * a0
        tl.store(fin_ptr + pid_b * D + cols, carry, mask=mask_d)


@triton.jit
def _fo_cscan_kernel(
    ar_ptr,
    ai_ptr,
    br_ptr,
    bi_ptr,
    c0r_ptr,
    c0i_ptr,
    outr_ptr,
    outi_ptr,
    finr_ptr,
    fini_ptr,
    hpr_ptr,
    hpi_ptr,
    h0r_ptr,
    h0i_ptr,
    dar_ptr,
    dai_ptr,
    T,
    D,
    REVERSE: tl.constexpr,
    HAS_C0: tl.constexpr,
    STORE_FIN: tl.constexpr,
    HAS_DA: tl.constexpr,
    HAS_H0: tl.constexpr,
    CONST_A: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """Complex version of `_fo_scan_kernel`; the reverse pass uses conj(a_{t+1}) and da = lambda * conj(h_{t-1}).
    CONST_A: one decay per channel (a (D,)), read once; da is then summed over the sequence in registers and stored
    per (sequence, channel)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rows = tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    mask_d = cols < D
    base = pid_b * T * D
    cols2 = cols[None, :]
    if HAS_C0:
        cr = tl.load(c0r_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        ci = tl.load(c0i_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    else:
        cr = tl.zeros([BD], dtype=tl.float32)
        ci = tl.zeros([BD], dtype=tl.float32)
    if HAS_DA:
        if HAS_H0:
            h0r = tl.load(h0r_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            h0i = tl.load(h0i_ptr + pid_b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
    if CONST_A:
        car = tl.load(ar_ptr + cols, mask=mask_d, other=1.0).to(tl.float32)
        cai = tl.load(ai_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_DA:
            sum_dr = tl.zeros([BD], dtype=tl.float32)
            sum_di = tl.zeros([BD], dtype=tl.float32)
    n_tiles = tl.cdiv(T, BT)
    for k in range(0, n_tiles):
        if REVERSE:
            t = T - 1 - (k * BT + rows)
            mask_t = t >= 0
            ta = t + 1
        else:
            t = k * BT + rows
            mask_t = t < T
            ta = t
        ma = (mask_t & (ta < T))[:, None] & mask_d[None, :]
        m2 = mask_t[:, None] & mask_d[None, :]
        off = base + t.to(tl.int64)[:, None] * D + cols2
        if CONST_A:
            ar = tl.where(ma, car[None, :], 1.0)
            ai = tl.where(ma, cai[None, :], 0.0)
        else:
            off_a = base + ta.to(tl.int64)[:, None] * D + cols2
            ar = tl.load(ar_ptr + off_a, mask=ma, other=1.0).to(tl.float32)
            ai = tl.load(ai_ptr + off_a, mask=ma, other=0.0).to(tl.float32)
        if REVERSE:
            ai = -ai
        br = tl.load(br_ptr + off, mask=m2, other=0.0).to(tl.float32)
        bi = tl.load(bi_ptr + off, mask=m2, other=0.0).to(tl.float32)
        pr, pi, sr, si = tl.associative_scan((ar, ai, br, bi), 0, _fo_ccombine)
        hr = sr + pr * cr[None, :] - pi * ci[None, :]
        hi = si + pr * ci[None, :] + pi * cr[None, :]
        tl.store(outr_ptr + off, hr.to(outr_ptr.dtype.element_ty), mask=m2)
        tl.store(outi_ptr + off, hi.to(outi_ptr.dtype.element_ty), mask=m2)
        last = rows[:, None] == BT - 1
        cr = tl.sum(tl.where(last, hr, 0.0), axis=0)
        ci = tl.sum(tl.where(last, hi, 0.0), axis=0)
        if HAS_DA:
            mp = m2 & (t >= 1)[:, None]
            hpr = tl.load(hpr_ptr + off - D, mask=mp, other=0.0).to(tl.float32)
            hpi = tl.load(hpi_ptr + off - D, mask=mp, other=0.0).to(tl.float32)
            if HAS_H0:
                first = (t == 0)[:, None]
                hpr += tl.where(first, h0r[None, :], 0.0)
                hpi += tl.where(first, h0i[None, :], 0.0)
            if CONST_A:
                sum_dr += tl.sum(tl.where(m2, hr * hpr + hi * hpi, 0.0), axis=0)
                sum_di += tl.sum(tl.where(m2, hi * hpr - hr * hpi, 0.0), axis=0)
            else:
                tl.store(dar_ptr + off, (hr * hpr + hi * hpi).to(dar_ptr.dtype.element_ty), mask=m2)
                tl.store(dai_ptr + off, (hi * hpr - hr * hpi).to(dai_ptr.dtype.element_ty), mask=m2)
    if CONST_A and HAS_DA:
        tl.store(dar_ptr + pid_b * D + cols, sum_dr, mask=mask_d)
        tl.store(dai_ptr + pid_b * D + cols, sum_di, mask=mask_d)
    if STORE_FIN:
        if REVERSE:
            if CONST_A:
                a0r, a0i = car, -cai
            else:
                a0r = tl.load(ar_ptr + base + cols, mask=mask_d, other=0.0).to(tl.float32)
                a0i = -tl.load(ai_ptr + base + cols, mask=mask_d, other=0.0).to(tl.float32)
            cr, ci = a0r * cr - a0i * ci, a0r * ci + a0i * cr
        tl.store(finr_ptr + pid_b * D + cols, cr, mask=mask_d)
        tl.store(fini_ptr + pid_b * D + cols, ci, mask=mask_d)


def _fo_use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; the PyTorch reference otherwise."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _fo_config(D: int, config: dict | None) -> dict:
    """Block sizes: a program owns BD channels of one sequence and scans BT time steps per tile."""
    cfg = {"BT": 64, "BD": min(64, triton.next_power_of_2(D)), "num_warps": 4}
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg.update(BT=16, BD=min(16, triton.next_power_of_2(D)))
    if config:
        cfg.update(config)
    return cfg


def _fo_check(name: str, x: torch.Tensor, shape: tuple) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def _fo_launch(
    a: torch.Tensor,
    b: torch.Tensor,
    c0: torch.Tensor | None,
    reverse: bool,
    const_a: bool,
    cfg: dict,
    out_dtype: torch.dtype,
    want_fin: bool,
    hp: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
) -> tuple:
    """Run `_fo_scan_kernel` once; returns (out, fin or None, da or None)."""
    B, T, D = b.shape
    out = torch.empty((B, T, D), device=b.device, dtype=out_dtype)
    fin = torch.empty((B, D), device=b.device, dtype=torch.float32) if want_fin else out
    da = None
    if hp is not None:
        da = torch.empty((B, D) if const_a else (B, T, D), device=b.device, dtype=torch.float32 if const_a else a.dtype)
    grid = (B, triton.cdiv(D, cfg["BD"]))
    _fo_scan_kernel[grid](
        a,
        b,
        c0 if c0 is not None else b,
        out,
        fin,
        hp if hp is not None else b,
        h0 if h0 is not None else b,
        da if da is not None else b,
        T,
        D,
        REVERSE=reverse,
        CONST_A=const_a,
        HAS_C0=c0 is not None,
        STORE_FIN=want_fin,
        HAS_DA=hp is not None,
        HAS_H0=h0 is not None,
        BT=cfg["BT"],
        BD=cfg["BD"],
        num_warps=cfg["num_warps"],
    )
    return out, (fin if want_fin else None), da


def first_order_scan_ref(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, return_final_state: bool = False
):
    """Sequential reference of h_t = a_t * h_{t-1} + b_t; computes in float32 (float64 if given), returns b's dtype."""
    cdt = torch.float64 if b.dtype == torch.float64 else torch.float32
    h = torch.zeros_like(b[:, 0], dtype=cdt) if h0 is None else h0.to(cdt)
    outs = []
    for t in range(b.shape[1]):
        h = a[:, t].to(cdt) * h + b[:, t].to(cdt)
        outs.append(h)
    hs = torch.stack(outs, 1).to(b.dtype)
    return (hs, h.float() if cdt != torch.float64 else h) if return_final_state else hs


def first_order_scan_complex_ref(a_re, a_im, b_re, b_im, h0=None, return_final_state=False):
    """Sequential reference of the complex recurrence, as pairs of reals (h0 given as a (re, im) pair)."""
    cdt = torch.float64 if b_re.dtype == torch.float64 else torch.float32
    if h0 is None:
        hr = torch.zeros_like(b_re[:, 0], dtype=cdt)
        hi = torch.zeros_like(hr)
    else:
        hr, hi = h0[0].to(cdt), h0[1].to(cdt)
    out_r, out_i = [], []
    for t in range(b_re.shape[1]):
        pr, pi = (a_re, a_im) if a_re.dim() == 1 else (a_re[:, t], a_im[:, t])
        pr, pi = pr.to(cdt), pi.to(cdt)
        hr, hi = pr * hr - pi * hi + b_re[:, t].to(cdt), pr * hi + pi * hr + b_im[:, t].to(cdt)
        out_r.append(hr)
        out_i.append(hi)
    res_r = torch.stack(out_r, 1).to(b_re.dtype)
    res_i = torch.stack(out_i, 1).to(b_im.dtype)
    if return_final_state:
        fdt = cdt if cdt == torch.float64 else torch.float32
        return res_r, res_i, (hr.to(fdt), hi.to(fdt))
    return res_r, res_i


def _fo_fin_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fo_per_channel(a: torch.Tensor, D: int) -> torch.Tensor:
    """Constant decays given per head (H,) as one per channel (D,); time-varying or per-channel ones unchanged."""
    return a.repeat_interleave(D // a.shape[0]) if a.dim() == 1 and a.shape[0] != D else a


def _fo_scan_impl(a, b, h0, heads, config):
    if not _fo_use_triton(b):
        h, fin = first_order_scan_ref(_fo_per_channel(a, b.shape[2]).expand(b.shape), b, h0, True)
        return h, fin.to(_fo_fin_dtype(b))
    cfg = _fo_config(b.shape[2], scan_config_dict(config))
    a, b = a.contiguous(), b.contiguous()
    h0c = h0.float().contiguous() if h0 is not None else None
    h, fin, _ = _fo_launch(_fo_per_channel(a, b.shape[2]), b, h0c, False, heads > 0, cfg, b.dtype, True)
    return h, fin.to(_fo_fin_dtype(b))


def _fo_scan_fake(a, b, h0, heads, config):
    return b.new_empty(b.shape), b.new_empty((b.shape[0], b.shape[2]), dtype=_fo_fin_dtype(b))


def _fo_scan_setup(ctx, inputs, output):
    a, b, h0, heads, config = inputs
    ref = not _fo_use_triton(b)
    ctx.heads, ctx.config = heads, config
    # the kernels' backward needs the forward's h; the reference's backward recomputes from b
    ctx.save_for_backward(a, b if ref else None, None if ref else output[0], h0)


def _fo_scan_backward(ctx, dh, dfin):
    a, b, h, h0 = ctx.saved_tensors
    need_a = ctx.needs_input_grad[0]
    da, db, dh0 = _fo_scan_bwd_op(a, b, h, h0, dh, dfin, ctx.heads, need_a, ctx.config)
    return (da if need_a else None), db, scan_opt(dh0), None, None


def _fo_scan_bwd_impl(a, b, h, h0, dh, dfin, heads, need_a, config):
    if b is not None:
        return tuple(scan_ref_vjp(lambda a, b, h0: _fo_scan_impl(a, b, h0, heads, config), [a, b, h0], [dh, dfin]))
    cfg = _fo_config(h.shape[2], scan_config_dict(config))
    a, dh, dfin = a.contiguous(), dh.contiguous(), dfin.float().contiguous()
    h0c = h0.float().contiguous() if h0 is not None and need_a else None
    hp = h if need_a else None
    a_ch = _fo_per_channel(a, h.shape[2])
    db, dh0, da = _fo_launch(a_ch, dh, dfin, True, heads > 0, cfg, h.dtype, h0 is not None, hp=hp, h0=h0c)
    if da is not None and heads:
        da = da.view(da.shape[0], a.shape[0], -1).sum((0, 2))  # per (sequence, channel) to a's decays
    da = da.to(a.dtype) if da is not None else scan_none(dh)
    return da, db, dh0.to(h0.dtype) if h0 is not None else scan_none(dh)


def _fo_scan_bwd_fake(a, b, h, h0, dh, dfin, heads, need_a, config):
    da = a.new_empty(a.shape) if need_a or b is not None else scan_none(dh)
    return da, dh.new_empty(dh.shape), h0.new_empty(h0.shape) if h0 is not None else scan_none(dh)


_fo_scan_bwd_op = scan_op(
    "fo_scan_bwd",
    "(Tensor a, Tensor? b, Tensor? h, Tensor? h0, Tensor dh, Tensor dfin, int heads, bool need_a, str config)"
    " -> (Tensor, Tensor, Tensor)",
    _fo_scan_bwd_impl,
    _fo_scan_bwd_fake,
)


_fo_scan_op = scan_op(
    "fo_scan",
    "(Tensor a, Tensor b, Tensor? h0, int heads, str config) -> (Tensor, Tensor)",
    _fo_scan_impl,
    _fo_scan_fake,
    _fo_scan_backward,
    _fo_scan_setup,
)


def _fo_cscan_impl(ar, ai, br, bi, h0r, h0i, config):
    fdt = _fo_fin_dtype(br)
    if not _fo_use_triton(br):
        hr, hi, (fr, fi) = first_order_scan_complex_ref(ar, ai, br, bi, (h0r, h0i) if h0r is not None else None, True)
        return hr, hi, fr.to(fdt), fi.to(fdt)
    cfg = _fo_config(br.shape[2], scan_config_dict(config))
    ar, ai, br, bi = (x.contiguous() for x in (ar, ai, br, bi))
    B, T, D = br.shape
    has_h0, const_a = h0r is not None, ar.dim() == 1
    c0r = h0r.float().contiguous() if has_h0 else None
    c0i = h0i.float().contiguous() if has_h0 else None
    hr, hi = torch.empty_like(br), torch.empty_like(bi)
    fr = torch.empty((B, D), device=br.device, dtype=torch.float32)
    fi = torch.empty_like(fr)
    grid = (B, triton.cdiv(D, cfg["BD"]))
    dummy = br
    _fo_cscan_kernel[grid](
        ar, ai, br, bi,
        c0r if has_h0 else dummy, c0i if has_h0 else dummy,
        hr, hi, fr, fi,
        dummy, dummy, dummy, dummy, dummy, dummy,
        T, D,
        REVERSE=False, HAS_C0=has_h0, STORE_FIN=True, HAS_DA=False, HAS_H0=False, CONST_A=const_a,
        BT=cfg["BT"], BD=cfg["BD"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return hr, hi, fr.to(fdt), fi.to(fdt)


def _fo_cscan_fake(ar, ai, br, bi, h0r, h0i, config):
    fin = (br.shape[0], br.shape[2])
    fdt = _fo_fin_dtype(br)
    return br.new_empty(br.shape), bi.new_empty(bi.shape), br.new_empty(fin, dtype=fdt), br.new_empty(fin, dtype=fdt)


def _fo_cscan_setup(ctx, inputs, output):
    ar, ai, br, bi, h0r, h0i, config = inputs
    ctx.config = config
    if _fo_use_triton(br):
        ctx.save_for_backward(ar, ai, None, None, output[0], output[1], h0r, h0i)
    else:
        ctx.save_for_backward(ar, ai, br, bi, None, None, h0r, h0i)


def _fo_cscan_backward(ctx, dhr, dhi, dfr, dfi):
    grads = _fo_cscan_bwd_op(*ctx.saved_tensors, dhr, dhi, dfr, dfi, ctx.config)
    return (*grads[:4], scan_opt(grads[4]), scan_opt(grads[5]), None)


def _fo_cscan_bwd_impl(ar, ai, br, bi, hr, hi, h0r, h0i, dhr, dhi, dfr, dfi, config):
    if br is not None:
        fwd = lambda *xs: _fo_cscan_impl(*xs, config)  # noqa: E731
        return tuple(scan_ref_vjp(fwd, [ar, ai, br, bi, h0r, h0i], [dhr, dhi, dfr, dfi]))
    cfg = _fo_config(hr.shape[2], scan_config_dict(config))
    ar, ai = ar.contiguous(), ai.contiguous()
    has_h0, const_a = h0r is not None, ar.dim() == 1
    c0r = h0r.float().contiguous() if has_h0 else None
    c0i = h0i.float().contiguous() if has_h0 else None
    B, T, D = hr.shape
    dhr, dhi = dhr.contiguous(), dhi.contiguous()
    dfr, dfi = dfr.float().contiguous(), dfi.float().contiguous()
    dbr, dbi = torch.empty_like(hr), torch.empty_like(hi)
    if const_a:  # per (sequence, channel) sums, reduced over the sequences below
        dar, dai = (torch.empty((B, D), device=hr.device, dtype=torch.float32) for _ in range(2))
    else:
        dar, dai = torch.empty_like(ar), torch.empty_like(ai)
    g0r = torch.empty((B, D), device=hr.device, dtype=torch.float32)
    g0i = torch.empty_like(g0r)
    grid = (B, triton.cdiv(D, cfg["BD"]))
    dummy = hr
    _fo_cscan_kernel[grid](
        ar, ai, dhr, dhi,
        dfr, dfi,
        dbr, dbi, g0r, g0i,
        hr, hi, c0r if has_h0 else dummy, c0i if has_h0 else dummy,
        dar, dai,
        T, D,
        REVERSE=True, HAS_C0=True, STORE_FIN=has_h0, HAS_DA=True, HAS_H0=has_h0, CONST_A=const_a,
        BT=cfg["BT"], BD=cfg["BD"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    if const_a:
        dar, dai = dar.sum(0).to(ar.dtype), dai.sum(0).to(ai.dtype)
    if has_h0:
        return dar, dai, dbr, dbi, g0r.to(h0r.dtype), g0i.to(h0i.dtype)
    return dar, dai, dbr, dbi, scan_none(dhr), scan_none(dhr)


def _fo_cscan_bwd_fake(ar, ai, br, bi, hr, hi, h0r, h0i, dhr, dhi, dfr, dfi, config):
    h0 = (h0r.new_empty(h0r.shape), h0i.new_empty(h0i.shape)) if h0r is not None else (scan_none(dhr),) * 2
    return ar.new_empty(ar.shape), ai.new_empty(ai.shape), dhr.new_empty(dhr.shape), dhi.new_empty(dhi.shape), *h0


_fo_cscan_bwd_op = scan_op(
    "fo_cscan_bwd",
    "(Tensor ar, Tensor ai, Tensor? br, Tensor? bi, Tensor? hr, Tensor? hi, Tensor? h0r, Tensor? h0i, Tensor dhr,"
    " Tensor dhi, Tensor dfr, Tensor dfi, str config) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fo_cscan_bwd_impl,
    _fo_cscan_bwd_fake,
)


_fo_cscan_op = scan_op(
    "fo_cscan",
    "(Tensor ar, Tensor ai, Tensor br, Tensor bi, Tensor? h0r, Tensor? h0i, str config)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    _fo_cscan_impl,
    _fo_cscan_fake,
    _fo_cscan_backward,
    _fo_cscan_setup,
)


def _lti_tp_impl(x, log_a, h0, config):
    if not _fo_use_triton(x):
        h, fin = lti_scan_ref(x, log_a, h0, True)
        return h, fin.to(_fo_fin_dtype(x))
    cfg = lti_toeplitz_config(x.shape[2], log_a.shape[0], scan_config_dict(config))
    h0c = h0.contiguous() if h0 is not None else None  # read in its own dtype: no fp32 copy
    h, fin, _ = _ltc_launch(x.contiguous(), log_a.contiguous(), h0c, False, cfg, _fo_fin_dtype(x))
    return h, fin


def _lti_tp_fake(x, log_a, h0, config):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], x.shape[2]), dtype=_fo_fin_dtype(x))


def _lti_tp_setup(ctx, inputs, output):
    x, log_a, h0, config = inputs
    ref = not _fo_use_triton(x)
    ctx.config = config
    # an unused final state then comes to the backward as None, not as a zero-filled (B, D) launch
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(log_a, x if ref else None, None if ref else output[0], h0)


def _lti_tp_backward(ctx, dh, dfin):
    log_a, x, h, h0 = ctx.saved_tensors
    if dh is None:  # only the final state was used: the kernel reads dL/dh everywhere
        dh = torch.zeros_like(h if h is not None else x)
    need_a = ctx.needs_input_grad[1]
    dla, dx, dh0 = _lti_tp_bwd_op(log_a, x, h, h0, dh, dfin, need_a, ctx.config)
    return dx, (dla if need_a else None), scan_opt(dh0), None


def _lti_tp_bwd_impl(log_a, x, h, h0, dh, dfin, need_a, config):
    if x is not None:
        fwd = lambda log_a, x, h0: _lti_tp_impl(x, log_a, h0, config)  # noqa: E731
        return tuple(scan_ref_vjp(fwd, [log_a, x, h0], [dh, dfin]))
    cfg = lti_toeplitz_config(h.shape[2], log_a.shape[0], scan_config_dict(config))
    h0c = h0.contiguous() if h0 is not None and need_a else None
    dfin = dfin.contiguous() if dfin is not None else None
    fin_dtype = h0.dtype if h0 is not None else None
    hp = h if need_a else None
    dx, dh0, part = _ltc_launch(dh.contiguous(), log_a.contiguous(), dfin, True, cfg, fin_dtype, hp=hp, h0=h0c)
    dla = part.sum(1).to(log_a.dtype) if need_a else scan_none(dh)
    return dla, dx, dh0 if h0 is not None else scan_none(dh)


def _lti_tp_bwd_fake(log_a, x, h, h0, dh, dfin, need_a, config):
    dla = log_a.new_empty(log_a.shape) if need_a or x is not None else scan_none(dh)
    return dla, dh.new_empty(dh.shape), h0.new_empty(h0.shape) if h0 is not None else scan_none(dh)


_lti_tp_bwd_op = scan_op(
    "lti_toeplitz_bwd",
    "(Tensor log_a, Tensor? x, Tensor? h, Tensor? h0, Tensor dh, Tensor? dfin, bool need_a, str config)"
    " -> (Tensor, Tensor, Tensor)",
    _lti_tp_bwd_impl,
    _lti_tp_bwd_fake,
)


_lti_tp_op = scan_op(
    "lti_toeplitz",
    "(Tensor x, Tensor log_a, Tensor? h0, str config) -> (Tensor, Tensor)",
    _lti_tp_impl,
    _lti_tp_fake,
    _lti_tp_backward,
    _lti_tp_setup,
)


def _fo_expand_decay(log_a: torch.Tensor, D: int) -> torch.Tensor:
    """LTI shape rule: log_a is (D,) per channel, or (H,) per head with D % H == 0, head h owning channels
    [h * D // H, (h + 1) * D // H)."""
    if log_a.dim() != 1 or D % log_a.shape[0] != 0:
        raise ValueError(f"lti_scan: log_a must be (D,) or (H,) with D % H == 0; got {tuple(log_a.shape)} for D={D}")
    return log_a.float().repeat_interleave(D // log_a.shape[0])


def lti_scan_ref(x: torch.Tensor, log_a: torch.Tensor, h0: torch.Tensor | None = None, return_final_state=False):
    """Sequential reference of the LTI scan h_t = exp(log_a) * h_{t-1} + x_t."""
    a = torch.exp(_fo_expand_decay(log_a, x.shape[2]).to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    return first_order_scan_ref(a.expand(x.shape), x, h0, return_final_state)


def lti_scan(
    x: torch.Tensor,
    log_a: torch.Tensor,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
    config: dict | None = None,
):
    """Linear time-invariant scan h_t = exp(log_a) * h_{t-1} + x_t; x (B, T, D), log_a (D,) or (H,) per head
    (see `_fo_expand_decay`), h0 (B, D). Reads the decay once per program: the bytes of a copy.
    config={"method": "toeplitz"} runs per-head decays as chunked Toeplitz matrix products on tensor cores
    (templates/scan/lti_chunked.py), one op (ssm_golf::lti_toeplitz) that reads log_a itself; per-channel decays
    and narrow heads keep the scan, one op (ssm_golf::fo_scan with constant decays) with the exp of the decays as
    PyTorch around it."""
    if x.dim() != 3:
        raise ValueError(f"lti_scan: x must be (B, T, D), got shape {tuple(x.shape)}")
    if h0 is not None:
        _fo_check("lti_scan: h0", h0, (x.shape[0], x.shape[2]))
    if log_a.dim() != 1 or x.shape[2] % log_a.shape[0] != 0:
        _fo_expand_decay(log_a, x.shape[2])  # raises with the shape rule
    if config and config.get("method") == "toeplitz" and lti_toeplitz_block(x.shape[2], log_a.shape[0]):
        h, fin = _lti_tp_op(x, log_a, h0, scan_config_str(config))
    else:
        a = torch.exp(log_a.to(_fo_fin_dtype(x)))  # one decay per head: the op expands it where a kernel needs it
        h, fin = _fo_scan_op(a, x, h0, log_a.shape[0], scan_config_str(config))
    return (h, fin) if return_final_state else h


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
# Depthwise causal convolution over time for (batch, time, channels) tensors, with an optional carried tail.
#
# y_t = bias + sum_k w[:, k] * x_{t - (K - 1) + k}: the last tap sees the current step. Written as K shifted
# multiply-adds, so it needs no transposes and fuses under torch.compile. The tail (the last K - 1 inputs of the
# previous call) lets a stateful caller continue a sequence exactly where the previous window stopped.
# ---------------------------------------------------------------------------------------------------------------------


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, C); weight (C, 1, K) as nn.Conv1d(groups=C) stores it; bias (C,); tail (B, K - 1, C) or None
    (zeros). Returns (y (B, T, C) in x's dtype, the new tail (B, K - 1, C))."""
    taps = weight.shape[-1]
    steps = x.shape[1]
    if tail is None:
        tail = x.new_zeros(x.shape[0], taps - 1, x.shape[2])
    padded = torch.cat((tail.to(x.dtype), x), dim=1)
    w = weight.view(weight.shape[0], taps).to(x.dtype)
    y = padded[:, 0:steps] * w[:, 0]
    for k in range(1, taps):
        y = y + padded[:, k : k + steps] * w[:, k]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, padded[:, padded.shape[1] - (taps - 1) :]


def conv_init_(weight: torch.Tensor, bias: torch.Tensor | None, zero_bias: bool) -> None:
    """nn.Conv1d's default range for a depthwise kernel of K taps: uniform in +-1/sqrt(K); the bias too, or zero."""
    bound = weight.shape[-1] ** -0.5
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.zero_() if zero_bias else bias.uniform_(-bound, bound)


# ---------------------------------------------------------------------------------------------------------------------
# kill-Mamba-2: a Mamba-2 block whose dt, B and C are learned constants (linear time-invariant), run as per-head
# exponential moving averages on the scan core's LTI path.
#
# Mamba-2 with time-constant dt_h, B and C: the SSD state h_t = a_h h_{t-1} + dt_h u_t B^T read out with C gives
# y_t = (B . C) dt_h sum_{s <= t} a_h^(t - s) u_s, with a_h = exp(-exp(A_log_h) softplus(dt_bias_h)). The N-wide
# state is therefore degenerate: one EMA per channel, decaying per head, with gain k dt_h (k = B . C, one scalar).
# The block keeps everything else of Mamba-2: in_proj to (x, z), depthwise causal conv (K taps, bias) and SiLU on x,
# the D skip, the SiLU(z) gate, out_proj (zero-initialised).
#
# in_proj also has the rows Mamba-2 would use for B, C and dt (2 N + H of them). In kill mode they receive no
# gradient and are never read, but they are part of the ternary tensor whose absmean scale the live rows share,
# and of the parameter count of the origin (PR #1994); DEAD_ROWS=0 drops them.
# ---------------------------------------------------------------------------------------------------------------------


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0)."""
    return y + torch.log(-torch.expm1(-y))


@register_mixer("lti_mamba2")
class LtiMamba2(nn.Module):
    OPTIONS = {
        "expand": ("SSM_EXPAND", 2),
        "head_dim": ("SSM_HEAD_DIM", 64),
        "state": ("SSM_STATE", 64),
        "conv": ("SSM_CONV", 4),
        "dead_rows": ("DEAD_ROWS", True),
        "scan_method": ("LTI_SCAN_METHOD", "toeplitz"),
    }

    def __init__(
        self,
        dim: int,
        linear: LinearMaker,
        expand: int = 2,
        head_dim: int = 64,
        state: int = 64,
        conv: int = 4,
        dead_rows: bool = True,
        scan_method: str = "toeplitz",
    ) -> None:
        super().__init__()
        inner = expand * dim
        if inner % head_dim:
            raise ValueError(f"lti_mamba2: inner width {inner} is not a multiple of SSM_HEAD_DIM {head_dim}")
        if scan_method not in ("scan", "toeplitz"):
            raise ValueError(f"lti_mamba2: LTI_SCAN_METHOD must be scan or toeplitz, got {scan_method!r}")
        self.inner, self.heads, self.head_dim = inner, inner // head_dim, head_dim
        self.scan_config = {"method": scan_method}
        extra = 2 * state + self.heads if dead_rows else 0
        self.in_proj = linear(dim, 2 * inner + extra)
        self.conv_weight = nn.Parameter(torch.empty(inner, 1, conv))
        self.conv_bias = nn.Parameter(torch.empty(inner))
        conv_init_(self.conv_weight, self.conv_bias, zero_bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.heads))  # A = -1
        dt = torch.exp(torch.empty(self.heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp_min(1e-4)
        self.dt_bias = nn.Parameter(inverse_softplus(dt))
        self.D_skip = nn.Parameter(torch.ones(inner))
        self.B_const = nn.Parameter(torch.randn(state) / 8)
        self.C_const = nn.Parameter(torch.randn(state) / 8)
        self.out_proj = linear(inner, dim, zero_init=True)

    def decay_and_gain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log a_h, k dt_h), each (H,) fp32."""
        dt = F.softplus(self.dt_bias.float())
        log_a = -torch.exp(self.A_log.float()) * dt
        return log_a, torch.dot(self.B_const.float(), self.C_const.float()) * dt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(x)
        branch, z = xz[..., : self.inner], xz[..., self.inner : 2 * self.inner]
        u = F.silu(causal_conv(branch, self.conv_weight, self.conv_bias)[0])
        log_a, gain = self.decay_and_gain()
        scaled = u * gain.repeat_interleave(self.head_dim).to(u.dtype)
        shape = scaled.shape
        h = lti_scan(scaled.reshape(-1, shape[-2], shape[-1]), log_a, config=self.scan_config).view(shape)
        y = (h + self.D_skip.to(u.dtype) * u) * F.silu(z)
        return self.out_proj(y)


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
# Ternary quantisers: codes in {-1, 0, +1} of the weights of ternary linears, packed densely.
#
#   ternary2   4 codes per byte, 2 bits each (code + 1), the first code in the low bits
#   ternary5   5 codes per byte in base 3: sum of (code_k + 1) * 3^k, padded with the zero code
# Codes come from the absmean scale, as in the forward; the stored scale is absmean or, with TERNARY_LSTSQ=1, the
# least-squares fit of the float weights by scale * codes; per tensor or per row, as the linear itself. A warm start
# (TERNARY_WARMSTART_FRAC of the time in float, then a ramp over TERNARY_RAMP_FRAC of the rest) is a step stage.
# ---------------------------------------------------------------------------------------------------------------------


def pack_2bit(codes: Tensor) -> Tensor:
    """Codes in {0, 1, 2} (flat) -> uint8, four per byte, the first in the low two bits; padded with 0."""
    c = codes.to(torch.uint8).flatten()
    c = torch.cat((c, c.new_zeros(-c.numel() % 4))).view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_2bit(packed: Tensor, n: int) -> Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 3).flatten()[:n]


def pack_base3(codes: Tensor) -> Tensor:
    """Codes in {0, 1, 2} (flat) -> uint8, five per byte as sum(code_k * 3^k); padded with 1 (the zero trit)."""
    c = codes.to(torch.int16).flatten()
    c = torch.cat((c, c.new_ones(-c.numel() % 5))).view(-1, 5)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
    return (c * powers).sum(dim=1).to(torch.uint8)


def unpack_base3(packed: Tensor, n: int) -> Tensor:
    v = packed.to(torch.int16)[:, None]
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
    return ((v // powers) % 3).flatten()[:n].to(torch.uint8)


def ternary_encode(t: Tensor, opts: dict, pack: Any) -> dict[str, Tensor]:
    """Codes from the absmean scale (the forward's); the stored scale is absmean or, with opts["lstsq"], the least-
    squares fit of the float weights by scale * codes (per row or per tensor, as opts["per_row"])."""
    w = t.detach().float()
    per_row = bool(opts.get("per_row")) and w.ndim == 2
    rows = w.reshape(w.size(0), -1) if per_row else w.reshape(1, -1)
    trits = ternarize(rows, ternary_scale(rows, per_row=True))
    if opts.get("lstsq"):
        scale = (rows * trits).sum(dim=1) / (trits * trits).sum(dim=1).clamp_min(1.0)
    else:
        scale = rows.abs().mean(dim=1).clamp_min(1e-8)
    shape = torch.tensor(list(w.shape), dtype=torch.int64)
    return {"codes": pack(trits + 1), "scale": scale.float(), "shape": shape}


def ternary_decode(fields: dict[str, Tensor], unpack: Any) -> Tensor:
    """Weights a TernaryLinear maps back to scale * codes: a TernaryLinear re-derives its scale as mean |w|, so
    each nonzero code is stored as scale / (share of nonzero codes), whose mean |w| is the scale again."""
    shape = [int(d) for d in fields["shape"].tolist()]
    scale = fields["scale"].float().view(-1, 1)
    n = 1
    for d in shape:
        n *= d
    trits = unpack(fields["codes"], n).float().view(scale.size(0), -1) - 1.0
    share = (trits != 0).float().mean(dim=1, keepdim=True)
    alpha = torch.where(share > 0, scale / share.clamp_min(1e-12), torch.zeros_like(share))
    return (trits * alpha).view(shape)


register(QUANTISERS, "ternary2")(
    Quantiser(lambda t, o: ternary_encode(t, o, pack_2bit), lambda f: ternary_decode(f, unpack_2bit))
)


register(QUANTISERS, "ternary5")(
    Quantiser(lambda t, o: ternary_encode(t, o, pack_base3), lambda f: ternary_decode(f, unpack_base3))
)


def ternary_mix(elapsed_ms: float, cap_ms: float | None, warmstart_frac: float, ramp_frac: float) -> float:
    """How ternary the ternary linears are now: 0 during the float warm start, then a linear ramp to 1."""
    if warmstart_frac <= 0 or cap_ms is None:
        return 1.0
    start_ms = warmstart_frac * cap_ms
    return min(1.0, max(0.0, (elapsed_ms - start_ms) / max(ramp_frac * (cap_ms - start_ms), 1e-9)))


@register(STAGES, "step:ternary_ramp")
def ternary_ramp(
    model: torch.nn.Module, hp: Any, lr_scale: float, elapsed_ms: float, cap_ms: float | None, log
) -> None:
    """Before each step: set every ternary linear's quant_mix for the time elapsed."""
    mix = ternary_mix(elapsed_ms, cap_ms, hp.ternary_warmstart_frac, hp.ternary_ramp_frac)
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.quant_mix.fill_(mix)


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
# Brotli (quality 11) as an artifact compressor, for the variants that name COMPRESSOR=brotli.
# ---------------------------------------------------------------------------------------------------------------------

register(COMPRESSORS, "brotli")((lambda raw: brotli.compress(raw, quality=11), brotli.decompress))


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
