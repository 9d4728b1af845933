"""Audit events to findings: which spawns are allowed, and what a silent hook means."""

from __future__ import annotations

import pytest

from validator.sandbox.audit import ALLOWED_PROGRAMS, audit_findings, read_events, spawn_is_allowed


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
        (["/usr/bin/python3", "-uI", "-c", "import socket"], False),  # combined short flags
        (["python3", "-W", "ignore", "-X", "dev", "-E", "x.py"], False),  # past options that take an argument
        (["python3", "-Wignore", "-sE", "x.py"], False),
        (["python3", "-u", "-c", "print(1)", "-I"], True),  # after -c: the program's own arguments
        (["python3", "-m", "torch.distributed.run", "-S"], True),
        (["python3", "-X", "importtime", "-Bu", "x.py"], True),
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


def test_a_python_child_the_hook_marked_unhooked_is_refused_whatever_its_flags():
    event = {"executable": "python3", "argv": ["python3", "-c", "x"], "unhooked": "its environment drops X"}
    assert spawn_is_allowed(event, ALLOWED_PROGRAMS) is False
    (found,) = audit_findings([{"kind": "start"}, {"kind": "spawn", **event}], "x")
    assert found.code == "AUDIT_SUBPROCESS" and "without the audit hook" in found.message


def test_the_validator_reads_interpreter_flags_with_the_hooks_own_parser():
    from validator.sandbox import audit
    from validator.sandbox.hook import sitecustomize

    assert audit.hook_defeating_flags is sitecustomize.hook_defeating_flags
    cases = {("-uI",): "I", ("-W", "x", "-E"): "E", ("-Wx", "-S"): "S", ("-c", "-I"): "", ("x.py", "-E"): ""}
    for args, flags in cases.items():
        assert audit.hook_defeating_flags(["python3", *args]) == flags, args


def test_the_hook_installs_itself_only_when_loaded_as_sitecustomize(tmp_path):
    """The validator imports the hook module for its parser: that import must not hook the validator's own process,
    even with SSM_GOLF_AUDIT_LOG set; loaded as `sitecustomize` (as site does in the sandbox's children) it must."""
    import subprocess
    import sys

    from validator.sandbox.layout import HOOK_SOURCE

    for run_name, installs in (("validator.sandbox.hook.sitecustomize", False), ("sitecustomize", True)):
        log = tmp_path / f"{run_name}.jsonl"
        code = f"import runpy; runpy.run_path({str(HOOK_SOURCE)!r}, run_name={run_name!r})"
        env = {"PATH": "/usr/bin:/bin", "SSM_GOLF_AUDIT_LOG": str(log)}
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
        starts = [e for e in read_events(log) if e["kind"] == "start"]
        assert bool(starts) is installs, run_name


def test_tampering_is_an_error():
    events = [{"kind": "start"}, {"kind": "tamper", "path": "/s/audit/events.jsonl", "op": "os.remove"}]
    (found,) = audit_findings(events, "x")
    assert (found.code, found.severity.value) == ("AUDIT_TAMPER", "error") and "os.remove" in found.message


def test_a_missing_empty_or_truncated_log_is_tampering_when_the_sandbox_injected_the_hook():
    start = {"kind": "start"}
    spawn = {"kind": "spawn", "executable": "uname", "argv": ["uname"]}
    for events, problem, what in (
        ([], None, "missing or empty"),
        ([spawn], None, "does not begin"),
        ([start, spawn], "shrank from 300 to 0 bytes during the run", "shrank"),
    ):
        (found,) = audit_findings(events, "seed 1", injected=True, log_problem=problem)
        assert (found.code, found.severity.value) == ("AUDIT_TAMPER", "error") and what in found.message
    assert audit_findings([start, spawn], "seed 1", injected=True) == []


def test_log_watch_sees_the_log_removed_replaced_or_shrunk(tmp_path):
    from validator.sandbox.audit import LogWatch

    log = tmp_path / "events.jsonl"
    log.write_text("x" * 10)
    for change, what in (
        (lambda: log.unlink(), "removed"),
        (lambda: (log.rename(tmp_path / "old"), log.write_text("x" * 30)), "replaced"),
        (lambda: log.write_text("x"), "shrank"),
    ):
        log.write_text("x" * 10)
        watch = LogWatch(log)
        watch.check()
        log.write_text("x" * 20)
        watch.check()
        assert watch.problem is None
        change()
        watch.check()
        assert what in (watch.problem or ""), what
