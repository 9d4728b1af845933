"""Audit events (JSON lines written by the hook in the child) read back and turned into findings."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from validator.findings import Finding, error, note, warning
from validator.sandbox.hook.sitecustomize import hook_defeating_flags  # the hook's own parser: one reading of argv

# Programs a training script and its libraries legitimately start: the interpreter itself (torchrun's workers,
# compile pools), C/CUDA compilers and tools Triton and Inductor call, and GPU or library queries. `file` is what
# Python's platform.architecture() runs on the interpreter (seen in a 2-GPU compiled run on the H200 machine); it
# only reads.
ALLOWED_PROGRAMS = frozenset(
    {
        "cc",
        "gcc",
        "g++",
        "c++",
        "clang",
        "clang++",
        "ld",
        "as",
        "nvcc",
        "ptxas",
        "ptxas-blackwell",
        "fatbinary",
        "nvlink",
        "cuobjdump",
        "nvdisasm",
        "ldconfig",
        "nvidia-smi",
        "uname",
        "file",
    }
)
# Versioned or target-prefixed compiler drivers (x86_64-linux-gnu-gcc-13, clang-18) as Triton and Inductor find them.
COMPILER_RE = re.compile(r"^(?:[\w.]+-)*(?:gcc|g\+\+|cc|c\+\+|clang|clang\+\+)(?:-[\d.]+)?$")


def read_events(path: Path) -> list[dict]:
    """Every well-formed event line; a missing file gives no events (the hook never ran)."""
    if not path.is_file():
        return []
    events = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "kind" in event:
            events.append(event)
    return events


class LogWatch:
    """Watches the audit log from outside while the run goes: a log removed, replaced or shrunk mid-run was erased
    by the run (the hook only appends), even where it got past the hook (ctypes, a non-Python program)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.identity: tuple[int, int] | None = None
        self.peak = 0
        self.problem: str | None = None

    def check(self) -> None:
        if self.problem is not None:
            return
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            if self.identity is not None:
                self.problem = "was removed during the run"
            return
        except OSError:
            return
        identity = (stat.st_dev, stat.st_ino)
        if self.identity is None:
            self.identity = identity
        elif identity != self.identity:
            self.problem = "was replaced by another file during the run"
        if stat.st_size < self.peak:
            self.problem = f"shrank from {self.peak:,} to {stat.st_size:,} bytes during the run"
        self.peak = max(self.peak, stat.st_size)


def _is_python(executable: str) -> bool:
    return os.path.basename(executable).startswith("python")


def spawn_is_allowed(event: dict, allowed: frozenset[str]) -> bool:
    argv = [str(a) for a in event.get("argv") or []]
    executable = str(event.get("executable") or (argv[0] if argv else ""))
    name = os.path.basename(executable)
    if _is_python(executable):
        return not event.get("unhooked") and not hook_defeating_flags(argv)
    return name in allowed or bool(COMPILER_RE.match(name))


def audit_findings(
    events: list[dict],
    log_name: str,
    expected: bool = True,
    extra_programs: tuple[str, ...] = (),
    injected: bool = False,
    log_problem: str | None = None,
) -> list[Finding]:
    """Findings from a run's audit events. `expected`: the hook should have run (a Python child). `injected`: the
    sandbox put the hook in (then a log that is missing, empty, or does not begin with the start record of the first
    process was erased by the run); `log_problem`: what LogWatch saw happen to the log during the run."""
    allowed = ALLOWED_PROGRAMS | frozenset(extra_programs)
    findings: list[Finding] = []
    if injected and (log_problem or not events or events[0]["kind"] != "start"):
        what = log_problem or (
            "is missing or empty" if not events else "does not begin with the hook's start record (truncated)"
        )
        msg = (
            f"the audit log of this run {what}: the sandbox injected the audit hook, so the run erased its own "
            "audit trail; file, network and spawn activity cannot be vouched for"
        )
        findings.append(error("AUDIT_TAMPER", msg, log_name))
    elif expected and not any(e["kind"] == "start" for e in events):
        findings.append(
            warning(
                "AUDIT_NOT_ACTIVE",
                "the audit hook recorded no process start: file, network and spawn activity was not observed",
                log_name,
            )
        )
    seen: set[tuple[str, str]] = set()
    for e in events:
        kind = e["kind"]
        if kind == "network":
            key = (kind, str(e.get("address")))
            if key not in seen:
                seen.add(key)
                refused = " (refused)" if e.get("refused") else ""
                findings.append(
                    error("AUDIT_NETWORK", f"network access attempted: {e.get('event')} {e.get('address')}{refused}")
                )
        elif kind in ("read_outside", "write_outside"):
            key = (kind, str(e.get("path")))
            if key not in seen:
                seen.add(key)
                verb = "read" if kind == "read_outside" else "written"
                code = "AUDIT_READ_OUTSIDE" if kind == "read_outside" else "AUDIT_WRITE_OUTSIDE"
                findings.append(error(code, f"file {verb} outside the allowed roots: {e.get('path')}"))
        elif kind == "spawn" and not spawn_is_allowed(e, allowed):
            argv = " ".join(str(a) for a in (e.get("argv") or [e.get("executable")]))
            key = (kind, argv)
            if key not in seen:
                seen.add(key)
                if e.get("unhooked") or _is_python(str(e.get("executable") or "")):
                    why = e.get("unhooked") or f"interpreter option -{hook_defeating_flags(e.get('argv') or [])}"
                    msg = (
                        f"started a Python child without the audit hook ({why}): {argv[:200]}; keep the inherited "
                        "environment and drop -I/-S/-E"
                    )
                else:
                    msg = (
                        f"started a program the sandbox cannot audit: {argv[:200]} (allow it with --allow-exec NAME "
                        "if the README justifies it)"
                    )
                findings.append(error("AUDIT_SUBPROCESS", msg))
        elif kind == "tamper":
            op = e.get("op") or "open"
            msg = f"the script tried to {op} the audit log or its folder ({e.get('target') or e.get('path')}): refused"
            findings.append(error("AUDIT_TAMPER", msg))
        elif kind == "truncated":  # only spawns of programs allowed whatever their arguments are capped
            findings.append(note("AUDIT_TRUNCATED", str(e.get("detail"))))
        elif kind == "hook_error":
            msg = f"the audit hook could not judge a {e.get('event')} event: {e.get('detail')}"
            findings.append(warning("AUDIT_HOOK_ERROR", msg))
    return findings
