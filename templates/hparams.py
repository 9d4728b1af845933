"""Hyperparameters: every knob is an environment variable (upstream's names where upstream has one).

The variant's defaults sit in VARIANT_DEFAULTS (written by `builder assemble`); the environment at run time wins.
"""

import os

VARIANT_DEFAULTS: dict[str, str] = {}


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
