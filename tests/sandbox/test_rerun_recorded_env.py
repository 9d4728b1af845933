"""`validator rerun` applies the overrides submission.json records in `env`; --env on its command line wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from validator.cli import main

PROBE = 'print("probe LD_PRELOAD=" + os.environ.get("LD_PRELOAD", "-") + " SEED=" + os.environ["SEED"], flush=True)'


def _rerun(folder: Path, sample_root: Path, out: Path, *extra: str) -> tuple[int, dict]:
    args = ["rerun", str(folder), "--data", str(sample_root), "--gpus", "no", "--workdir", str(out / "runs")]
    code = main([*args, "--json", str(out / "report.json"), *extra])
    report = json.loads((out / "report.json").read_text())
    (section,) = [s for s in report["sections"] if s["title"].startswith("Sandboxed rerun")]
    return code, {"codes": {f["code"] for f in report["findings"]}, "seed": section["data"]["seeds"][0]}


def test_recorded_env_is_applied_and_the_command_line_wins(tmp_path, sample_root, make_submission, capsys):
    folder = make_submission(claims={5: 1.0}, setup=PROBE)
    meta = json.loads((folder / "submission.json").read_text())
    meta["env"] = {"STANDIN_BPB_FACTOR": "0.8", "LD_PRELOAD": "evil.so", "SEED": "9"}
    (folder / "submission.json").write_text(json.dumps(meta))

    code, got = _rerun(folder, sample_root, tmp_path / "a")
    assert code == 1 and "RERUN_BPB_TABLE_MISMATCH" in got["codes"]  # the recorded factor reached the script
    log = Path(got["seed"]["output_log"]).read_text()
    assert "probe LD_PRELOAD=- SEED=5" in log  # names a submitter may not set are not applied
    err = capsys.readouterr().err
    assert "environment from submission.json: STANDIN_BPB_FACTOR=0.8; skipped" in err and "LD_PRELOAD, SEED" in err

    code, got = _rerun(folder, sample_root, tmp_path / "b", "--env", "STANDIN_BPB_FACTOR=1")
    assert "RERUN_BPB_TABLE_MISMATCH" not in got["codes"]
    assert got["seed"]["script_bpb"] == pytest.approx(got["seed"]["recomputed_bpb"], rel=1e-6)


def test_no_recorded_env_changes_nothing(tmp_path, sample_root, make_submission, capsys):
    folder = make_submission(claims={5: 1.0})
    code, got = _rerun(folder, sample_root, tmp_path)
    assert "RERUN_BPB_TABLE_MISMATCH" not in got["codes"] and got["seed"]["exit_code"] == 0
    assert "environment from submission.json" not in capsys.readouterr().err
