"""Relative folder paths and report paths that cannot be written (issue 13, items 1 and 2)."""

from __future__ import annotations

import json

import pytest

from validator.cli import main


def _codes(report_file) -> set[str]:
    return {f["code"] for f in json.loads(report_file.read_text())["findings"]}


def test_relative_folder_path_reads_the_script_once(make_submission, tmp_path, monkeypatch):
    folder = make_submission()
    root = folder.parents[2]  # the case folder that holds records/
    monkeypatch.chdir(root)
    out = tmp_path / "rel.json"
    rel = folder.relative_to(root).as_posix()  # records/track_10min_16mb/<name>
    rc = main(["check", rel, "--json", str(out), "-q"])
    codes = _codes(out)
    assert "SOURCE_UNREADABLE" not in codes and "CODE_BYTES_PROBLEM" not in codes
    assert rc == 0
    assert json.loads(out.read_text())["target"] == folder.name


def test_dot_names_the_real_folder(make_submission, tmp_path, monkeypatch, capsys):
    folder = make_submission()
    monkeypatch.chdir(folder)
    out = tmp_path / "dot.json"
    assert main(["check", ".", "--json", str(out), "-q"]) == 0
    data = json.loads(out.read_text())
    assert data["target"] == folder.name
    assert "SOURCE_UNREADABLE" not in _codes(out)
    assert f"PASS: {folder.name} " in capsys.readouterr().out


def test_relative_path_and_absolute_path_give_the_same_findings(make_submission, tmp_path, monkeypatch):
    folder = make_submission()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    main(["check", str(folder), "--json", str(a), "-q"])
    monkeypatch.chdir(folder.parent)
    main(["check", folder.name, "--json", str(b), "-q"])
    assert json.loads(a.read_text())["findings"] == json.loads(b.read_text())["findings"]


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_unwritable_report_path_is_one_line_and_exit_2(make_submission, tmp_path, capsys, option):
    folder = make_submission()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for dest in (str(blocker / "sub" / "r.out"), str(tmp_path)):  # parent is a file; the path is a directory
        rc = main(["check", str(folder), option, dest, "-q"])
        err = capsys.readouterr().err
        assert rc == 2
        assert dest in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.probe"))


def test_proc_path_refused_before_work(make_submission, capsys):
    rc = main(["check", str(make_submission()), "--json", "/proc/x/y.json", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "/proc/x/y.json" in err and err.count("\n") == 1


def test_passing_folder_exits_0_when_its_reports_are_written(make_submission, tmp_path):
    out_json, out_md = tmp_path / "new" / "dir" / "r.json", tmp_path / "r.md"
    assert main(["check", str(make_submission()), "--json", str(out_json), "--markdown", str(out_md), "-q"]) == 0
    assert json.loads(out_json.read_text())["exit_code"] == 0 and out_md.read_text().startswith("## ")


def test_rerun_refuses_unwritable_report_before_running(tmp_path, capsys):
    rc = main(["rerun", str(tmp_path), "--data", str(tmp_path), "--markdown", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "it is a directory" in err and "Traceback" not in err
