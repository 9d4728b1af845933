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
from validator.sandbox.audit import LogWatch, read_events
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
def bwrap_path() -> str | None:
    """Debian's `bwrap` (package bubblewrap) when it is installed and can make its namespaces here, else None."""
    bwrap = shutil.which("bwrap")
    if bwrap is None or not sys.platform.startswith("linux"):
        return None
    probe = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-net", "true"]
    try:
        return bwrap if subprocess.run(probe, capture_output=True, timeout=20).returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def bwrap_prefix(bwrap: str, dirs, network: bool, read_roots: list[str] = ()) -> list[str]:
    """The filesystem read-only but the session folder (work copy, home, temp, audit log), a private /tmp and
    /dev/shm, devices (GPUs) passed through, and its own network namespace (loopback only) unless `network`.
    Read roots that the private /tmp would hide (data, tokenizer, PYTHONPATH under /tmp) are bound read-only."""
    session = str(dirs.root)
    work = str(dirs.work)
    cmd = [bwrap, "--die-with-parent", "--ro-bind", "/", "/", "--dev-bind", "/dev", "/dev", "--proc", "/proc"]
    cmd += ["--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    for root in read_roots:
        hidden = root.startswith(("/tmp/", "/dev/shm/")) and not root.startswith(session + os.sep)
        if hidden and os.path.exists(root):
            cmd += ["--ro-bind", root, root]
    cmd += ["--bind", session, session]
    if not work.startswith(session + os.sep):
        cmd += ["--bind", work, work]
    if not network:
        cmd += ["--unshare-net"]
    return [*cmd, "--chdir", work, "--"]


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
    bwrap = bwrap_path() if request.bwrap else None
    if bwrap is not None:
        # the filesystem is enforced by bwrap; the network too unless the run needs it (multi-node)
        no_net = not request.network_allowed and request.netns
        isolation = "bwrap+netns" if no_net else ("bwrap, network allowed" if request.network_allowed else "bwrap")
        visible = [
            str(Path(p).resolve())
            for p in [
                *(str(x) for x in request.extra_read_roots),
                *(str(x) for x in (request.data_dir, request.tokenizer) if x),
                *os.environ.get("PYTHONPATH", "").split(os.pathsep),
                # the interpreter's own tree (a virtual environment under /tmp, say): the private /tmp hides it
                *sorted({sys.prefix, sys.exec_prefix, sys.base_prefix, *sys.path}),
            ]
            if p
        ]
        full_command = [*bwrap_prefix(bwrap, dirs, network=not no_net, read_roots=visible), *command]
    else:
        if request.network_allowed:
            isolation = "allowed (no bwrap: filesystem not enforced)"
        else:
            prefix = unshare_prefix() if request.netns else None
            isolation = ("netns" if prefix else "audit-hook") + " (no bwrap: filesystem not enforced)"
        full_command = [*prefix, python, str(dirs.hook / "netns.py"), "--", *command] if prefix else command

    data = str(request.data_dir.resolve()) if request.data_dir else None
    tokenizer = str(request.tokenizer.resolve()) if request.tokenizer else None
    mine = [str(p) for p in (dirs.work, dirs.home, dirs.tmp)]
    extra = [str(Path(p).resolve()) for p in request.extra_read_roots]
    read_roots = [*mine, str(dirs.hook), *SYSTEM_READ_ROOTS, *extra, *(p for p in (data, tokenizer) if p)]
    write_roots = [*mine, *SYSTEM_WRITE_ROOTS]
    blocked = not request.network_allowed
    env = child_env(request, dirs, data, tokenizer, read_roots, write_roots, blocked, keep_pythonpath=True)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""

    dirs.audit_log.touch()  # made here, so that a log removed or replaced during the run shows
    log_watch = LogWatch(dirs.audit_log)
    log_watch.check()
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
        log_watch.check()

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
    log_watch.check()
    return SandboxResult(
        command=full_command,
        returncode=None if reason else returncode,
        killed=reason,
        wall_s=wall,
        lines=lines,
        phases=phase_spans(lines, request.limits.pause_budget_s),
        audit_events=read_events(dirs.audit_log),
        work_dir=dirs.work,
        network_isolation=isolation,
        audit_log=dirs.audit_log,
        audit_log_problem=log_watch.problem,
    )
