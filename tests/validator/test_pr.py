"""`validator pr` on a real git repository: added folders checked, stray and modified files flagged."""

from __future__ import annotations

import json
import shutil
import subprocess

from validator.cli import main


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def make_repo(tmp_path, make_submission):
    repo = tmp_path / "upstream"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "README.md").write_text("upstream\n")
    old = make_submission(name="2026-04-01_Old")
    shutil.copytree(old, repo / "records" / "track_10min_16mb" / old.name)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    return repo


def test_pr_checks_the_added_folder_and_flags_stray_files(tmp_path, make_submission, capsys):
    repo = make_repo(tmp_path, make_submission)
    new = make_submission(name="2026-05-01_NewRecord")
    shutil.copytree(new, repo / "records" / "track_10min_16mb" / new.name)
    (repo / "scripts").mkdir()
    (repo / "scripts" / "helper.py").write_text("print(1)\n")
    (repo / "records" / "track_10min_16mb" / "2026-04-01_Old" / "README.md").write_text("edited\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pr")
    out = tmp_path / "pr.json"
    rc = main(["pr", "--repo", str(repo), "--base", "HEAD~1", "--json", str(out), "-q"])
    assert rc == 1
    data = json.loads(out.read_text())
    pr_codes = {f["code"] for f in data["reports"][0]["findings"]}
    assert {"PR_FILE_OUTSIDE_RECORDS", "PR_MODIFIES_EXISTING"} <= pr_codes
    folder_report = data["reports"][1]
    assert folder_report["target"] == "records/track_10min_16mb/2026-05-01_NewRecord"
    assert folder_report["verdict"] == "pass"


def test_clean_pr_passes(tmp_path, make_submission):
    repo = make_repo(tmp_path, make_submission)
    new = make_submission(name="2026-05-02_Another")
    shutil.copytree(new, repo / "records" / "track_10min_16mb" / new.name)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pr")
    assert main(["pr", "--repo", str(repo), "--base", "main~1", "-q"]) == 0


def test_pr_without_records_and_bad_base(tmp_path, make_submission, capsys):
    repo = make_repo(tmp_path, make_submission)
    (repo / "notes.txt").write_text("x\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pr")
    assert main(["pr", "--repo", str(repo), "--base", "HEAD~1", "-q"]) == 1
    assert main(["pr", "--repo", str(repo), "--base", "no-such-branch"]) == 2
    assert "--base 'no-such-branch' is not a commit" in capsys.readouterr().err
