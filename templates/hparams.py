"""Hyperparameters: every knob read from an environment variable, upstream names first.

`builder assemble` writes the variant's defaults into VARIANT_DEFAULTS; the environment still wins at run time.
"""

import os

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
