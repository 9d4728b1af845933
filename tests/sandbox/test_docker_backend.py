"""The docker backend without an engine: the container spec for a request, and the run loop on a stand-in client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from validator.sandbox import Launch, Limits, SandboxRequest
from validator.sandbox.docker_backend import INSIDE, _sdk_spec, container_spec, run_docker
from validator.sandbox.layout import SandboxError, make_session


def request_for(tmp_path: Path, sample_paths, **kw) -> SandboxRequest:
    folder = tmp_path / "sub"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train_gpt.py").write_text("print('hi')\n")
    data, tokenizer = sample_paths
    return SandboxRequest(
        submission=folder,
        session_dir=tmp_path / "session",
        env={"SEED": "42", "ITERATIONS": "5"},
        data_dir=data,
        tokenizer=tokenizer,
        backend="docker",
        image="ssm-golf:test",
        **kw,
    )


def test_spec_has_no_network_read_only_data_gpus_and_a_user(tmp_path, sample_paths):
    request = request_for(tmp_path, sample_paths, launch=Launch(nproc=8))
    dirs = make_session(request)
    spec = container_spec(request, dirs, gpus=True)
    data, tokenizer = sample_paths
    assert spec["network_mode"] == "none"
    assert spec["volumes"][str(data.resolve())] == {"bind": "/data/dataset", "mode": "ro"}
    assert spec["volumes"][str(tokenizer.resolve())]["mode"] == "ro"
    assert spec["volumes"][str(dirs.work)] == {"bind": "/sandbox/work", "mode": "rw"}
    assert spec["volumes"][str(dirs.hook)]["mode"] == "ro"
    assert spec["device_requests"] == [{"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}]
    assert spec["user"] and not spec["user"].startswith("0:")
    assert spec["command"] == ["python", "-m", "torch.distributed.run", "--standalone", "--local-addr=127.0.0.1"] + [
        "--nproc-per-node=8",
        "train_gpt.py",
    ]
    assert spec["working_dir"] == "/sandbox/work" and spec["read_only"] is True
    assert spec["cap_drop"] == ["ALL"] and "no-new-privileges" in spec["security_opt"]
    assert spec["shm_size"] and {"Name": "memlock", "Soft": -1, "Hard": -1} in spec["ulimits"]
    env = spec["environment"]
    assert env["DATA_PATH"] == "/data/dataset" and env["TOKENIZER_PATH"] == f"/data/tokenizer/{tokenizer.name}"
    assert env["SEED"] == "42" and env["SSM_GOLF_AUDIT_BLOCK_NET"] == "1"
    assert env["PYTHONPATH"] == "/sandbox/hook" and env["SSM_GOLF_AUDIT_LOG"] == "/sandbox/audit/events.jsonl"
    assert "PATH" not in env  # the image's PATH (its Python environment) stays in force
    assert "/data/dataset" in env["SSM_GOLF_AUDIT_READ_ROOTS"].split(":")
    assert env["SSM_GOLF_AUDIT_WRITE_ROOTS"].split(":")[0] == "/sandbox/work"


def test_spec_without_gpus_runs_plain_python_and_the_sdk_types_build(tmp_path, sample_paths):
    request = request_for(tmp_path, sample_paths)
    spec = container_spec(request, make_session(request), gpus=False)
    assert spec["device_requests"] == [] and spec["command"] == ["python", "train_gpt.py"]
    sdk = _sdk_spec(container_spec(request, make_session(request_for(tmp_path / "b", sample_paths)), gpus=True))
    assert sdk["device_requests"][0]["Capabilities"] == [["gpu"]]
    assert sdk["ulimits"][0]["Name"] == "memlock"


def test_multi_node_goes_through_torchrun_rendezvous(tmp_path, sample_paths):
    launch = Launch(nproc=8, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500", rdzv_id="golf")
    request = request_for(tmp_path, sample_paths, launch=launch)
    command = container_spec(request, make_session(request), gpus=True)["command"]
    assert "--standalone" not in command
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-endpoint=10.0.0.1:29500", "--rdzv-id=golf"} <= set(command)
    spec = container_spec(request, make_session(request_for(tmp_path / "d", sample_paths)), gpus=True)
    assert spec["network_mode"] == "host" and spec["environment"]["SSM_GOLF_AUDIT_BLOCK_NET"] == "0"
    bad = request_for(tmp_path / "c", sample_paths, launch=Launch(nproc=8, nnodes=2))
    with pytest.raises(SandboxError, match="rdzv-endpoint"):
        container_spec(bad, make_session(bad), gpus=True)


class StandInContainer:
    """Plays back output lines with delays, the way `container.logs(stream=True, follow=True)` yields them."""

    def __init__(self, session: Path, lines: list[tuple[float, str]], code: int) -> None:
        self.session, self.lines, self.code, self.killed, self.removed = session, lines, code, False, False

    def logs(self, stream: bool, follow: bool):
        assert stream and follow
        for delay, line in self.lines:
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if self.killed:
                    return
                time.sleep(0.01)
            yield (line + "\n").encode()

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout: int) -> dict:
        return {"StatusCode": 137 if self.killed else self.code}

    def remove(self, force: bool) -> None:
        self.removed = True


class StandInClient:
    def __init__(self, lines: list[tuple[float, str]], code: int = 0, events: list[dict] | None = None) -> None:
        self.lines, self.code, self.events, self.spec, self.container = lines, code, events or [], None, None
        self.containers = self

    def run(self, **spec):
        self.spec = spec
        session = Path(spec["labels"]["ssm-golf.session"])
        audit = session / "audit" / "events.jsonl"
        audit.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        self.container = StandInContainer(session, self.lines, self.code)
        return self.container


def test_run_collects_lines_phases_and_audit_events(tmp_path, sample_paths):
    lines = [(0, "phase:train begin"), (0.2, "phase:train end"), (0, "phase:eval begin"), (0.1, "phase:eval end")]
    client = StandInClient(lines, events=[{"kind": "start", "pid": 1}, {"kind": "network", "address": "x"}])
    result = run_docker(request_for(tmp_path, sample_paths), client=client)
    assert result.returncode == 0 and result.killed is None
    assert result.network_isolation == "docker-network-none"
    assert 0.15 < result.phases["train"].seconds < 5
    assert [e["kind"] for e in result.audit_events] == ["start", "network"]
    assert client.container.removed and client.spec["detach"] is True


def test_run_kills_the_container_past_the_limit(tmp_path, sample_paths):
    client = StandInClient([(0, "phase:train begin"), (60, "phase:train end")])
    limits = Limits(train_s=0.5, eval_s=1, setup_s=10, grace_s=0.2)
    started = time.monotonic()
    result = run_docker(request_for(tmp_path, sample_paths, limits=limits), client=client)
    assert time.monotonic() - started < 10
    assert client.container.killed and client.container.removed
    assert result.returncode is None and "train phase" in result.killed


def test_inside_paths_are_fixed():
    assert INSIDE.work == Path("/sandbox/work") and INSIDE.audit_log == Path("/sandbox/audit/events.jsonl")
