"""Sandboxed re-execution of a submission script: local (process group, netns, audit hook) or docker backend."""

from __future__ import annotations

from validator.sandbox.layout import SandboxError
from validator.sandbox.request import Launch, Limits, PhaseSpan, SandboxRequest, SandboxResult


def run_sandboxed(request: SandboxRequest) -> SandboxResult:
    """Run the request with its backend; raises SandboxError when it cannot start."""
    if request.backend == "docker":
        from validator.sandbox.docker_backend import run_docker

        return run_docker(request)
    if request.backend == "local":
        from validator.sandbox.local import run_local

        return run_local(request)
    raise SandboxError(f"unknown sandbox backend {request.backend!r}; use local or docker")


__all__ = ["Launch", "Limits", "PhaseSpan", "SandboxError", "SandboxRequest", "SandboxResult", "run_sandboxed"]
