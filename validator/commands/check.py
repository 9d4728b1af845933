"""`validator check PATH...`: static checks of records folders; exit 0 pass, 1 error findings, 2 could not run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from validator.checks import run_checks
from validator.checks.context import CheckOptions, load_context
from validator.output import OutputError, check_writable, write_output
from validator.report import Report, build_report, print_terminal, write_loss_plots


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `check` and `pr`."""
    parser.add_argument("--json", metavar="FILE", help="write the JSON report here ('-' for stdout)")
    parser.add_argument("--markdown", metavar="FILE", help="write the Markdown report here ('-' for stdout)")
    parser.add_argument("--plots", metavar="DIR", type=Path, help="write a loss-curve PNG per seed here")
    parser.add_argument("--plain", action="store_true", help="plain terminal output (no colours)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the verdict line")
    parser.add_argument("--allow-missing-code", action="store_true", help="a missing train_gpt.py is a note")
    parser.add_argument("--previous", help="frontier row to compare a record with (PR number or folder)")
    parser.add_argument("--frontier", type=Path, help="frontier table (JSON) instead of the bundled one")
    parser.add_argument("--skip-source", action="store_true", help="logs and metadata only (no script analysis)")
    parser.add_argument("--track", choices=("10min_16mb", "non_record_16mb"), help="track when not under records/")
    rec = parser.add_mutually_exclusive_group()
    rec.add_argument("--record", dest="record", action="store_true", default=None, help="treat as a record claim")
    rec.add_argument("--no-record", dest="record", action="store_false", help="treat as a non-record submission")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="records folder(s) to check")
    parser.add_argument("-j", "--jobs", type=int, default=0, help="folders checked in parallel (default: CPU count)")
    add_common_arguments(parser)


def options_from(args: argparse.Namespace) -> CheckOptions:
    """Options from the command line; a bad --frontier file or an unknown --previous row raises ValueError."""
    from validator.significance import choose_previous, load_frontier

    rows = load_frontier(args.frontier)
    if args.previous:
        choose_previous(rows, None, "", args.previous)
    return CheckOptions(
        allow_missing_code=args.allow_missing_code,
        previous=args.previous,
        record=args.record,
        frontier_file=args.frontier,
        track=args.track,
        skip_source=args.skip_source,
    )


def check_folder(path: Path, options: CheckOptions, plots: Path | None = None, target: str | None = None) -> Report:
    """Check one folder and build its report (plots written when asked and when the logs have step lines)."""
    ctx = load_context(path, options)
    report = build_report(ctx, run_checks(ctx), target=target)
    if plots is not None:
        report.plots = [str(p) for p in write_loss_plots(ctx, plots / ctx.folder.name)]
    return report


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse report paths that cannot be written before any folder is checked (raises OutputError)."""
    check_writable(args.json, "JSON report")
    check_writable(args.markdown, "Markdown report")


def emit(
    reports: list[Report], args: argparse.Namespace, always_list: bool = False, prog: str = "validator check"
) -> int:
    """Terminal, JSON and Markdown output for one or more reports; returns the worst exit code (2 when a report
    file cannot be written: one line on stderr)."""
    try:
        _write_reports(reports, args, always_list)
    except OutputError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    to_stdout = "-" in (args.json, args.markdown)
    for report in reports:
        if to_stdout:
            print(report.headline(), file=sys.stderr)
        elif args.quiet:
            print(report.headline())
        else:
            print_terminal(report, plain=args.plain or not sys.stdout.isatty())
    return max((r.exit_code for r in reports), default=0)


def _write_reports(reports: list[Report], args: argparse.Namespace, always_list: bool) -> None:
    if args.json:
        import json

        if len(reports) == 1 and not always_list:
            payload = reports[0].to_dict()
        else:
            worst = max((r.exit_code for r in reports), default=0)
            payload = {"exit_code": worst, "reports": [r.to_dict() for r in reports]}
        write_output(args.json, json.dumps(payload, indent=2, allow_nan=False) + "\n", "JSON report")
    if args.markdown:
        body = "\n".join(r.to_markdown(level=2 if len(reports) == 1 else 3) for r in reports)
        write_output(args.markdown, body, "Markdown report")


def check_many(paths: list[Path], options: CheckOptions, plots: Path | None, jobs: int) -> list[Report]:
    """Check folders in order; with several folders and jobs > 1, in worker processes."""
    jobs = jobs or os.cpu_count() or 1
    if len(paths) < 2 or jobs < 2:
        return [check_folder(p, options, plots) for p in paths]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(paths))) as pool:
        return list(pool.map(check_folder, paths, [options] * len(paths), [plots] * len(paths)))


def run(args: argparse.Namespace) -> int:
    try:
        check_outputs(args)
        options = options_from(args)
        reports = check_many(args.paths, options, args.plots, args.jobs)
    except (NotADirectoryError, FileNotFoundError, ValueError, OSError, OutputError) as exc:
        print(f"validator check: {exc}", file=sys.stderr)
        return 2
    return emit(reports, args)
