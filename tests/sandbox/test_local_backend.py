"""The local backend on the stand-in script: a clean run, each sabotage caught, limits enforced by a hard kill."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from validator.sandbox import Limits, SandboxError, SandboxRequest, run_sandboxed
from validator.sandbox.audit import audit_findings
from validator.sandbox.processes import alive
from validator.sandbox.verdict import run_findings


def run(folder: Path, tmp_path: Path, sample_paths, limits: Limits | None = None, env=None, **kw):
    data, tokenizer = sample_paths
    request = SandboxRequest(
        submission=folder,
        session_dir=tmp_path / "session",
        env={"SEED": "3", **(env or {})},
        data_dir=data,
        tokenizer=tokenizer,
        limits=limits or Limits(),
        gpus=False,
        **kw,
    )
    return run_sandboxed(request)


def codes(findings) -> set[str]:
    return {f.code for f in findings}


def test_clean_run_has_no_findings_and_leaves_the_submission_untouched(tmp_path, sample_paths, make_submission):
    folder = make_submission()
    before = sorted(p.name for p in folder.iterdir())
    result = run(folder, tmp_path, sample_paths)
    assert result.returncode == 0, result.text
    assert result.killed is None
    assert result.network_isolation.startswith(("bwrap+netns", "netns", "audit-hook"))
    assert result.text.splitlines()[-1].startswith("result_json ")
    assert result.phases["train"].seconds >= 0.04 and result.phases["eval"].seconds is not None
    assert (result.work_dir / "final_model.int8.ptz").stat().st_size == 4096
    assert audit_findings(result.audit_events, "x") == []
    assert run_findings(result, Limits(), ("train", "eval"), "x") == []
    assert sorted(p.name for p in folder.iterdir()) == before  # only the copy was written


def test_environment_is_scrubbed(tmp_path, sample_paths, make_submission, monkeypatch):
    monkeypatch.setenv("SSM_GOLF_TEST_SECRET_TOKEN", "hunter2")
    switches = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    for key, value in switches.items():  # the host's NVLink-multicast switches must reach the child
        monkeypatch.setenv(key, value)
    extra = tmp_path / "wheels"
    extra.mkdir()
    (extra / "golf_extra_pkg.py").write_text("VALUE = 42\n")
    monkeypatch.setenv("PYTHONPATH", str(extra))
    folder = make_submission(
        setup="""
print("secret:", os.environ.get("SSM_GOLF_TEST_SECRET_TOKEN"))
print("switches:", [os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                 "NVSHMEM_DISABLE_NVLS")])
import golf_extra_pkg
print("extra:", golf_extra_pkg.VALUE, os.environ["PYTHONPATH"].split(os.pathsep)[0].endswith("hook"))
"""
    )
    result = run(folder, tmp_path, sample_paths)
    assert "secret: None" in result.text
    assert "switches: ['0', '1', '1']" in result.text
    assert "extra: 42 True" in result.text  # the caller's PYTHONPATH still reaches its packages, after the hook
    assert audit_findings(result.audit_events, "x") == []
    assert f"{os.sep}home" in str(result.work_dir.parent / "home")


def test_socket_is_caught(tmp_path, sample_paths, make_submission):
    folder = make_submission(
        setup="""
import socket
try:
    socket.create_connection(("192.0.2.1", 9), timeout=2)
except OSError as exc:
    print("connect failed:", exc)
"""
    )
    result = run(folder, tmp_path, sample_paths)
    assert result.returncode == 0, result.text
    assert "AUDIT_NETWORK" in codes(audit_findings(result.audit_events, "x"))


def test_reading_outside_the_data_is_caught(tmp_path, sample_paths, make_submission):
    secret = tmp_path / "val_answers.txt"
    secret.write_text("0.1")
    folder = make_submission(setup=f"print(open({str(secret)!r}).read())")
    result = run(folder, tmp_path, sample_paths)
    found = audit_findings(result.audit_events, "x")
    assert "AUDIT_READ_OUTSIDE" in codes(found)
    assert any(str(secret) in f.message for f in found)


def test_writing_into_the_data_is_caught(tmp_path, sample_paths, make_submission):
    data, _ = sample_paths
    target = data / "planted.bin"
    folder = make_submission(setup=f"open({str(target)!r}, 'wb').write(b'x')")
    try:
        result = run(folder, tmp_path, sample_paths)
    finally:
        target.unlink(missing_ok=True)
    assert "AUDIT_WRITE_OUTSIDE" in codes(audit_findings(result.audit_events, "x"))


def test_spawning_a_program_is_caught_and_python_children_are_audited(tmp_path, sample_paths, make_submission):
    folder = make_submission(
        setup="""
