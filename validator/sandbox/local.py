"""Local backend: the submission's command in its own process group, scrubbed environment, work-dir copy,
the same limits as the container, and no network as far as this machine allows (a fresh network namespace
where `unshare` is permitted, and in every case the audit hook refusing connections)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from validator.sandbox import processes
from validator.sandbox.audit import read_events
from validator.sandbox.capture import LineCapture, watch
from validator.sandbox.layout import (
    SYSTEM_READ_ROOTS,
    SYSTEM_WRITE_ROOTS,
    SandboxError,
    child_env,
    launch_command,
    make_session,
    wants_torchrun,
)
from validator.sandbox.phases import phase_spans
from validator.sandbox.request import SandboxRequest, SandboxResult

NETNS_HELPER = Path(__file__).resolve().parent / "netns.py"


@functools.lru_cache(maxsize=1)
def unshare_prefix() -> tuple[str, ...] | None:
    """`unshare -n` (root) or `unshare -rn` (unprivileged user namespace), whichever works here; None if neither."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    options = (["-n"], ["-rn"]) if os.geteuid() == 0 else (["-rn"],)
    for opts in options:
        probe = [unshare, *opts, sys.executable, str(NETNS_HELPER), "--", "true"]
        try:
            ok = subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return (unshare, *opts)
    return None


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def run_local(request: SandboxRequest) -> SandboxResult:
    dirs = make_session(request)
    gpus = cuda_available() if request.gpus is None else request.gpus
    python = sys.executable
    command = launch_command(request.launch, request.script, python, wants_torchrun(request.launch, gpus))
    prefix = None
    if request.network_allowed:
        isolation = "allowed"
    else:
        prefix = unshare_prefix() if request.netns else None
        isolation = "netns" if prefix else "audit-hook"
    full_command = [*prefix, python, str(dirs.hook / "netns.py"), "--", *command] if prefix else command

    data = str(request.data_dir.resolve()) if request.data_dir else None
    tokenizer = str(request.tokenizer.resolve()) if request.tokenizer else None
    mine = [str(p) for p in (dirs.work, dirs.home, dirs.tmp)]
    extra = [str(Path(p).resolve()) for p in request.extra_read_roots]
    read_roots = [*mine, str(dirs.hook), *SYSTEM_READ_ROOTS, *extra, *(p for p in (data, tokenizer) if p)]
    write_roots = [*mine, *SYSTEM_WRITE_ROOTS]
    blocked = isolation != "allowed"
    env = child_env(request, dirs, data, tokenizer, read_roots, write_roots, blocked, keep_pythonpath=True)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""

    processes.become_subreaper()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            full_command,
            cwd=dirs.work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise SandboxError(f"{full_command[0]}: cannot start the run ({exc})") from exc
    capture = LineCapture(iter(lambda: proc.stdout.read1(65536), b""), start, request.echo)
    seen: set[int] = set()

    def remember() -> None:
        seen.update(processes.descendants(proc.pid))

    reason = watch(capture, lambda: proc.poll() is not None, request.limits, remember)
    if reason:
        processes.kill_all({proc.pid} | seen | processes.descendants(proc.pid))
    leftovers = {p for p in seen | processes.descendants(proc.pid) if processes.alive(p)}
    if leftovers:  # a background process the script left behind must not outlive the run
        processes.kill_all(leftovers, grace_s=1.0)
    returncode = proc.wait()
    wall = time.monotonic() - start
    capture.join(timeout=5.0)
    proc.stdout.close()
    lines = capture.snapshot()
    return SandboxResult(
        command=full_command,
        returncode=None if reason else returncode,
        killed=reason,
        wall_s=wall,
        lines=lines,
        phases=phase_spans(lines),
        audit_events=read_events(dirs.audit_log),
        work_dir=dirs.work,
        network_isolation=isolation,
        audit_log=dirs.audit_log,
    )
