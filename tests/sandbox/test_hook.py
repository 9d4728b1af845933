"""The audit hook (sitecustomize) on its own: what it records, what it refuses, and what it lets through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from validator.sandbox.layout import HOOK_SOURCE


def run_hooked(
    tmp_path: Path, code: str, block: bool = True, **extra_env: str
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_bytes(HOOK_SOURCE.read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "events.jsonl"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(hook_dir),
        "SSM_GOLF_AUDIT_LOG": str(log),
        "SSM_GOLF_AUDIT_READ_ROOTS": os.pathsep.join([str(work), str(hook_dir), "/proc", "/dev"]),
        "SSM_GOLF_AUDIT_WRITE_ROOTS": os.pathsep.join([str(work), "/dev"]),
        "SSM_GOLF_AUDIT_BLOCK_NET": "1" if block else "0",
        **extra_env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, events


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events]


def test_start_event_and_nothing_else_for_allowed_work(tmp_path):
    proc, events = run_hooked(
        tmp_path,
        """
        import json, os
        open("inside.txt", "w").write("x")
        print(open("inside.txt").read(), open("/dev/null").read() == "")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["x", "True"]
    assert kinds(events) == ["start"]


def test_reads_outside_are_recorded_once_and_writes_outside_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("answers")
    proc, events = run_hooked(
        tmp_path,
        f"""
        for _ in range(3):
            open({str(secret)!r}).read()
        try:
            open({str(tmp_path / "dropped.txt")!r}, "w").write("x")
        except PermissionError as exc:
            print("refused", "work dir" in str(exc))
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused", "True"]
    assert not (tmp_path / "dropped.txt").exists()  # the hook refuses what it can where bwrap is missing
    assert [(e["kind"], e.get("path")) for e in events[1:]] == [
        ("read_outside", str(secret)),
        ("write_outside", str(tmp_path / "dropped.txt")),
    ]


def test_outbound_connect_is_refused_before_any_packet_and_loopback_works(tmp_path):
    proc, events = run_hooked(
        tmp_path,
        """
        import socket
        server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
        client = socket.create_connection(server.getsockname(), timeout=5)
        print("loopback ok")
        s = socket.socket()
        try:
            s.connect(("192.0.2.1", 9))
        except PermissionError as exc:
            print("refused", exc)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert "loopback ok" in proc.stdout and "refused ssm-golf sandbox" in proc.stdout
    network = [e for e in events if e["kind"] == "network"]
    assert len(network) == 1 and "192.0.2.1" in network[0]["address"] and network[0]["refused"] is True


def test_name_lookups_are_recorded_and_spawns_carry_their_argv(tmp_path):
    proc, events = run_hooked(
        tmp_path,
        """
        import socket, subprocess, sys
        try:
            socket.getaddrinfo("example.invalid", 80)
        except OSError:
            pass
        subprocess.run(["true", "--flag"])
        subprocess.run([sys.executable, "-c", "pass"])
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert any(e["kind"] == "network" and "example.invalid" in e["address"] for e in events)
    spawns = [e for e in events if e["kind"] == "spawn"]
    assert spawns[0]["argv"] == ["true", "--flag"]
    assert spawns[1]["argv"][0] == sys.executable
    assert kinds(events).count("start") == 2  # the Python child loaded the hook too


def test_opening_the_audit_log_is_refused_and_recorded_as_tampering(tmp_path):
    proc, events = run_hooked(
        tmp_path,
        f"""
        try:
            open({str(tmp_path / "events.jsonl")!r}, "w").close()
        except PermissionError as exc:
            print("refused", exc)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused")
    assert kinds(events) == ["start", "tamper"]


def test_removing_renaming_or_truncating_the_audit_log_is_refused_and_recorded(tmp_path):
    log = str(tmp_path / "events.jsonl")
    proc, events = run_hooked(
        tmp_path,
        f"""
        import os, shutil
        log = {log!r}
        attempts = [
            lambda: os.remove(log), lambda: os.unlink(log), lambda: os.rename(log, "x"),
            lambda: os.replace("inside.txt", log), lambda: os.truncate(log, 0), lambda: os.link(log, "hard"),
            lambda: shutil.rmtree(os.path.dirname(log)), lambda: os.rmdir(os.path.dirname(log)),
        ]
        open("inside.txt", "w").close()
        for attempt in attempts:
            try:
                attempt()
                print("done")
            except PermissionError:
                print("refused")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused"] * 8
    ops = [e["op"] for e in events if e["kind"] == "tamper"]
    assert ops == ["os.remove", "os.rename", "os.rename", "os.truncate", "os.link", "shutil.rmtree", "os.rmdir"]
    assert kinds(events)[0] == "start"  # the log is still there, whole


def test_a_python_child_that_would_skip_the_hook_is_refused(tmp_path):
    proc, events = run_hooked(
        tmp_path,
        """
        import os, subprocess, sys
        for argv, env in (([sys.executable, "-uI", "-c", "pass"], None), ([sys.executable, "-c", "pass"], {}),
                          ([sys.executable, "-c", "pass"], {**os.environ, "PYTHONPATH": ""})):
            try:
                subprocess.run(argv, env=env)
                print("ran")
            except PermissionError:
                print("refused")
        os.environ.pop("SSM_GOLF_AUDIT_LOG")
        try:
            subprocess.run([sys.executable, "-c", "pass"])
            print("ran")
        except PermissionError:
            print("refused")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["refused"] * 4
    reasons = [e["unhooked"] for e in events if e["kind"] == "spawn"]
    assert len(reasons) == 4 and "-I" in reasons[0] and "SSM_GOLF_AUDIT_LOG" in reasons[1]
    assert "PYTHONPATH" in reasons[2] and "SSM_GOLF_AUDIT_LOG" in reasons[3]
    assert kinds(events).count("start") == 1  # no child ran


def test_a_flood_of_benign_spawns_cannot_hide_a_later_one(tmp_path):
    proc, events = run_hooked(
        tmp_path,
        """
        import subprocess
        for _ in range(205):
            subprocess.run(["true"])
        subprocess.run(["sh", "-c", "true"])
        """,
        SSM_GOLF_AUDIT_BENIGN_PROGRAMS="true",
    )
    assert proc.returncode == 0, proc.stderr
    spawns = [e["argv"][0] for e in events if e["kind"] == "spawn"]
    assert spawns.count("true") == 200 and spawns[-1] == "sh"
    assert [e["program"] for e in events if e["kind"] == "truncated"] == ["true"]