import subprocess, sys
subprocess.run(["sh", "-c", "echo from-shell"])
subprocess.run([sys.executable, "-c", "open('/etc/hostname').read()"])
"""
    )
    result = run(folder, tmp_path, sample_paths)
    assert "from-shell" in result.text
    found = audit_findings(result.audit_events, "x")
    assert [f.code for f in found if f.code == "AUDIT_SUBPROCESS"] == ["AUDIT_SUBPROCESS"]  # sh only, not python
    assert "sh -c echo from-shell" in " ".join(f.message for f in found)
    assert sum(e["kind"] == "start" for e in result.audit_events) >= 2  # the Python child ran the hook


def test_sleeping_past_the_train_limit_is_killed_at_the_limit(tmp_path, sample_paths, make_submission):
    folder = make_submission(train="time.sleep(120)")
    limits = Limits(train_s=1.0, eval_s=5.0, setup_s=60.0, grace_s=1.0)
    started = time.monotonic()
    result = run(folder, tmp_path, sample_paths, limits=limits)
    assert time.monotonic() - started < 30
    assert result.returncode is None and "train phase" in result.killed
    found = run_findings(result, limits, ("train", "eval"), "x")
    assert {"RERUN_KILLED_AT_LIMIT", "RERUN_TRAIN_TIME_OVER_LIMIT"} <= codes(found)


def test_the_whole_tree_dies_with_the_run(tmp_path, sample_paths, make_submission):
    folder = make_submission(
        setup="""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)"])
print("child-pid", child.pid, flush=True)
"""
    )
    result = run(folder, tmp_path, sample_paths)
    assert result.returncode == 0, result.text
    pid = int(next(line for _, line in result.lines if line.startswith("child-pid")).split()[1])
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_bad_requests_fail_with_one_clear_line(tmp_path, sample_paths, make_submission):
    with pytest.raises(SandboxError, match="no such script"):
        run(tmp_path, tmp_path, sample_paths)
    folder = make_submission()
    (tmp_path / "session").mkdir()
    (tmp_path / "session" / "old").write_text("x")
    with pytest.raises(SandboxError, match="not empty"):
        run(folder, tmp_path, sample_paths)
    with pytest.raises(SandboxError, match="lies inside the submission"):
        run(folder, folder, sample_paths)


def test_without_a_netns_the_hook_refuses_the_connection(tmp_path, sample_paths, make_submission, monkeypatch):
    import validator.sandbox.local as local

    monkeypatch.setattr(local, "unshare_prefix", lambda: None)
    monkeypatch.setattr(local, "bwrap_path", lambda: None)
    folder = make_submission(
        setup="""
import socket
try:
    socket.socket().connect(("192.0.2.1", 9))
except PermissionError as exc:
    print("refused:", exc)
"""
    )
    result = run(folder, tmp_path, sample_paths)
    assert result.network_isolation == "audit-hook (no bwrap: filesystem not enforced)"
    monkeypatch.undo()
    other = run(folder, tmp_path / "b", sample_paths, netns=False, bwrap=False).network_isolation
    assert other == "audit-hook (no bwrap: filesystem not enforced)"
    assert result.command[0] != "/usr/bin/unshare"
    assert "refused: ssm-golf sandbox: network access refused" in result.text
    assert "AUDIT_NETWORK" in codes(audit_findings(result.audit_events, "x"))


def test_bwrap_refuses_a_native_write_outside_the_work_dir(tmp_path, sample_paths, make_submission):
    """Under bubblewrap the filesystem is read-only but the session: a write the audit hook cannot see (libc
    through ctypes) fails, and the file does not exist afterwards; the host's /tmp is not the run's /tmp."""
    import shutil
    import tempfile

    from validator.sandbox.local import bwrap_path

    if bwrap_path() is None:
        pytest.skip("bwrap (Debian package bubblewrap) is not installed or cannot create namespaces here")
    outside = Path(tempfile.mkdtemp(prefix="ssm-golf-bwrap-", dir="/var/tmp"))
    target, host_tmp = outside / "planted.txt", tmp_path / "host_tmp_planted.txt"
    try:
        folder = make_submission(
            setup=f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.open({str(target).encode()!r}, 0o101, 0o644)
print("native write fd", fd, "errno", ctypes.get_errno())
try:
    open({str(host_tmp)!r}, "w").write("x")
except OSError as exc:
    print("tmp write refused", type(exc).__name__)
"""
        )
        result = run(folder, tmp_path, sample_paths)
        assert result.network_isolation == "bwrap+netns"
        assert "native write fd -1" in result.text, result.text
        assert not target.exists() and not host_tmp.exists()
    finally:
        shutil.rmtree(outside, ignore_errors=True)
