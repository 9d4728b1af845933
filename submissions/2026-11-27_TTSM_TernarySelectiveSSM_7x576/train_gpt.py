"""train_gpt.py: the ttsm variant with the record recipe (600 s on 8 GPUs), assembled by ssm-golf. Origin:
openai/parameter-golf#1999.

7 pure selective-SSM blocks (Mamba-1 style, width 576, state 64), ternary projections with least-squares export
scales, hashed bigram/trigram inputs, stateful evaluation.

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

# ---------------------------------------------------------------------------------------------------------------------
# Hyperparameters: every knob is an environment variable (upstream's names where upstream has one).
#
# The variant's defaults sit in VARIANT_DEFAULTS (written by `builder assemble`); the environment at run time wins.
# ---------------------------------------------------------------------------------------------------------------------

VARIANT_DEFAULTS: dict[str, str] = {
    "ARTIFACT_NAME": "final_model.ternary.ptz",
    "BIGRAM_BUCKETS": "3072",
    "BIGRAM_DIM": "16",
    "BIGRAM_SCALE_INIT": "0.05",
    "COMPILE_MODE": "reduce-overhead",
    "COMPRESSOR": "zlib",
    "CONTROL_TENSOR_NAME_PATTERNS": "branch_scales,resid_mix,skip_weights,loop_pos,feature_scale,A_log,dt_proj",
    "EVAL_BATCH_SEQS": "32",
    "EVAL_MODE": "stateful",
    "EVAL_SEQ_LEN": "2048",
    "GRAD_CLIP_NORM": "0.3",
    "INPUT_FEATURES": "bigram_hash,trigram_hash",
    "LAYER_PATTERN": "selective:none",
    "LINEAR_KIND": "ternary",
    "LOOP_EMBEDDING": "1",
    "MATRIX_LR": "0.4",
    "MAX_WALLCLOCK_SECONDS": "600",
    "MODEL_DIM": "576",
    "MUON_BACKEND_STEPS": "5",
    "MUON_MOMENTUM": "0.99",
    "MUON_MOMENTUM_WARMUP_START": "0.92",
    "MUON_MOMENTUM_WARMUP_STEPS": "1500",
    "MUON_ROW_NORM": "1",
    "NGRAM_INIT_STD": "0.02",
    "NUM_LAYERS": "7",
    "NUM_LOOPS": "1",
    "ORTHO_INIT": "1",
    "QUANT": "int8",
    "QUANT_OVERRIDES": "tok_emb=float16,dt_proj=float32",
    "QUANT_TERNARY": "ternary5",
    "SCALAR_LR": "0.02",
    "SCORE_TAG": "final_ternary_roundtrip",
    "SEED": "42",
    "SSM_CONV": "4",
    "SSM_EXPAND": "1",
    "SSM_NORMALIZE_BC": "1",
    "SSM_STATE": "64",
    "TERNARY_LSTSQ": "1",
    "TERNARY_PER_ROW": "1",
    "TERNARY_RAMP_FRAC": "0.1",
    "TERNARY_WARMSTART_FRAC": "0.1",
    "TIED_EMBED_INIT_STD": "0.005",
    "TIED_EMBED_LR": "0.03",
    "TRAIN_BATCH_TOKENS": "32768",
    "TRAIN_SEQ_LEN": "2048",
    "TRIGRAM_BUCKETS": "8192",
    "TRIGRAM_DIM": "16",
    "TRIGRAM_SCALE_INIT": "0.1",
    "UNET_SKIPS": "1",
    "VAL_LOSS_EVERY": "0",
    "WARMDOWN_ITERS": "3000",
    "WARMUP_STEPS": "20",
    "Z_LOSS": "0.0001",
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


def register_feature(name: str) -> Callable[[Any], Any]:
    """Class decorator for an input feature added to the token embedding; takes (vocab_size, dim, **options)."""
    return register(FEATURES, name)


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
# Selective scan (Mamba-1) in Triton: per (channel, state) decay exp(dt * A), input-dependent B and C, D skip,
# optional z gate, dt = softplus(delta + bias) fused; forward and backward.
#
# Both kernels walk time one step at a time. A program owns one sequence and BD channels with all N states, and keeps
# the state as an fp32 [N, BD] register tile; each step loads the step's [BD] rows of u, delta, z (and dout) and the
# [N] rows of B and C, issued one step ahead so that their latency overlaps the previous step's arithmetic. The
# forward reads through int32 offsets from the sequence's base pointers with clamped indices and no masks (padded
# states get B = 0, which keeps them out of every sum; only stores are masked). The backward keeps 64-bit offsets and
# masked prefetches: the branch that gave it the forward's addressing (h-sel3) was 12% slower on an H100 at ttsm's
# segmented shape although its offline figures were better everywhere, and the cause is not known yet. The time
# dependence is a single multiply-add per state per step, so there is no scan tree and no layout shuffling of tiles;
# the parallelism is batch x channel blocks (32 channels per one-warp program by default).
#
# Forward: h_t = exp2(dt_t A log2e) h_{t-1} + dt_t u_t B_t, y_t = sum_n C_t h_t (+ D u_t, times silu(z_t)). With grad
# enabled the state is written every CK steps (chunk checkpoints, fp32).
#
# Backward: chunks of CK steps in reverse, two sweeps per chunk and no per-step state in memory.
# * Reverse sweep: the adjoint lambda_t = C_t dy_t + a_{t+1} lambda_{t+1} needs no forward state. It gives du, dB
#   (summed over the program's channels, then one fp32 atomic per (step, state) per program), dD, and the
#   lambda-dependent parts of ddt and dA.
# * Forward sweep: h is recomputed from the checkpoint. It gives y (for dz), dC (atomics as for dB), and the rest of
#   ddt and dA.
# Both ddt and dA need g_t = lambda_t w_t with w_t = a_t h_{t-1} (the gradient of the log-decay), which pairs a future
# quantity with a past one. The identity g_{t+1} = g_t + mu_t x_t - (C_t dy_t) w_t (mu_t = a_{t+1} lambda_{t+1},
# x_t = dt u B_t) splits it into an adjoint part and a state part; each vanishes with the decay, so strong decays
# cancel no large terms. The reverse sweep writes its per-channel part to a small per-program scratch ([CK, BD] fp32,
# which stays in cache). The forward sweep starts from the exact g at the chunk start (the carried mu times the
# checkpoint) and adds its own part. The running sums therefore restart every chunk, and nothing is ever divided by a
# decay that may have underflowed to 0. dA, dD and the bias gradient are written per sequence and summed afterwards;
# dh0 is the carried mu at the first step.
#
# `selective_scan_ref` is the sequential PyTorch reference (float64-capable), used on machines without CUDA.
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _sel_rcp(x, ASM: tl.constexpr):
    # 1 / x as the hardware's approximate reciprocal (one instruction; the rounded division is about eight). Used
    # only where x >= 1 (never a denormal, so flushing them changes nothing). The interpreter divides.
    if ASM:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def _sel_softplus(x, ASM: tl.constexpr):
    # softplus(x) and its derivative sigmoid(x) from one exp and one reciprocal: with e = exp(x), w = 1 + e rounded
    # and d = (w - 1) - e its rounding error, log1p(e) = log(w) - d / w to first order in d (exact to the last bit
    # of fp32; for e below 2^-24, w = 1 and the result is e). On the GPU (ASM) the logarithm is the hardware's lg2
    # (a few ulp) and 1 / w the approximate reciprocal. The interpreter runs no inline assembly: tl.math.log2 and a
    # division.
    e = tl.math.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    w = 1.0 + e
    r = _sel_rcp(w, ASM)
    if ASM:
        lg = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [w], dtype=tl.float32, is_pure=True, pack=1)
    else:
        lg = tl.math.log2(w)
    sp = lg * 0.6931471805599453 - ((w - 1.0) - e) * r
    return tl.where(x > 20.0, x, sp), e * r


@triton.jit
def _sel_sigmoid(z, ASM: tl.constexpr):
    return _sel_rcp(1.0 + tl.math.exp2(z * -1.4426950408889634), ASM)


@triton.jit
def _sel_fwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    out_ptr,
    ck_ptr,
    fin_ptr,
    hl_ptr,
    ds_ptr,
    T,
    DM,
    N,
    LS,
    NSEG,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE_CK: tl.constexpr,
    LOCAL: tl.constexpr,
    CARRY_IN: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    ASM: tl.constexpr,
    CK: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Program (sequence, channel block, segment of LS steps). LOCAL: the segment from a zero state, storing only
    its end state (hl) and its sum of dt (ds). Otherwise y (and checkpoints), from h0 carried through the earlier
    segments' summaries when CARRY_IN: h <- exp(A sum dt) h + hl, one step per earlier segment.
    The step loop reads through int32 offsets from the sequence's base pointers with clamped channel and state
    indices and a clamped next step, so its loads need no masks; padded states get B = 0 (EVEN_N false), which
    keeps their h at 0, and padded channels are only stored through masks."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2)
    n_seg = NSEG  # the LOCAL pass runs the first NSEG - 1 segments only
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    md = cols < DM
    mn = ns < N
    mnd = mn[:, None] & md[None, :]
    # clamped indices for the loads (a clamp would cost the B and C rows their vector loads)
    colc = cols if EVEN_D else tl.minimum(cols, DM - 1)
    nsc = ns if EVEN_N else tl.minimum(ns, N - 1)
    # the state is held transposed, [N, BD], N contiguous as A, h0 and the checkpoints are stored
    s_off = ns[:, None] + cols[None, :] * N
    A2 = tl.load(A_ptr + s_off, mask=mnd, other=0.0).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias = tl.load(bias_ptr + colc).to(tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + colc).to(tl.float32)
    st_off = pid_b * DM * N + s_off
    if HAS_H0 and not LOCAL:
        h = tl.load(h0_ptr + st_off, mask=mnd, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BN, BD], dtype=tl.float32)
    if CARRY_IN:
        for j in range(0, seg):
            sj = pid_b * n_seg + j
            dsj = tl.load(ds_ptr + sj * DM + cols, mask=md, other=0.0)
            h = tl.math.exp2(dsj[None, :] * A2) * h + tl.load(hl_ptr + sj * DM * N + s_off, mask=mnd, other=0.0)
    if LOCAL:
        dsum = tl.zeros([BD], dtype=tl.float32)
    # the sequence's rows; offsets within a sequence are int32
    u_ptr += pid_b * T * DM
    dl_ptr += pid_b * T * DM
    z_ptr += pid_b * T * DM
    out_ptr += pid_b * T * DM
    B_ptr += pid_b * T * N
    C_ptr += pid_b * T * N
    t_start = seg * LS
    t_end = tl.minimum(t_start + LS, T)
    po = t_start * DM + colc
    pn = t_start * N + nsc
    # step t's inputs are loaded during step t - 1 (a software pipeline of depth one); the last step reloads itself
    u_n = tl.load(u_ptr + po).to(tl.float32)
    dl_n = tl.load(dl_ptr + po).to(tl.float32)
    b_n = tl.load(B_ptr + pn).to(tl.float32)
    if not LOCAL:
        c_n = tl.load(C_ptr + pn).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po).to(tl.float32)
    n_ck = tl.cdiv(T, CK)
    for t in range(t_start, t_end):
        u = u_n
        dt = dl_n
        bt = b_n
        nd = tl.where(t + 1 < t_end, DM, 0)
        nn = tl.where(t + 1 < t_end, N, 0)
        u_n = tl.load(u_ptr + (po + nd)).to(tl.float32)
        dl_n = tl.load(dl_ptr + (po + nd)).to(tl.float32)
        b_n = tl.load(B_ptr + (pn + nn)).to(tl.float32)
        if not LOCAL:
            ct = c_n
            c_n = tl.load(C_ptr + (pn + nn)).to(tl.float32)
            if HAS_Z:
                zt = z_n
                z_n = tl.load(z_ptr + (po + nd)).to(tl.float32)
        if not EVEN_N:
            bt = tl.where(mn, bt, 0.0)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt, _sg = _sel_softplus(dt, ASM)
        a = tl.math.exp2(dt[None, :] * A2)
        h = a * h + bt[:, None] * (dt * u)[None, :]
        if LOCAL:
            dsum += dt
        else:
            y = tl.sum(h * ct[:, None], axis=0)
            if HAS_D:
                y += dskip * u
            if HAS_Z:
                y = y * zt * _sel_sigmoid(zt, ASM)
            tl.store(out_ptr + po, y.to(out_ptr.dtype.element_ty), mask=md)
            if SAVE_CK:
                if t % CK == CK - 1:
                    tl.store(ck_ptr + (pid_b * n_ck + t // CK) * DM * N + s_off, h, mask=mnd)
        po += DM
        pn += N
    if LOCAL:
        sl = pid_b * n_seg + seg
        tl.store(hl_ptr + sl * DM * N + s_off, h, mask=mnd)
        tl.store(ds_ptr + sl * DM + cols, dsum, mask=md)
    elif seg == n_seg - 1:
        tl.store(fin_ptr + st_off, h, mask=mnd)


@triton.jit
def _sel_bwd_kernel(
    u_ptr,
    dl_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    ck_ptr,
    do_ptr,
    dfin_ptr,
    q_ptr,
    du_ptr,
    ddl_ptr,
    dz_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    dbias_ptr,
    dh0_ptr,
    ml_ptr,
    ds_ptr,
    T,
    DM,
    N,
    LS,
    NSEG,
    SEG0,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_DFIN: tl.constexpr,
    LOCAL: tl.constexpr,
    CARRY_IN: tl.constexpr,
    ASM: tl.constexpr,
    CK: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
):
    """Program (sequence, channel block, segment SEG0 + program_id(2) of LS steps). LOCAL: the adjoint over the
    segment from zero, storing only mu at its first step (ml) and its sum of dt (ds). Otherwise every gradient of
    the segment, with mu entering from the later segments' summaries when CARRY_IN: mu <- exp(A sum dt) mu + ml."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2) + SEG0
    cols = pid_d * BD + tl.arange(0, BD)
    ns = tl.arange(0, BN)
    md = cols < DM
    mn = ns < N
    mnd = mn[:, None] & md[None, :]
    s_off = ns[:, None] + cols[None, :] * N
    # one [N, BD] tile of A: the exponents scale the per-channel dt by log2(e) instead of keeping a second A tile
    A_nat = tl.load(A_ptr + s_off, mask=mnd, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=md, other=0.0).to(tl.float32)
    if HAS_D:
        dskip = tl.load(D_ptr + cols, mask=md, other=0.0).to(tl.float32)
    st_off = pid_b * DM * N + s_off
    if HAS_H0:
        h0v = tl.load(h0_ptr + st_off, mask=mnd, other=0.0).to(tl.float32)
    # mu = a_{t+1} lambda_{t+1}, the adjoint carried into step t from the right (dfin at the end)
    if HAS_DFIN and not LOCAL:
        mu = tl.load(dfin_ptr + st_off, mask=mnd, other=0.0).to(tl.float32)
    else:
        mu = tl.zeros([BN, BD], dtype=tl.float32)
    row = pid_b * T * DM + cols
    rown = pid_b * T * N + ns
    if LOCAL:
        t_start = seg * LS
        t_end = tl.minimum(t_start + LS, T)
        dsum = tl.zeros([BD], dtype=tl.float32)
        po = row + (t_end - 1).to(tl.int64) * DM
        pn = rown + (t_end - 1).to(tl.int64) * N
        dl_n = tl.load(dl_ptr + po, mask=md, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + po, mask=md, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po, mask=md, other=0.0).to(tl.float32)
        for i in range(0, t_end - t_start):
            dt = dl_n
            dout = do_n
            ct = c_n
            if HAS_Z:
                zt = z_n
            nxt = tl.zeros([BD], dtype=tl.int32) + i + 1 < t_end - t_start
            nxn = tl.zeros([BN], dtype=tl.int32) + i + 1 < t_end - t_start
            dl_n = tl.load(dl_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            do_n = tl.load(do_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            c_n = tl.load(C_ptr + pn - N, mask=mn & nxn, other=0.0).to(tl.float32)
            if HAS_Z:
                z_n = tl.load(z_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt, _sg = _sel_softplus(dt, ASM)
            if HAS_Z:
                dy = dout * zt * _sel_sigmoid(zt, ASM)
            else:
                dy = dout
            mu = tl.math.exp2((dt * 1.4426950408889634)[None, :] * A_nat) * (ct[:, None] * dy[None, :] + mu)
            dsum += dt
            po -= DM
            pn -= N
        sl = pid_b * NSEG + seg
        tl.store(ml_ptr + sl * DM * N + s_off, mu, mask=mnd)
        tl.store(ds_ptr + sl * DM + cols, dsum, mask=md)
        return
    if CARRY_IN:
        for jj in range(0, NSEG - 1 - seg):
            sj = pid_b * NSEG + NSEG - 1 - jj
            dsj = tl.load(ds_ptr + sj * DM + cols, mask=md, other=0.0)
            mu = tl.math.exp2((dsj * 1.4426950408889634)[None, :] * A_nat) * mu + tl.load(
                ml_ptr + sj * DM * N + s_off, mask=mnd, other=0.0
            )
    dA_acc = tl.zeros([BN, BD], dtype=tl.float32)
    dD_acc = tl.zeros([BD], dtype=tl.float32)
    dbias_acc = tl.zeros([BD], dtype=tl.float32)
    # this program's scratch row block: CK x BD fp32, written by the reverse sweep, read by the forward sweep
    q_base = ((pid_b * tl.num_programs(1) + pid_d) * NSEG + seg) * CK * BD + tl.arange(0, BD)
    n_ck = tl.cdiv(T, CK)
    c_lo = seg * (LS // CK)
    c_hi = tl.minimum(c_lo + LS // CK, n_ck)
    for kk in range(0, c_hi - c_lo):
        c = c_hi - 1 - kk
        t0 = c * CK
        L = tl.minimum(T - t0, CK)
        # ---- reverse sweep over the chunk: the adjoint, du, dB, and the lambda-side parts of ddt and dA ----
        dsuf = tl.zeros([BD], dtype=tl.float32)  # sum of dt over the chunk's later steps
        fsuf = tl.zeros([BD], dtype=tl.float32)  # sum over the chunk's steps >= t of f_k = sum_n A lambda x
        po = row + (t0 + L - 1).to(tl.int64) * DM
        pn = rown + (t0 + L - 1).to(tl.int64) * N
        pq = q_base + (L - 1) * BD
        u_n = tl.load(u_ptr + po, mask=md, other=0.0).to(tl.float32)
        dl_n = tl.load(dl_ptr + po, mask=md, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + po, mask=md, other=0.0).to(tl.float32)
        b_n = tl.load(B_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po, mask=md, other=0.0).to(tl.float32)
        for i in range(0, L):
            u = u_n
            dt = dl_n
            dout = do_n
            bt = b_n
            ct = c_n
            if HAS_Z:
                zt = z_n
            nxt = tl.zeros([BD], dtype=tl.int32) + i + 1 < L
            nxn = tl.zeros([BN], dtype=tl.int32) + i + 1 < L
            u_n = tl.load(u_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            dl_n = tl.load(dl_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            do_n = tl.load(do_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            b_n = tl.load(B_ptr + pn - N, mask=mn & nxn, other=0.0).to(tl.float32)
            c_n = tl.load(C_ptr + pn - N, mask=mn & nxn, other=0.0).to(tl.float32)
            if HAS_Z:
                z_n = tl.load(z_ptr + po - DM, mask=md & nxt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt, _sg = _sel_softplus(dt, ASM)
            dtu = dt * u
            if HAS_Z:
                dy = dout * zt * _sel_sigmoid(zt, ASM)
            else:
                dy = dout
            a = tl.math.exp2((dt * 1.4426950408889634)[None, :] * A_nat)
            # lambda = C dy + mu; the sums over N take the mu part per state and the C dy part through sum_n C B
            mB = mu * bt[:, None]
            lb = tl.sum(mB, axis=0) + dy * tl.sum(ct * bt, axis=0)
            du = dt * lb
            if HAS_D:
                du += dskip * dy
                dD_acc += dy * u
            tl.store(du_ptr + po, du.to(du_ptr.dtype.element_ty), mask=md)
            fsuf += dtu * tl.sum(mB * A_nat, axis=0)
            tl.store(q_ptr + pq, u * lb - fsuf, mask=md)
            dA_acc += mB * (dtu * dsuf)[None, :]
            dsuf += dt
            lam = ct[:, None] * dy[None, :] + mu
            tl.atomic_add(dB_ptr + pn, tl.sum(lam * dtu[None, :], axis=1), mask=mn, sem="relaxed")
            mu = a * lam
            po -= DM
            pn -= N
            pq -= BD
        tl.debug_barrier()
        # ---- forward sweep: recompute h from the checkpoint; y, dz, dC and the h-side parts of ddt and dA ----
        # g_t = lambda_t w_t with w_t = a_t h_{t-1} (the gradient of the log-decay) is exact at the chunk start and
        # moves by g_{t+1} = g_t + mu_t x_t - (C_t dy_t) w_t (mu_t = lambda_t - C_t dy_t, x_t = dt u B_t); the reverse
        # sweep summed the mu part into q and fsuf. Both parts vanish with the decay, so strong decays lose nothing.
        c_vec = tl.full([BN, BD], 0, tl.int32) + c
        h = tl.load(ck_ptr + (pid_b * n_ck + c - 1) * DM * N + s_off, mask=mnd & (c_vec > 0), other=0.0)
        if HAS_H0:
            h += tl.where(c_vec == 0, h0v, 0.0)
        g0 = mu * h
        dA_acc += g0 * dsuf[None, :]
        run = fsuf + tl.sum(g0 * A_nat, axis=0)
        dtot = dsuf
        dpre = tl.zeros([BD], dtype=tl.float32)
        po = row + t0.to(tl.int64) * DM
        pn = rown + t0.to(tl.int64) * N
        pq = q_base
        u_n = tl.load(u_ptr + po, mask=md, other=0.0).to(tl.float32)
        dl_n = tl.load(dl_ptr + po, mask=md, other=0.0).to(tl.float32)
        do_n = tl.load(do_ptr + po, mask=md, other=0.0).to(tl.float32)
        q_n = tl.load(q_ptr + pq, mask=md, other=0.0)
        b_n = tl.load(B_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        c_n = tl.load(C_ptr + pn, mask=mn, other=0.0).to(tl.float32)
        if HAS_Z:
            z_n = tl.load(z_ptr + po, mask=md, other=0.0).to(tl.float32)
        for i in range(0, L):
            u = u_n
            dt = dl_n
            dout = do_n
            q = q_n
            bt = b_n
            ct = c_n
            if HAS_Z:
                zt = z_n
            nxt = tl.zeros([BD], dtype=tl.int32) + i + 1 < L
            nxn = tl.zeros([BN], dtype=tl.int32) + i + 1 < L
            u_n = tl.load(u_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            dl_n = tl.load(dl_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            do_n = tl.load(do_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            q_n = tl.load(q_ptr + pq + BD, mask=md & nxt, other=0.0)
            b_n = tl.load(B_ptr + pn + N, mask=mn & nxn, other=0.0).to(tl.float32)
            c_n = tl.load(C_ptr + pn + N, mask=mn & nxn, other=0.0).to(tl.float32)
            if HAS_Z:
                z_n = tl.load(z_ptr + po + DM, mask=md & nxt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt, sg = _sel_softplus(dt, ASM)
            dtu = dt * u
            a = tl.math.exp2((dt * 1.4426950408889634)[None, :] * A_nat)
            w = a * h
            h = w + bt[:, None] * dtu[None, :]
            cw = w * ct[:, None]
            if HAS_Z:
                sz = _sel_sigmoid(zt, ASM)
                dy = dout * zt * sz
                y = tl.sum(cw, axis=0) + dtu * tl.sum(ct * bt, axis=0)
                if HAS_D:
                    y += dskip * u
                dz = dout * y * sz * (1.0 + zt * (1.0 - sz))
                tl.store(dz_ptr + po, dz.to(dz_ptr.dtype.element_ty), mask=md)
            else:
                dy = dout
            ddt = q + run
            if SOFTPLUS:
                ddt = ddt * sg
            tl.store(ddl_ptr + po, ddt.to(ddl_ptr.dtype.element_ty), mask=md)
            if HAS_BIAS:
                dbias_acc += ddt
            run -= dy * tl.sum(cw * A_nat, axis=0)
            dpre += dt
            dA_acc -= cw * (dy * (dtot - dpre))[None, :]
            tl.atomic_add(dC_ptr + pn, tl.sum(h * dy[None, :], axis=1), mask=mn, sem="relaxed")
            po += DM
            pn += N
            pq += BD
        tl.debug_barrier()
    sl = pid_b * NSEG + seg  # dA, dD and the bias gradient per (sequence, segment), summed afterwards
    tl.store(dA_ptr + sl * DM * N + s_off, dA_acc, mask=mnd)
    if HAS_D:
        tl.store(dD_ptr + sl * DM + cols, dD_acc, mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + sl * DM + cols, dbias_acc, mask=md)
    if HAS_H0:
        if seg == 0:
            tl.store(dh0_ptr + st_off, mu, mask=mnd)


def _sel_use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; the PyTorch reference otherwise."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _sel_asm() -> bool:
    """Inline PTX (the fast logarithm) only when compiling for the GPU, not under the interpreter."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _sel_config(DM: int, N: int, config: dict | None) -> dict:
    """Channels per program (all N states) and warps: FWD_BD / FWD_WARPS for the forward, BD / num_warps for the
    backward; CK steps between the forward's checkpoints (the backward's chunk); SEG segments of the length scanned
    in parallel (0: chosen from the shape, see `_sel_segments`). On the H100 at the reference shape (N 16) one warp
    of 32 channels (a channel's 16 states as 4 x 4 per thread) was fastest for both; 64 channels per warp make the
    forward slower and spill in the backward, several warps add barriers. Wider states keep 512 state elements per
    warp (N 64: 8 channels), which keeps the backward's tiles in registers. BWD_REGS caps the backward's registers
    (0: no cap). It holds 220-255, so eight one-warp programs fit per SM and the loop waits on its own dependent
    chains (Nsight Compute: 1.9 warps per scheduler, issue slots 55% busy). On the H100 (graphed fwd+bwd) a cap of
    128 took N 16 at D 1024, 64 x 1024, from 3.315 to 3.209 ms (168: 3.461), and 168 took ttsm's shape from 1.309 to
    1.273 (128: 1.70, 200: 1.57)."""
    bn = triton.next_power_of_2(N)
    bd = max(8, 512 // bn)
    regs = 128 if bn <= 16 else 168
    cfg = {"BD": bd, "CK": 128, "BN": bn, "num_warps": 1, "FWD_BD": bd, "FWD_WARPS": 1, "SEG": 0, "BWD_REGS": regs}
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg.update(BD=4, CK=8, FWD_BD=8)
    if config:
        cfg.update(config)
    for key in ("BD", "FWD_BD"):
        cfg[key] = min(cfg[key], max(triton.next_power_of_2(DM), 1))
    return cfg


SEL_PROGRAMS = 1024  # below this many (sequence, channel block) programs the length is split into segments


def _sel_segments(Bsz: int, T: int, DM: int, bd: int, cfg: dict) -> tuple[int, int]:
    """(segments, steps per segment, a multiple of CK). A step-sequential program is latency-bound, so a small
    batch leaves the GPU idle: split the length into segments scanned in parallel, joined by a short carry (each
    segment's state from zero, then the true start state through the earlier segments' summaries)."""
    ck = cfg["CK"]
    n_ck = triton.cdiv(T, ck)
    seg = cfg["SEG"]
    if seg <= 0:
        programs = Bsz * triton.cdiv(DM, bd)
        seg = triton.cdiv(SEL_PROGRAMS, programs) if programs < SEL_PROGRAMS else 1
    seg = max(1, min(seg, n_ck))
    ls = triton.cdiv(n_ck, seg) * ck
    return triton.cdiv(T, ls), ls


def _sel_offsets_fit(T: int, DM: int, N: int) -> None:
    """The forward addresses a sequence's rows with int32 offsets."""
    if (T + 1) * max(DM, N) >= 2**31:
        raise ValueError(f"selective_scan: T * max(Dm, N) must stay below 2^31, got T {T}, Dm {DM}, N {N}")


def _sel_check(u, delta, A, B, C, D, z, delta_bias, h0) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (B, T, Dm), got shape {tuple(u.shape)}")
    Bsz, T, DM = u.shape
    if A.dim() != 2 or A.shape[0] != DM:
        raise ValueError(f"selective_scan: A must be (Dm={DM}, N), got shape {tuple(A.shape)}")
    N = A.shape[1]
    expected = {"delta": (delta, (Bsz, T, DM)), "B": (B, (Bsz, T, N)), "C": (C, (Bsz, T, N))}
    expected.update({"D": (D, (DM,)), "z": (z, (Bsz, T, DM)), "delta_bias": (delta_bias, (DM,))})
    expected["h0"] = (h0, (Bsz, DM, N))
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(x.shape)}")


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """Sequential reference of the selective scan; float32 math (float64 when u is float64), output in u's dtype."""
    _sel_check(u, delta, A, B, C, D, z, delta_bias, h0)
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    uf, dt, Bf, Cf, Af = u.to(cdt), delta.to(cdt), B.to(cdt), C.to(cdt), A.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)
    if delta_softplus:
        dt = F.softplus(dt)
    h = h0.to(cdt) if h0 is not None else uf.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * Af) * h + (dt[:, t] * uf[:, t])[:, :, None] * Bf[:, t, None, :]
        ys.append((h * Cf[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.to(cdt) * uf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(u.dtype)
    if return_final_state:
        return y, (h if cdt == torch.float64 else h.float())
    return y


def _sel_fin_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _sel_scan_impl(u, delta, A, B, C, D, z, delta_bias, h0, softplus, save, config):
    if not _sel_use_triton(u):
        y, fin = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, softplus, h0, True)
        return y, fin.to(_sel_fin_dtype(u)), scan_none(fin)
    Bsz, T, DM = u.shape
    N = A.shape[1]
    _sel_offsets_fit(T, DM, N)
    cfg = _sel_config(DM, N, scan_config_dict(config))
    u, delta, B, C = (x.contiguous() for x in (u, delta, B, C))
    A = A.float().contiguous()
    D = D.float().contiguous() if D is not None else None
    z = z.contiguous() if z is not None else None
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    h0c = h0.float().contiguous() if h0 is not None else None
    out = torch.empty_like(u)
    fin = torch.empty((Bsz, DM, N), device=u.device, dtype=torch.float32)
    n_ck = triton.cdiv(T, cfg["CK"])
    ck = torch.empty((Bsz, n_ck, DM, N), device=u.device, dtype=torch.float32) if save else fin
    nblk = triton.cdiv(DM, cfg["FWD_BD"])
    nseg, ls = _sel_segments(Bsz, T, DM, cfg["FWD_BD"], cfg)
    hl = torch.empty((Bsz, nseg, DM, N), device=u.device, dtype=torch.float32) if nseg > 1 else fin
    ds = torch.empty((Bsz, nseg, DM), device=u.device, dtype=torch.float32) if nseg > 1 else fin
    args = (
        u, delta, A, B, C,
        D if D is not None else A, z if z is not None else u, bias if bias is not None else A,
        h0c if h0c is not None else fin, out, ck, fin, hl, ds,
        T, DM, N, ls, nseg,
    )  # fmt: skip
    flags = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        HAS_H0=h0c is not None, SAVE_CK=save, EVEN_D=DM % cfg["FWD_BD"] == 0, EVEN_N=N == cfg["BN"],
        ASM=_sel_asm(), CK=cfg["CK"], BD=cfg["FWD_BD"], BN=cfg["BN"], num_warps=cfg["FWD_WARPS"],
    )  # fmt: skip
    if nseg > 1:
        _sel_fwd_kernel[(Bsz, nblk, nseg - 1)](*args, LOCAL=True, CARRY_IN=False, **flags)
    _sel_fwd_kernel[(Bsz, nblk, nseg)](*args, LOCAL=False, CARRY_IN=nseg > 1, **flags)
    return out, fin.to(_sel_fin_dtype(u)), ck if save else scan_none(fin)


def _sel_scan_fake(u, delta, A, B, C, D, z, delta_bias, h0, softplus, save, config):
    Bsz, T, DM = u.shape
    N = A.shape[1]
    fin = u.new_empty((Bsz, DM, N), dtype=_sel_fin_dtype(u))
    ck = u.new_empty(0, dtype=fin.dtype)
    if save and _sel_use_triton(u):
        ck_steps = _sel_config(DM, N, scan_config_dict(config))["CK"]
        n_ck = (T + ck_steps - 1) // ck_steps
        ck = u.new_empty((Bsz, n_ck, DM, N), dtype=torch.float32)
    return u.new_empty(u.shape), fin, ck


def _sel_scan_setup(ctx, inputs, output):
    ctx.softplus, ctx.config = inputs[9], inputs[11]
    ctx.save_for_backward(*inputs[:9], output[2])


def _sel_scan_backward(ctx, dy, dfin, dck):
    grads = _sel_scan_bwd_op(*ctx.saved_tensors, dy, dfin, ctx.softplus, ctx.config)
    return (*grads[:5], *(scan_opt(g) for g in grads[5:]), None, None, None)


def _sel_scan_bwd_impl(u, delta, A, B, C, D, z, delta_bias, h0, ck, dout, dfin, softplus, config):
    inputs = [u, delta, A, B, C, D, z, delta_bias, h0]
    if not _sel_use_triton(u):
        fwd = lambda *xs: _sel_scan_impl(*xs, softplus, False, config)[:2]  # noqa: E731
        return tuple(scan_ref_vjp(fwd, inputs, [dout, dfin]))
    if ck.numel() == 0:
        raise RuntimeError("selective_scan: backward needs the checkpoints; run the forward with grad enabled")
    Bsz, T, DM = u.shape
    N = A.shape[1]
    cfg = _sel_config(DM, N, scan_config_dict(config))
    u_c, delta_c, B_c, C_c = (x.contiguous() for x in (u, delta, B, C))
    A_c = A.float().contiguous()
    D_c = D.float().contiguous() if D is not None else None
    z_c = z.contiguous() if z is not None else None
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    h0c = h0.float().contiguous() if h0 is not None else None
    dout = dout.contiguous()
    dfin = dfin.float().contiguous()
    du, ddelta = torch.empty_like(u_c), torch.empty_like(delta_c)
    dz = torch.empty_like(z_c) if z is not None else None
    f32 = {"device": u.device, "dtype": torch.float32}
    dB = torch.zeros((Bsz, T, N), **f32)
    dC = torch.zeros((Bsz, T, N), **f32)
    dh0 = torch.empty((Bsz, DM, N), **f32) if h0c is not None else None
    nblk = triton.cdiv(DM, cfg["BD"])
    nseg, ls = _sel_segments(Bsz, T, DM, cfg["BD"], cfg)
    dA = torch.empty((Bsz * nseg, DM, N), **f32)
    dD = torch.empty((Bsz * nseg, DM), **f32) if D is not None else None
    dbias = torch.empty((Bsz * nseg, DM), **f32) if bias is not None else None
    ml = torch.empty((Bsz, nseg, DM, N), **f32) if nseg > 1 else dA
    ds = torch.empty((Bsz, nseg, DM), **f32) if nseg > 1 else dA
    scratch = torch.empty(Bsz * nblk * nseg * cfg["CK"] * cfg["BD"], **f32)
    args = (
        u_c, delta_c, A_c, B_c, C_c,
        D_c if D_c is not None else A_c, z_c if z_c is not None else u_c, bias if bias is not None else A_c,
        h0c if h0c is not None else dA, ck, dout, dfin, scratch,
        du, ddelta, dz if dz is not None else du, dA, dB, dC,
        dD if dD is not None else dA, dbias if dbias is not None else dA, dh0 if dh0 is not None else dA, ml, ds,
        T, DM, N, ls, nseg,
    )  # fmt: skip
    flags = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        HAS_H0=h0c is not None, HAS_DFIN=True, ASM=_sel_asm(), CK=cfg["CK"], BD=cfg["BD"], BN=cfg["BN"],
        num_warps=cfg["num_warps"], **({"maxnreg": cfg["BWD_REGS"]} if cfg["BWD_REGS"] > 0 else {}),
    )  # fmt: skip
    if nseg > 1:
        _sel_bwd_kernel[(Bsz, nblk, nseg - 1)](*args, 1, LOCAL=True, CARRY_IN=False, **flags)
    _sel_bwd_kernel[(Bsz, nblk, nseg)](*args, 0, LOCAL=False, CARRY_IN=nseg > 1, **flags)
    return (
        du,
        ddelta,
        dA.sum(0).to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD.sum(0).to(D.dtype) if dD is not None else scan_none(du),
        dz if dz is not None else scan_none(du),
        dbias.sum(0).to(delta_bias.dtype) if dbias is not None else scan_none(du),
        dh0.to(h0.dtype) if dh0 is not None else scan_none(du),
    )


def _sel_scan_bwd_fake(u, delta, A, B, C, D, z, delta_bias, h0, ck, dout, dfin, softplus, config):
    return tuple(
        x.new_empty(x.shape) if x is not None else scan_none(dout) for x in (u, delta, A, B, C, D, z, delta_bias, h0)
    )


_SEL_ARGS = "Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor? h0"


_sel_scan_bwd_op = scan_op(
    "sel_scan_bwd",
    f"({_SEL_ARGS}, Tensor ck, Tensor dout, Tensor dfin, bool softplus, str config) -> ({', '.join(['Tensor'] * 9)})",
    _sel_scan_bwd_impl,
    _sel_scan_bwd_fake,
)


_sel_scan_op = scan_op(
    "sel_scan",
    f"({_SEL_ARGS}, bool softplus, bool save, str config) -> (Tensor, Tensor, Tensor)",
    _sel_scan_impl,
    _sel_scan_fake,
    _sel_scan_backward,
    _sel_scan_setup,
)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
    config: dict | None = None,
):
    """Mamba-1 selective scan. u, delta, z: (B, T, Dm); A: (Dm, N) (negative reals); B, C: (B, T, N) (one group);
    D, delta_bias: (Dm,); h0: (B, Dm, N). dt = softplus(delta + delta_bias); h_t = exp(dt A) h_{t-1} + dt u_t B_t;
    y = C_t h_t + D u, times silu(z). Returns y (B, T, Dm) in u's dtype [and the final state (B, Dm, N), fp32].
    One op (ssm_golf::sel_scan); its chunk checkpoints are kept only when a backward can follow."""
    _sel_check(u, delta, A, B, C, D, z, delta_bias, h0)
    inputs = (u, delta, A, B, C, D, z, delta_bias, h0)
    save = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    y, fin, _ = _sel_scan_op(
        u, delta, A, B, C, D, z, delta_bias, h0, bool(delta_softplus), save, scan_config_str(config)
    )
    return (y, fin) if return_final_state else y


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
# TTSM's selective SSM (Mamba-1 style, PR #1999) on the scan core's `selective_scan`.
#
# (u, z) = in_proj(x); per step dt_t = softplus(conv(dt_proj u)_t), B_t = conv(B_proj u)_t, C_t = conv(C_proj u)_t
# (depthwise causal convs of K taps with zero-initialised biases, before the softplus), B and C L2-normalised over
# the state; h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t with A = -exp(A_log) per (channel, state), A_log initialised
# to log(n + 1); y_t = (C_t . h_t + D u_t) silu(z_t); out = out_proj(y) (zero-initialised). in_proj, B_proj,
# C_proj and out_proj follow the variant's linear kind (ternary there); dt_proj (full rank, no bias), A_log, D and
# the convolutions stay float. The state h is fp32 in the scan.
#
# `forward_stateful(x, state)` continues a sequence: the state is the conv tails and the scan's final h, so
# scoring two consecutive windows with the state carried equals scoring their concatenation.
# ---------------------------------------------------------------------------------------------------------------------

SelectiveState = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@register_mixer("selective")
class SelectiveSSM(nn.Module):
    OPTIONS = {
        "expand": ("SSM_EXPAND", 1),
        "state": ("SSM_STATE", 64),
        "conv": ("SSM_CONV", 4),
        "normalize_bc": ("SSM_NORMALIZE_BC", True),
    }

    def __init__(
        self, dim: int, linear: LinearMaker, expand: int = 1, state: int = 64, conv: int = 4, normalize_bc: bool = True
    ) -> None:
        super().__init__()
        inner = expand * dim
        self.inner, self.normalize_bc = inner, normalize_bc
        self.in_proj = linear(dim, 2 * inner)
        self.dt_proj = linear(inner, inner, body=False)
        self.B_proj = linear(inner, state)
        self.C_proj = linear(inner, state)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D_skip = nn.Parameter(torch.ones(inner))
        for name, width in (("dt", inner), ("B", state), ("C", state)):
            weight, bias = nn.Parameter(torch.empty(width, 1, conv)), nn.Parameter(torch.empty(width))
            conv_init_(weight, bias, zero_bias=True)
            self.register_parameter(f"{name}_conv_weight", weight)
            self.register_parameter(f"{name}_conv_bias", bias)
        self.out_proj = linear(inner, dim, zero_init=True)

    def _run(self, x: torch.Tensor, state: SelectiveState | None, want_state: bool):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        tails = state[0] if state is not None else (None, None, None)
        delta, dt_tail = causal_conv(self.dt_proj(u).float(), self.dt_conv_weight, self.dt_conv_bias, tails[0])
        b, b_tail = causal_conv(self.B_proj(u).float(), self.B_conv_weight, self.B_conv_bias, tails[1])
        c, c_tail = causal_conv(self.C_proj(u).float(), self.C_conv_weight, self.C_conv_bias, tails[2])
        if self.normalize_bc:
            b, c = F.normalize(b, dim=-1), F.normalize(c, dim=-1)
        A = -torch.exp(self.A_log.float())
        h0 = state[1] if state is not None else None
        out = selective_scan(
            u, delta, A, b, c, D=self.D_skip.float(), z=z, delta_softplus=True, h0=h0, return_final_state=want_state
        )
        if not want_state:
            return self.out_proj(out), None
        y, h = out
        return self.out_proj(y), ((dt_tail, b_tail, c_tail), h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, None, want_state=False)[0]

    def forward_stateful(self, x: torch.Tensor, state: SelectiveState | None) -> tuple[torch.Tensor, SelectiveState]:
        """(output, state to pass with the next window of the same sequences)."""
        return self._run(x, state, want_state=True)


# ---------------------------------------------------------------------------------------------------------------------
# Hashed n-gram input features (TTSM, PR #1999): small tables indexed by a hash of the current and previous
# tokens, projected to the model width and added to the token embedding with a learned scale.
#
#   bigram_hash    one table of BIGRAM_BUCKETS rows: bucket (36313 t_i XOR 27191 t_{i-1}) mod (buckets - 1);
#                  the first position of a window, which has no previous token, takes the last bucket
#   trigram_hash   two tables of TRIGRAM_BUCKETS rows, concatenated before the projection: the bigram hash
#                  mod buckets, and the same XOR 12979 t_{i-2}; positions without enough history take bucket 0
# In stateful scoring the previous window's last tokens are the history of a window's first positions.
#
# The tables are float (never ternary; the artifact stores them as float or int8). The projection starts at zero
# and the tables at N(0, NGRAM_INIT_STD^2): were both zero, as in the origin, neither would ever get a gradient.
# ---------------------------------------------------------------------------------------------------------------------

HASH_CURRENT, HASH_PREVIOUS, HASH_SECOND = 36313, 27191, 12979


def ngram_mix(ids: torch.Tensor, order: int) -> torch.Tensor:
    """The XOR mix of the last `order` tokens at every position (int64, same shape as ids); positions with fewer
    than order - 1 predecessors give -1."""
    ids = ids.long()
    mixed = ids * HASH_CURRENT
    for back, mult in ((1, HASH_PREVIOUS), (2, HASH_SECOND))[: order - 1]:
        previous = torch.zeros_like(ids)
        previous[..., back:] = ids[..., :-back] * mult
        mixed = mixed ^ previous
    mixed[..., : order - 1] = -1
    return mixed


def bigram_buckets(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    mixed = ngram_mix(ids, 2)
    return torch.where(mixed < 0, buckets - 1, mixed % (buckets - 1))


def trigram_buckets(ids: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    pair, triple = ngram_mix(ids, 2), ngram_mix(ids, 3)
    return pair.clamp_min(0) % buckets, triple.clamp_min(0) % buckets


class _HashedTables(nn.Module):
    def __init__(self, dim: int, tables: int, buckets: int, width: int, scale: float, init_std: float) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(buckets, width) for _ in range(tables))
        for table in self.tables:
            nn.init.normal_(table.weight, 0.0, init_std)
        self.proj = CastedLinear(tables * width, dim, zero_init=True)
        self.feature_scale = nn.Parameter(torch.tensor(float(scale)))
        self.buckets = buckets

    def forward_stateful(self, ids: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of a window with the previous window's last two tokens as history (state: those tokens)."""
        if state is None:
            return self(ids), ids[:, -2:]
        joined = torch.cat((state, ids), dim=1)
        return self(joined)[:, state.size(1) :], joined[:, -2:]

    def project(self, indices: tuple[torch.Tensor, ...]) -> torch.Tensor:
        rows = torch.cat([table(i) for table, i in zip(self.tables, indices)], dim=-1)
        out = self.proj(rows)
        return self.feature_scale.to(out.dtype) * out


@register_feature("bigram_hash")
class BigramHash(_HashedTables):
    OPTIONS = {
        "buckets": ("BIGRAM_BUCKETS", 3072),
        "width": ("BIGRAM_DIM", 16),
        "scale": ("BIGRAM_SCALE_INIT", 0.05),
        "init_std": ("NGRAM_INIT_STD", 0.02),
    }

    def __init__(
        self, vocab_size: int, dim: int, buckets: int = 3072, width: int = 16, scale: float = 0.05, init_std=0.02
    ) -> None:
        super().__init__(dim, 1, buckets, width, scale, init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project((bigram_buckets(ids, self.buckets),))


@register_feature("trigram_hash")
class TrigramHash(_HashedTables):
    OPTIONS = {
        "buckets": ("TRIGRAM_BUCKETS", 8192),
        "width": ("TRIGRAM_DIM", 16),
        "scale": ("TRIGRAM_SCALE_INIT", 0.1),
        "init_std": ("NGRAM_INIT_STD", 0.02),
    }

    def __init__(
        self, vocab_size: int, dim: int, buckets: int = 8192, width: int = 16, scale: float = 0.1, init_std=0.02
    ) -> None:
        super().__init__(dim, 2, buckets, width, scale, init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project(trigram_buckets(ids, self.buckets))


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
