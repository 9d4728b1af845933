"""builder's command line: one-line errors with exit status 2 for bad input, nothing half written."""

from __future__ import annotations

import json

from builder.cli import main


def test_list_names_the_baseline(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.startswith("baseline  ")


def test_unknown_variant(capsys):
    assert main(["assemble", "--variant", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown variant 'nope'" in err and "builder list" in err


def test_assemble_refuses_to_overwrite_then_forces(tmp_path, capsys):
    out = tmp_path / "sub"
    args = ["assemble", "--variant", "baseline", "--out", str(out), "--date", "2026-11-23", "--author", "a"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "requirements.txt", "submission.json", "train_gpt.py"]
    (out / "train_seed1.log").write_text("old")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "train_seed1.log").exists()
    assert main([*args, "--force"]) == 0
    assert not (out / "train_seed1.log").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]  # no temporary folder left behind
    assert json.loads((out / "submission.json").read_text())["variant"] == "baseline"


def test_bad_date(capsys):
    assert main(["assemble", "--variant", "baseline", "--date", "2026-13-01", "--out", "x"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_run_with_missing_data(tmp_path, capsys):
    out = tmp_path / "sub"
    assert main(["assemble", "--variant", "baseline", "--out", str(out), "--date", "2026-11-23"]) == 0
    assert main(["run", str(out), "--data", str(tmp_path / "nodata"), "--tokenizer", str(tmp_path / "t.model")]) == 2
    assert "builder data sample" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--data", str(tmp_path), "--tokenizer", "x"]) == 2
    assert "no train_gpt.py" in capsys.readouterr().err


def test_collect_without_logs(tmp_path, capsys):
    out = tmp_path / "sub"
    assert main(["assemble", "--variant", "baseline", "--out", str(out), "--date", "2026-11-23"]) == 0
    assert main(["collect", str(out)]) == 2
    assert "no train_seed" in capsys.readouterr().err
    (out / "train_seed7.log").write_text("step:1/2 train_loss:3.0 train_time:5ms step_avg:5.00ms\n")
    assert main(["collect", str(out)]) == 2
    assert "did not finish" in capsys.readouterr().err
    (out / "submission.json").write_text("{not json")
    assert main(["collect", str(out)]) == 2
    assert "submission.json" in capsys.readouterr().err
