"""Reports and exit codes through the real command line: JSON, Markdown, loss-curve PNGs, 0 / 1 / 2."""

from __future__ import annotations

import json

from validator.cli import main
from validator.findings import error
from validator.report import Report, Section


def test_pass_writes_json_markdown_and_plots(make_submission, tmp_path, capsys):
    folder = make_submission()
    out_json, out_md, plots = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "plots"
    rc = main(["check", str(folder), "--json", str(out_json), "--markdown", str(out_md), "--plots", str(plots), "-q"])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["verdict"] == "pass" and data["exit_code"] == 0
    assert {row["seed"] for row in data["seeds"]} == {42, 1337, 2024}
    md = out_md.read_text()
    assert md.startswith("## ✅ PASS") and "| seed |" in md and "Significance vs" in md
    pngs = sorted(p.name for p in (plots / folder.name).iterdir())
    assert pngs == ["loss_seed1337.png", "loss_seed2024.png", "loss_seed42.png"]
    assert (plots / folder.name / "loss_seed42.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in capsys.readouterr().out


def test_fail_exit_1_and_markdown_orders_by_severity(make_submission, tmp_path, capsys):
    folder = make_submission(log_kwargs={"eval_ms": 700_000.0}, json_overrides={"bytes_total": 15_900_000})
    rc = main(["check", str(folder), "--markdown", "-", "--plain"])
    assert rc == 1
    md = capsys.readouterr().out
    assert md.index("Errors") < md.index("Warnings") < md.index("Notes")
    assert "`EVAL_TIME_OVER_LIMIT`" in md and "`ROUND_BYTES`" in md


def test_could_not_run_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_bad_frontier_option_exit_2(make_submission, tmp_path, capsys):
    bad = tmp_path / "frontier.json"
    bad.write_text("[")
    assert main(["check", str(make_submission()), "--frontier", str(bad)]) == 2
    assert "frontier.json" in capsys.readouterr().err


def test_report_is_extensible_and_internal_errors_exit_2():
    report = Report(target="x", findings=[error("VALIDATOR_INTERNAL_ERROR", "boom")])
    report.sections.append(Section("Re-run", "re-ran 3 seeds", {"seeds": 3}))
    assert report.exit_code == 2 and report.verdict == "could not run"
    assert "## ⚠️ COULD NOT RUN" in report.to_markdown() and "### Re-run" in report.to_markdown()
    assert json.loads(report.to_json())["sections"][0]["data"] == {"seeds": 3}


def test_rich_terminal_output_escapes_markup(make_submission, capsys):
    from validator.checks import run_checks
    from validator.checks.context import load_context
    from validator.report import build_report, print_terminal

    ctx = load_context(make_submission(json_overrides={"seeds": [1, 2]}))
    report = build_report(ctx, run_checks(ctx))
    print_terminal(report, plain=False)
    assert "[1, 2]" in capsys.readouterr().out
