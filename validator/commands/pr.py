"""`validator pr --base REV [--head REV]`: check the records folders a pull request adds, in a git checkout.

The folders are read from the head commit (git archive into a temporary directory, regular files only), so the
working tree may be anywhere. Files the pull request changes outside one new records folder are findings too.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from validator.commands.check import add_common_arguments, check_folder, check_outputs, emit, options_from
from validator.findings import Finding, error, warning
from validator.output import OutputError
from validator.report import Report

RECORD_PATH = re.compile(r"^records/(?P<track>[^/]+)/(?P<folder>[^/]+)/(?P<rest>.+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base revision of the pull request (e.g. origin/main)")
    parser.add_argument("--head", default="HEAD", help="head revision (default HEAD)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="git checkout of the upstream repository")
    add_common_arguments(parser)


class GitError(RuntimeError):
    pass


def _git(repo: Path, *args: str) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"git {' '.join(args[:2])}: {msg[-1] if msg else 'failed'}")
    return proc.stdout


def changed_files(repo: Path, base: str, head: str) -> list[tuple[str, str]]:
    """(status letter, path) for every file the pull request changes, from the merge base of base and head."""
    for label, rev in (("--base", base), ("--head", head)):
        try:
            _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        except GitError:
            msg = f"{label} {rev!r} is not a commit in {repo}; fetch it first (git fetch origin {rev})"
            raise GitError(msg) from None
    raw = _git(repo, "diff", "--name-status", "-z", "--no-renames", f"{base}...{head}")
    parts = raw.decode("utf-8", "surrogateescape").split("\0")
    return [(parts[i][:1], parts[i + 1]) for i in range(0, len(parts) - 1, 2) if parts[i]]


def classify(changes: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[Finding]]:
    """The (track, folder) pairs the PR adds, and findings for everything else it touches."""
    added: dict[tuple[str, str], set[str]] = {}
    findings: list[Finding] = []
    for status, path in changes:
        m = RECORD_PATH.match(path)
        if m:
            added.setdefault((m.group("track"), m.group("folder")), set()).add(status)
        else:
            findings.append(
                error("PR_FILE_OUTSIDE_RECORDS", f"{status} {path}: a submission only adds one records folder", path)
            )
    new = []
    for (track, folder), statuses in sorted(added.items()):
        if statuses - {"A"}:
            findings.append(
                error(
                    "PR_MODIFIES_EXISTING",
                    f"records/{track}/{folder} is modified ({''.join(sorted(statuses))}), not added: "
                    "existing records must not change",
                    f"records/{track}/{folder}",
                )
            )
        else:
            new.append((track, folder))
    if len(new) > 1:
        listed = ", ".join(f"{t}/{f}" for t, f in new)
        findings.append(warning("PR_MULTIPLE_FOLDERS", f"the pull request adds {len(new)} folders: {listed}"))
    return new, findings


def export_folder(repo: Path, head: str, track: str, folder: str, dest: Path) -> list[Finding]:
    """Write records/<track>/<folder> at `head` under dest (regular files only); findings for refused members."""
    data = _git(repo, "archive", "--format=tar", head, "--", f"records/{track}/{folder}")
    findings: list[Finding] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            rel = member.name
            if member.issym() or member.islnk():
                findings.append(
                    error("SYMLINK_OUTSIDE_FOLDER", f"link to {member.linkname!r} committed; commit the file", rel)
                )
                continue
            if not (member.isfile() or member.isdir()):
                continue
            target = (dest / rel).resolve()
            if dest.resolve() not in target.parents:
                findings.append(error("PR_UNSAFE_PATH", "path leaves the folder; not extracted", rel))
                continue
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fh = tar.extractfile(member)
            target.write_bytes(fh.read() if fh else b"")
    return findings


def run(args: argparse.Namespace) -> int:
    try:
        check_outputs(args)
        options = options_from(args)
        changes = changed_files(args.repo, args.base, args.head)
        new, pr_findings = classify(changes)
        reports: list[Report] = []
        with tempfile.TemporaryDirectory(prefix="validator-pr-") as tmp:
            for track, folder in new:
                export_findings = export_folder(args.repo, args.head, track, folder, Path(tmp))
                path = Path(tmp) / "records" / track / folder
                path.mkdir(parents=True, exist_ok=True)
                report = check_folder(path, options, args.plots, target=f"records/{track}/{folder}")
                report.findings = export_findings + report.findings
                reports.append(report)
    except (GitError, ValueError, OSError, OutputError) as exc:
        print(f"validator pr: {exc}", file=sys.stderr)
        return 2
    summary = Report(target=f"pull request {args.base}...{args.head}", findings=pr_findings)
    if not new:
        summary.findings.append(error("PR_NO_RECORDS_FOLDER", "the pull request adds no records/<track>/<folder>/"))
    return emit([summary, *reports] if summary.findings else reports, args, always_list=True, prog="validator pr")
