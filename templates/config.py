"""The model's declaration: which mixer (or mixers) and MLP sit at each depth, how the depth loops, which skips
join the halves, how wide everything is. The stack is built from a `ModelConfig` alone.

LAYER_PATTERN lists positions separated by commas and is repeated until NUM_LAYERS positions are filled:
  "attention"                 one mixer, then the default MLP (MLP_KIND)
  "attention|lti_mamba2"      two mixers in parallel on the same normed input, each with its own learned scale
  "attention+selective"       two mixers one after the other, each its own residual step
  "selective:none"            a position's own MLP kind (relu2, leaky_relu2, swiglu or none)
so "s6,s6,s6,attention" with NUM_LAYERS=9 puts attention at depths 3 and 7.
"""

import dataclasses
from typing import Any

from templates.hparams import env_flag, env_float, env_int, env_list, env_str
from templates.registry import FEATURES, MIXERS, lookup

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
