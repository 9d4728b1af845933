"""The pull-request workflow calls the validator with options the command line really accepts."""

from __future__ import annotations

import argparse
import re
import shlex

from validator.commands import pr


def test_workflow_runs_validator_pr_with_valid_options(repo_root):
    text = (repo_root / ".github" / "workflows" / "validate-submission.yml").read_text()
    assert "pull_request_target" in text and "pull-requests: write" in text
    assert "validator rerun" not in text.split("jobs:", 1)[1]  # nothing from the PR is executed
    joined = re.sub(r"\\\n\s*", " ", text)
    line = next(ln for ln in joined.splitlines() if ln.strip().startswith("validator pr "))
    argv = shlex.split(line.strip().replace("${{ github.event.pull_request.base.ref }}", "main"))[2:]
    parser = argparse.ArgumentParser()
    pr.add_arguments(parser)
    args = parser.parse_args(argv)
    assert args.head == "pr-head" and args.base == "origin/main"
    assert args.markdown == "report.md" and args.json == "report.json"
