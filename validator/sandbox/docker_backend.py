"""Docker backend: the same run inside the ssm-golf image through the docker SDK.

`container_spec` builds every keyword of `containers.run` from the request (tests inspect it without an
engine): GPUs, `network_mode="none"`, data and tokenizer mounted read-only, the work copy writable, shared
memory and memlock for NCCL, a non-root user, a read-only root filesystem, dropped capabilities, a process cap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from validator.sandbox.audit import read_events
from validator.sandbox.capture import LineCapture, watch
from validator.sandbox.layout import (
    SYSTEM_READ_ROOTS,
    SYSTEM_WRITE_ROOTS,
    SandboxError,
    SessionDirs,
    child_env,
    launch_command,
    make_session,
    wants_torchrun,
)
from validator.sandbox.phases import phase_spans
from validator.sandbox.request import SandboxRequest, SandboxResult

INSIDE = SessionDirs(
    root=Path("/sandbox"),
    work=Path("/sandbox/work"),
    hook=Path("/sandbox/hook"),
    audit=Path("/sandbox/audit"),
    home=Path("/sandbox/home"),
    tmp=Path("/sandbox/tmp"),
)
DATA_INSIDE = "/data/dataset"
TOKENIZER_DIR_INSIDE = "/data/tokenizer"
IMAGE_USER = "1000:1000"  # the image's non-root user (see Dockerfile)
SHM_SIZE = "16g"
PIDS_LIMIT = 8192
KEPT_HOST_ENV_PREFIXES = ("NCCL_", "TORCH_CUDA_ARCH_LIST", "TORCH_SYMM_MEM_", "NVSHMEM_")  # multicast switches too


def _user() -> str:
    """The caller's uid:gid, so files in the work copy stay the caller's; root callers run as the image user."""
    uid, gid = os.getuid(), os.getgid()
    return IMAGE_USER if uid == 0 else f"{uid}:{gid}"


def container_spec(request: SandboxRequest, dirs: SessionDirs, gpus: bool) -> dict:
    """Keyword arguments of `docker.from_env().containers.run(**spec)` for this request."""
    command = launch_command(request.launch, request.script, "python", wants_torchrun(request.launch, gpus))
    volumes: dict[str, dict[str, str]] = {
        str(dirs.work): {"bind": str(INSIDE.work), "mode": "rw"},
        str(dirs.hook): {"bind": str(INSIDE.hook), "mode": "ro"},
        str(dirs.audit): {"bind": str(INSIDE.audit), "mode": "rw"},
        str(dirs.home): {"bind": str(INSIDE.home), "mode": "rw"},
        str(dirs.tmp): {"bind": str(INSIDE.tmp), "mode": "rw"},
    }
    data_path = tokenizer_path = None
    if request.data_dir is not None:
        volumes[str(request.data_dir.resolve())] = {"bind": DATA_INSIDE, "mode": "ro"}
        data_path = DATA_INSIDE
    if request.tokenizer is not None:
        tokenizer_path = f"{TOKENIZER_DIR_INSIDE}/{request.tokenizer.name}"
        volumes[str(request.tokenizer.resolve())] = {"bind": tokenizer_path, "mode": "ro"}
    extra = []
    for root in request.extra_read_roots:
        resolved = str(Path(root).resolve())
        volumes[resolved] = {"bind": resolved, "mode": "ro"}
        extra.append(resolved)
    mine = [str(INSIDE.work), str(INSIDE.home), str(INSIDE.tmp)]
    read_roots = [*mine, str(INSIDE.hook), *SYSTEM_READ_ROOTS, *extra]
    read_roots += [p for p in (data_path, tokenizer_path) if p]
    host_env = {k: v for k, v in os.environ.items() if k.startswith(KEPT_HOST_ENV_PREFIXES)}
    env = child_env(
        request,
        INSIDE,
        data_path,
        tokenizer_path,
        read_roots,
        [*mine, *SYSTEM_WRITE_ROOTS],
        block_network=not request.network_allowed,
        base=host_env,
    )
    spec: dict = {
        "image": request.image,
        "command": command,
        "entrypoint": [],  # run the command itself, not the image's CLI entrypoint
        "working_dir": str(INSIDE.work),
        "environment": env,
        "volumes": volumes,
        "network_mode": "host" if request.network_allowed else "none",  # NCCL across nodes needs the host's
        "user": _user(),
        "shm_size": SHM_SIZE,
        "ulimits": [
            {"Name": "memlock", "Soft": -1, "Hard": -1},
            {"Name": "stack", "Soft": 67108864, "Hard": 67108864},
        ],
        "pids_limit": PIDS_LIMIT,
        "read_only": True,
        "tmpfs": {"/tmp": "rw,size=1g"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "labels": {"ssm-golf.session": str(dirs.root)},
        "detach": True,
        "device_requests": [{"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}] if gpus else [],
    }
    return spec


def _sdk_spec(spec: dict) -> dict:
    """Replace the plain dicts of ulimits and device requests with the SDK's types."""
    from docker.types import DeviceRequest, Ulimit

    out = dict(spec)
    out["ulimits"] = [Ulimit(name=u["Name"], soft=u["Soft"], hard=u["Hard"]) for u in spec["ulimits"]]
    out["device_requests"] = [
        DeviceRequest(driver=d["Driver"], count=d["Count"], capabilities=d["Capabilities"])
        for d in spec["device_requests"]
    ]
    return out


def _client():
    try:
        import docker
    except ImportError as exc:
        msg = "the docker backend needs the docker SDK: pip install docker (or use --backend local)"
        raise SandboxError(msg) from exc
    try:
        return docker.from_env()
    except docker.errors.DockerException as exc:
        raise SandboxError(f"no Docker engine reachable ({exc}); start it, or use --backend local") from exc


def _hand_writable_dirs_to(user: str, dirs: SessionDirs) -> None:
    if os.getuid() != 0:
        return
    uid, gid = (int(x) for x in user.split(":"))
    for top in (dirs.work, dirs.audit, dirs.home, dirs.tmp):
        for path in [top, *top.rglob("*")]:
            os.chown(path, uid, gid, follow_symlinks=False)


def run_docker(request: SandboxRequest, client=None) -> SandboxResult:
    """Run in a container; `client` is a docker SDK client (made from the environment when None)."""
    dirs = make_session(request)
    gpus = True if request.gpus is None else request.gpus
    spec = container_spec(request, dirs, gpus)
    _hand_writable_dirs_to(spec["user"], dirs)
    client = client or _client()
    start = time.monotonic()
    container = client.containers.run(**_sdk_spec(spec))
    try:
        capture = LineCapture(container.logs(stream=True, follow=True), start, request.echo)
        reason = watch(capture, lambda: not capture.thread.is_alive(), request.limits)
        if reason:
            container.kill()
        status = container.wait(timeout=60)
        wall = time.monotonic() - start
        capture.join(timeout=5.0)
    finally:
        container.remove(force=True)
    lines = capture.snapshot()
    return SandboxResult(
        command=list(spec["command"]),
        returncode=None if reason else int(status.get("StatusCode", -1)),
        killed=reason,
        wall_s=wall,
        lines=lines,
        phases=phase_spans(lines, request.limits.pause_budget_s),
        audit_events=read_events(dirs.audit_log),
        work_dir=dirs.work,
        network_isolation="allowed" if request.network_allowed else "docker-network-none",
        audit_log=dirs.audit_log,
    )
