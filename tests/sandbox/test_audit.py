"""Audit events to findings: which spawns are allowed, and what a silent hook means."""

from __future__ import annotations

import pytest

from validator.sandbox.audit import ALLOWED_PROGRAMS, audit_findings, spawn_is_allowed


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["/usr/bin/x86_64-linux-gnu-gcc-13", "-O3", "x.c"], True),  # Triton building its launcher
        (["clang-18", "x.c"], True),
        (["/opt/venv/lib/python3.12/site-packages/triton/backends/nvidia/bin/ptxas", "--version"], True),
        (["/sbin/ldconfig", "-p"], True),
        (["file", "-b", "/usr/bin/python3.12"], True),  # platform.architecture()
        (["/usr/bin/python3.12", "-u", "train_gpt.py"], True),  # torchrun's workers load the hook
        (["/usr/bin/python3", "-I", "-c", "import socket"], False),  # isolated mode skips sitecustomize
        (["/usr/bin/python3", "-S", "x.py"], False),
        (["sh", "-c", "curl x"], False),
        (["curl", "http://192.0.2.1"], False),
        (["gcc-ar", "x"], False),
    ],
)
def test_spawn_policy(argv, allowed):
    assert spawn_is_allowed({"executable": argv[0], "argv": argv}, ALLOWED_PROGRAMS) is allowed


def test_findings_are_deduplicated_and_a_silent_hook_is_reported():
    events = [
        {"kind": "network", "event": "socket.connect", "address": "('192.0.2.1', 9)", "refused": True},
        {"kind": "network", "event": "socket.connect", "address": "('192.0.2.1', 9)", "refused": True},
        {"kind": "read_outside", "path": "/srv/answers"},
        {"kind": "spawn", "executable": "curl", "argv": ["curl", "x"]},
        {"kind": "spawn", "executable": "curl", "argv": ["curl", "x"]},
    ]
    found = audit_findings(events, "seed 1")
    assert [f.code for f in found] == ["AUDIT_NOT_ACTIVE", "AUDIT_NETWORK", "AUDIT_READ_OUTSIDE", "AUDIT_SUBPROCESS"]
    assert [f.severity.value for f in found] == ["warning", "error", "error", "error"]
    assert audit_findings([{"kind": "start"}, *events[3:]], "x", extra_programs=("curl",)) == []
