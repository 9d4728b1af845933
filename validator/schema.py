"""The strict submission.json of ssm-golf (what `builder` writes and `validator` expects of our own folders)."""

from __future__ import annotations

import datetime as _dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CAP_BYTES = 16_000_000
TRACKS = ("10min_16mb", "non_record_16mb")
Track = Literal["10min_16mb", "non_record_16mb"]

# `env`: the hyperparameter overrides of the recorded runs (`builder run --env`), applied again by `validator rerun`.
# The file is the submitter's, so only names shaped like a hyperparameter, and none that the validator sets itself,
# that a launcher sets, or that changes how the interpreter, the loader, the sandbox or the toolchain starts.
ENV_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]*")
ENV_RESERVED = frozenset(
    "SEED RUN_ID DATA_PATH TOKENIZER_PATH TOKEN_LOSSES EVAL_ONLY ARTIFACT PATH HOME TMPDIR SHELL ENV BASH_ENV IFS "
    "RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK MASTER_ADDR MASTER_PORT".split()
)
ENV_RESERVED_PREFIXES = (
    "PYTHON", "LD_", "DYLD_", "SSM_GOLF_", "TRITON_", "TORCH", "CUDA_", "NCCL_", "NVIDIA_", "OMP_", "MKL_",
    "MALLOC_", "GLIBC_", "GCONV_", "LOCPATH", "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN",
)  # fmt: skip


def env_name_problem(name: str) -> str | None:
    """Why `name` cannot be a recorded override in submission.json's `env` (None when it can)."""
    if not ENV_NAME_RE.fullmatch(name):
        return "not an upper-case hyperparameter name"
    if name in ENV_RESERVED or name.startswith(ENV_RESERVED_PREFIXES):
        return "set by the launcher or the validator, or changes how the process starts"
    return None


class SeedResult(BaseModel):
    """One seed's figures, as read from its log."""

    model_config = ConfigDict(extra="forbid")

    val_loss: float
    val_bpb: float
    artifact_bytes: int = Field(ge=0)
    bytes_model: int = Field(ge=0)
    bytes_code: int = Field(ge=0)
    steps: int = Field(ge=0)
    train_time_ms: float = Field(ge=0)
    eval_time_ms: float = Field(ge=0)
    score_tag: str
    log: str


class Submission(BaseModel):
    """submission.json: metadata written at assembly, results filled in by `builder collect`."""

    model_config = ConfigDict(extra="forbid")

    author: str
    github_id: str
    name: str
    blurb: str
    date: str
    track: Track = "non_record_16mb"
    variant: str
    env: dict[str, str] = Field(default_factory=dict)  # overrides of the recorded runs; `validator rerun` applies them
    val_bpb: float | None = None
    val_loss: float | None = None
    val_bpb_std: float | None = None
    bytes_total: int | None = Field(default=None, ge=0)
    bytes_code: int | None = Field(default=None, ge=0)
    seeds: list[int] = Field(default_factory=list)
    seed_results: dict[str, SeedResult] = Field(default_factory=dict)
    hardware: str = ""
    pytorch_version: str = ""

    @field_validator("date")
    @classmethod
    def _iso_date(cls, v: str) -> str:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
            raise ValueError("date must be YYYY-MM-DD")
        _dt.date.fromisoformat(v)
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if problem := env_name_problem(name):
                raise ValueError(f"{name}: {problem}")
        return v

    @model_validator(mode="after")
    def _results_agree(self) -> Submission:
        if self.seed_results:
            if sorted(int(s) for s in self.seed_results) != sorted(self.seeds):
                raise ValueError("seeds must list exactly the keys of seed_results")
            if self.val_bpb is None or self.bytes_total is None:
                raise ValueError("val_bpb and bytes_total are required once seed_results are filled in")
        return self


# --- additions for the validator (constants of the rules; the models above are unchanged) ---

TRAIN_LIMIT_MS = 600_000.0  # every step that touches training data, GPTQ calibration included
EVAL_LIMIT_MS = 600_000.0  # the scored evaluation pass, in addition to training
TRACK_DIRS = {"10min_16mb": "track_10min_16mb", "non_record_16mb": "track_non_record_16mb"}


def strict_problems(data: object) -> list[str]:
    """The ways `data` departs from the strict ssm-golf model, one short line each (empty when it conforms)."""
    from pydantic import ValidationError

    try:
        Submission.model_validate(data)
    except ValidationError as exc:
        return [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()]
    return []
