"""The session folder of one sandboxed run, the work copy of the submission, and the child's command and environment."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from validator.sandbox.audit import ALLOWED_PROGRAMS, COMPILER_RE
from validator.sandbox.request import Launch, SandboxRequest

HOOK_SOURCE = Path(__file__).resolve().parent / "hook" / "sitecustomize.py"
NETNS_SOURCE = Path(__file__).resolve().parent / "netns.py"
# Read-only system trees a CUDA/Python process legitimately opens (drivers, libraries, /proc and /sys queries).
SYSTEM_READ_ROOTS = ("/proc", "/sys", "/dev", "/etc", "/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/opt")
SYSTEM_WRITE_ROOTS = ("/dev",)  # /dev/null, /dev/shm (NCCL, shared memory)
# Environment kept from the caller: finding the tools and the GPUs, nothing that carries credentials. A host's
# switches that keep NVLink multicast off (NCCL_NVLS_ENABLE, TORCH_SYMM_MEM_DISABLE_MULTICAST, NVSHMEM_DISABLE_NVLS)
# must reach the child too: on shared machines a program that uses it can take the host's GPUs out of service.
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "TERM")
KEPT_ENV_PREFIXES = (
    "CUDA_VISIBLE_DEVICES", "NVIDIA_", "NCCL_", "TORCH_CUDA_ARCH_LIST", "TRITON_", "OMP_NUM_THREADS",
    "TORCH_SYMM_MEM_", "NVSHMEM_",
)  # fmt: skip


class SandboxError(Exception):
    """The sandbox could not run the request; the message names the file or option to fix."""


@dataclass(frozen=True)
class SessionDirs:
    root: Path
    work: Path  # writable copy of the submission, the script's working directory
    hook: Path  # holds sitecustomize.py
    audit: Path  # holds events.jsonl
    home: Path
    tmp: Path

    @property
    def audit_log(self) -> Path:
        return self.audit / "events.jsonl"


def make_session(request: SandboxRequest) -> SessionDirs:
    """Create the session folder: copy the submission (links followed) and the inputs, install the audit hook."""
    root = request.session_dir.resolve()
    work = request.work_dir.resolve() if request.work_dir is not None else root / "work"
    for folder, what in ((root, "session"), (work, "work")):
        if folder.exists() and any(folder.iterdir()):
            raise SandboxError(f"{folder}: {what} folder is not empty; give a new or empty folder")
    submission = request.submission.resolve()
    if not (submission / request.script).is_file():
        raise SandboxError(f"{submission / request.script}: no such script; point at a submission folder")
    for folder in (root, work):
        if folder == submission or submission in folder.parents:
            raise SandboxError(f"{folder}: lies inside the submission {submission}; put the run elsewhere")
    dirs = SessionDirs(root, work, root / "hook", root / "audit", root / "home", root / "tmp")
    root.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(submission, dirs.work, symlinks=False, ignore=ignore, dirs_exist_ok=True)
    for name, source in request.inputs.items():
        if not Path(source).is_file():
            raise SandboxError(f"{source}: input file for the sandbox is missing")
        if Path(name).name != name:
            raise SandboxError(f"{name}: sandbox input names must be plain file names")
        shutil.copyfile(source, dirs.work / name)
    for d in (dirs.hook, dirs.audit, dirs.home, dirs.tmp):
        d.mkdir()
    shutil.copyfile(HOOK_SOURCE, dirs.hook / "sitecustomize.py")
    shutil.copyfile(NETNS_SOURCE, dirs.hook / "netns.py")
    return dirs


def launch_command(launch: Launch, script: str, python: str, use_torchrun: bool) -> list[str]:
    """The script's own command: `python script` or torchrun (standalone, or its rendezvous options for nnodes > 1)."""
    if launch.nproc < 1 or launch.nnodes < 1:
        raise SandboxError("--nproc and --nnodes must be at least 1")
    if not use_torchrun:
        if launch.nproc > 1 or launch.nnodes > 1:
            raise SandboxError("--launcher python runs one process; use torchrun for --nproc or --nnodes above 1")
        return [python, script]
    cmd = [python, "-m", "torch.distributed.run"]
    if launch.nnodes == 1 and launch.rdzv_endpoint is None:
        # one node: the rendezvous and MASTER_ADDR stay on loopback, which a network namespace keeps up
        cmd += ["--standalone", "--local-addr=127.0.0.1"]
    else:
        if not launch.rdzv_endpoint:
            raise SandboxError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (torchrun's rendezvous)")
        cmd += [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            f"--rdzv-backend={launch.rdzv_backend}",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
        ]
        if launch.rdzv_id:
            cmd.append(f"--rdzv-id={launch.rdzv_id}")
    cmd += [f"--nproc-per-node={launch.nproc}", *launch.torchrun_args, script]
    return cmd


def wants_torchrun(launch: Launch, gpus: bool) -> bool:
    if launch.launcher != "auto":
        return launch.launcher == "torchrun"
    return gpus or launch.nproc > 1 or launch.nnodes > 1


def child_env(
    request: SandboxRequest,
    dirs: SessionDirs,
    data_path: str | None,
    tokenizer_path: str | None,
    read_roots: list[str],
    write_roots: list[str],
    block_network: bool,
    base: dict[str, str] | None = None,
    keep_pythonpath: bool = False,
) -> dict[str, str]:
    """A scrubbed environment: kept tool paths, the run's own variables, the audit hook's settings.

    The hook folder comes first on PYTHONPATH; `keep_pythonpath` appends the caller's entries (local backend).
    """
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if k in KEPT_ENV or k.startswith(KEPT_ENV_PREFIXES)}
    env.update(request.env)
    if data_path is not None:
        env["DATA_PATH"] = data_path
    if tokenizer_path is not None:
        env["TOKENIZER_PATH"] = tokenizer_path
    env.update(
        {
            "PYTHONUNBUFFERED": "1",  # line arrival times are the phase clock
            "PYTHONDONTWRITEBYTECODE": "1",
            "SSM_GOLF_AUDIT_LOG": str(dirs.audit_log),
            "SSM_GOLF_AUDIT_READ_ROOTS": os.pathsep.join(read_roots),
            "SSM_GOLF_AUDIT_WRITE_ROOTS": os.pathsep.join(write_roots),
            "SSM_GOLF_AUDIT_BLOCK_NET": "1" if block_network else "0",
            # programs the policy allows whatever their arguments: the hook caps how many of their spawns it records
            "SSM_GOLF_AUDIT_BENIGN_PROGRAMS": os.pathsep.join(sorted(ALLOWED_PROGRAMS)),
            "SSM_GOLF_AUDIT_BENIGN_RE": COMPILER_RE.pattern,
        }
    )
    paths = [str(dirs.hook)]
    if keep_pythonpath:  # packages the caller reaches only through PYTHONPATH (a wheel folder on a bare machine)
        paths += [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["HOME"] = str(dirs.home)
    env["TMPDIR"] = str(dirs.tmp)
    return env


def default_python() -> str:
    return sys.executable
