"""What a sandboxed run is asked to do (SandboxRequest) and what it gives back (SandboxResult)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Backend = Literal["local", "docker"]
Launcher = Literal["auto", "torchrun", "python"]
PAUSE_BUDGET_FRACTION = 0.5  # of the train limit: the validation a phase's clock may leave out (Limits.pause_budget_s)


@dataclass(frozen=True)
class Limits:
    """Wall-clock limits in seconds, measured outside the script."""

    train_s: float = 600.0
    eval_s: float = 600.0
    setup_s: float = 600.0  # everything outside the train and eval phases: imports, compile, serialisation
    grace_s: float = 30.0  # a phase may overrun its limit this long (the step in flight) before the hard kill

    @property
    def pause_budget_s(self) -> float:
        """The most `phase:val` time a phase may leave out of its clock; validation beyond it counts as phase time.

        Upstream's training clock leaves out the validation passes made while training, but an unbounded pause lets
        a script train inside "validation". Half the train limit (300 s of a 600 s limit, and never more than one
        eval limit) is several times what the in-training passes of an honest run take (VAL_LOSS_EVERY=1000 gives
        one pass per 1000 steps, each no longer than the final scored eval), so it never costs an honest run.
        """
        return min(PAUSE_BUDGET_FRACTION * self.train_s, self.eval_s)

    @property
    def total_s(self) -> float:
        """The hard kill for the whole run, whatever its phases say."""
        return self.train_s + self.eval_s + self.setup_s

    def phase_limit(self, phase: str) -> float | None:
        return {"train": self.train_s, "eval": self.eval_s}.get(phase)


@dataclass(frozen=True)
class Launch:
    """How the script is started: plain python (CPU, one process) or torchrun with its own rendezvous options."""

    nproc: int = 1
    launcher: Launcher = "auto"
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, required when nnodes > 1
    rdzv_backend: str = "c10d"
    rdzv_id: str | None = None
    torchrun_args: tuple[str, ...] = ()  # any further torchrun option, passed through untouched


@dataclass
class SandboxRequest:
    """One run of one submission script with one environment."""

    submission: Path  # the folder to copy; it is never written to
    session_dir: Path  # new or empty folder for the work copy, audit log, home and temp of this run
    env: dict[str, str] = field(default_factory=dict)  # hyperparameters, SEED, RUN_ID, ...
    script: str = "train_gpt.py"
    data_dir: Path | None = None  # mounted read-only and given as DATA_PATH
    tokenizer: Path | None = None  # mounted read-only and given as TOKENIZER_PATH
    inputs: dict[str, Path] = field(default_factory=dict)  # extra files copied into the work dir (name -> source)
    backend: Backend = "local"
    launch: Launch = field(default_factory=Launch)
    limits: Limits = field(default_factory=Limits)
    gpus: bool | None = None  # None: use CUDA when the machine has it
    allow_network: bool = False
    netns: bool = True  # local backend: a fresh network namespace where permitted (False: the audit hook alone)
    bwrap: bool = True  # local backend: bubblewrap (read-only filesystem but the session, own /tmp) where installed
    extra_read_roots: tuple[Path, ...] = ()
    image: str = "ssm-golf:latest"  # docker backend only
    echo: bool = False  # also print the child's lines as they come
    work_dir: Path | None = None  # where the work copy goes (new or empty); default: session_dir/work

    @property
    def network_allowed(self) -> bool:
        """Multi-node runs need the network for their rendezvous and collectives."""
        return self.allow_network or self.launch.nnodes > 1


@dataclass(frozen=True)
class PhaseSpan:
    """One phase as seen from outside: seconds since launch of its begin and end marker lines."""

    begin: float | None
    end: float | None
    open_since: float | None = None  # the last begin with no end after it: the phase is still running
    paused_s: float = 0.0  # finished `phase:val` spans inside it (validation while training is not training time)
    paused_since: float | None = None  # a `phase:val` span inside it still running
    pause_budget_s: float = float("inf")  # the most validation left out of its clock (Limits.pause_budget_s)

    @property
    def seconds(self) -> float | None:
        """Its length, less the validation inside it (at most the pause budget)."""
        if self.begin is None or self.end is None:
            return None
        return self.end - self.begin - min(self.paused_s, self.pause_budget_s)

    def paused_at(self, now: float) -> float:
        """Validation inside it so far at `now`, whether or not past the budget."""
        return self.paused_s + (now - self.paused_since if self.paused_since is not None else 0.0)

    def elapsed(self, now: float) -> float:
        """Its length so far at `now`, less the validation inside it (at most the pause budget)."""
        pause = min(self.paused_at(now), self.pause_budget_s)
        return now - (self.begin if self.begin is not None else now) - pause


@dataclass
class SandboxResult:
    """What came back: exit status, every output line with its arrival time, phases, audit events."""

    command: list[str]
    returncode: int | None  # None when killed before it exited by itself
    killed: str | None  # why the sandbox killed the run, None when it ended by itself
    wall_s: float
    lines: list[tuple[float, str]]  # (seconds since launch, line without newline)
    phases: dict[str, PhaseSpan]
    audit_events: list[dict]
    work_dir: Path
    network_isolation: str  # "netns", "docker-network-none", "audit-hook", or "allowed"
    audit_log: Path | None = None
    audit_log_problem: str | None = None  # what was seen happen to the audit log during the run (LogWatch)

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)
