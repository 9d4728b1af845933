"""`validator rerun` on stand-in submissions: a faithful one passes, each lie or breach gets its own code."""

from __future__ import annotations

import json
import textwrap

import pytest

from validator.cli import main
from validator.schema import CAP_BYTES


def rerun(folder, sample_root, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    args = ["rerun", str(folder), "--data", str(sample_root), "--gpus", "no", "--workdir", str(tmp_path / "runs")]
    code = main([*args, "--json", str(out), *extra])
    return code, as_rerun(json.loads(out.read_text())) if out.exists() else {}


def as_rerun(report: dict) -> dict:
    """The validator report's findings and its rerun section's data."""
    (section,) = [s for s in report["sections"] if s["title"].startswith("Sandboxed rerun")]
    return {"findings": report["findings"], "rerun": section["data"], "verdict": report["verdict"]}


def codes(report: dict) -> set[str]:
    return {f["code"] for f in report["findings"]}


def honest_bpb(folder, sample_root, tmp_path) -> float:
    code, report = rerun(folder, sample_root, tmp_path / "probe_runs", "--seeds", "5")
    assert code == 0, report
    return report["rerun"]["seeds"][0]["reproduced_bpb"]


def test_faithful_submission_passes_and_the_score_is_recomputed(tmp_path, sample_root, make_submission, capsys):
    probe = make_submission("probe")
    bpb = honest_bpb(probe, sample_root, tmp_path)
    folder = make_submission(claims={5: bpb})
    code, report = rerun(folder, sample_root, tmp_path)
    assert code == 0, report["findings"]
    seed = report["rerun"]["seeds"][0]
    assert seed["seed"] == 5 and seed["exit_code"] == 0
    assert seed["recomputed_bpb"] == pytest.approx(seed["script_bpb"], rel=1e-7)
    assert abs(seed["bpb_gap"]) < 1e-9
    assert seed["bytes_artifact"] == 4096 and seed["bytes_total"] == 4096 + (folder / "train_gpt.py").stat().st_size
    assert seed["train_s_measured"] >= 0.04 and seed["eval_s_measured"] is not None
    assert report["rerun"]["passed"] is True
    assert "| 5 |" in capsys.readouterr().out  # the Markdown table


def test_claiming_a_better_bpb_than_it_gets_is_caught(tmp_path, sample_root, make_submission):
    folder = make_submission(claims={5: 0.5})
    code, report = rerun(folder, sample_root, tmp_path)
    assert code == 1 and "RERUN_BPB_NOT_REPRODUCED" in codes(report)


def test_tolerance_option_decides(tmp_path, sample_root, make_submission):
    bpb = honest_bpb(make_submission("probe"), sample_root, tmp_path)
    folder = make_submission(claims={5: bpb - 0.002})
    assert rerun(folder, sample_root, tmp_path / "a")[0] == 0
    code, report = rerun(folder, sample_root, tmp_path / "b", "--tolerance", "0.001")
    assert code == 1 and "RERUN_BPB_NOT_REPRODUCED" in codes(report)


def test_a_script_with_its_own_byte_accounting_is_scored_by_the_validator(tmp_path, sample_root, make_submission):
    folder = make_submission(claims={5: 1.0})
    code, report = rerun(folder, sample_root, tmp_path, "--env", "STANDIN_BPB_FACTOR=0.8")
    seed = report["rerun"]["seeds"][0]
    assert "RERUN_BPB_TABLE_MISMATCH" in codes(report) and code == 1
    assert seed["reproduced_bpb"] == seed["recomputed_bpb"]
    assert seed["script_bpb"] == pytest.approx(0.8 * seed["recomputed_bpb"], rel=1e-6)


def test_an_artifact_over_the_cap_is_caught_from_the_file(tmp_path, sample_root, make_submission):
    folder = make_submission()
    code, report = rerun(folder, sample_root, tmp_path, "--env", f"STANDIN_ARTIFACT_BYTES={CAP_BYTES}")
    seed = report["rerun"]["seeds"][0]
    assert code == 1 and "RERUN_SIZE_OVER_CAP" in codes(report)
    assert seed["bytes_total"] == CAP_BYTES + (folder / "train_gpt.py").stat().st_size


def test_under_reporting_its_size_is_caught(tmp_path, sample_root, make_submission):
    folder = make_submission(eval='print("result_json " + json.dumps(dict(bytes_total=10)))\nsys.exit(0)')
    code, report = rerun(folder, sample_root, tmp_path)
    assert code == 1 and "RERUN_BYTES_MISREPORTED" in codes(report)


def test_sabotages_in_a_full_rerun_get_their_codes(tmp_path, sample_root, make_submission):
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("x")
    folder = make_submission(
        setup=f"""
import socket, subprocess
try:
    socket.create_connection(("192.0.2.1", 9), timeout=2)
except OSError:
    pass
try:
    open({str(secret)!r}).read()  # under bwrap the host's /tmp is not the run's: recorded, then not found
except OSError:
    pass
subprocess.run(["sh", "-c", "true"])
"""
    )
    code, report = rerun(folder, sample_root, tmp_path)
    assert code == 1
    assert {"AUDIT_NETWORK", "AUDIT_READ_OUTSIDE", "AUDIT_SUBPROCESS"} <= codes(report)
    code, report = rerun(folder, sample_root, tmp_path / "allowed", "--allow-exec", "sh", "--allow-read", str(secret))
    assert codes(report) & {"AUDIT_SUBPROCESS", "AUDIT_READ_OUTSIDE"} == set()


def test_sleeping_past_the_limit_is_killed_and_reported(tmp_path, sample_root, make_submission):
    folder = make_submission(train="time.sleep(120)")
    code, report = rerun(folder, sample_root, tmp_path, "--train-limit", "1", "--grace", "0.5")
    assert code == 1
    assert {"RERUN_KILLED_AT_LIMIT", "RERUN_TRAIN_TIME_OVER_LIMIT", "RERUN_NO_SCORE"} <= codes(report)
    assert "train phase" in report["rerun"]["seeds"][0]["killed"]


def test_eval_only_scores_the_artifact_and_finds_its_seed_by_hash(tmp_path, sample_root, make_submission):
    probe = make_submission("probe")
    code, first = rerun(probe, sample_root, tmp_path / "first", "--seeds", "9")
    seed_report = first["rerun"]["seeds"][0]
    folder = make_submission(claims={9: seed_report["reproduced_bpb"], 4: 1.0})
    artifact = tmp_path / "runs_first_artifact.ptz"
    artifact.write_bytes((tmp_path / "first" / "runs" / "full_seed9" / "work" / "final_model.int8.ptz").read_bytes())
    log = json.dumps({"artifact_sha256": seed_report["artifact_sha256"], "val_bpb": seed_report["reproduced_bpb"]})
    (folder / "train_seed9.log").write_text(f"seed:9\nresult_json {log}\n")
    code, report = rerun(folder, sample_root, tmp_path, "--eval-only", "--artifact", str(artifact))
    assert code == 0, report["findings"]
    seed = report["rerun"]["seeds"][0]
    assert report["rerun"]["mode"] == "eval-only" and seed["seed"] == 9
    assert seed["reproduced_bpb"] == pytest.approx(seed_report["reproduced_bpb"], rel=1e-9)
    assert seed["train_s_measured"] is None and seed["bytes_artifact"] == artifact.stat().st_size


def test_eval_only_needs_per_token_losses_of_the_real_stream(tmp_path, sample_root, make_submission):
    artifact = tmp_path / "a.ptz"
    artifact.write_bytes(b"\1" * 100)
    folder = make_submission(eval='os.environ.pop("TOKEN_LOSSES")')
    code, report = rerun(folder, sample_root, tmp_path / "a", "--eval-only", "--artifact", str(artifact))
    assert code == 1 and "RERUN_TOKEN_LOSSES_MISSING" in codes(report)
    shifted = make_submission("shifted", eval="SCORED_OFFSET = 1")
    text = (shifted / "train_gpt.py").read_text().replace("[: SCORED + 1]", "[1 : SCORED + 2]")
    (shifted / "train_gpt.py").write_text(text)
    code, report = rerun(shifted, sample_root, tmp_path / "b", "--eval-only", "--artifact", str(artifact))
    assert code == 1 and "RERUN_TOKEN_STREAM_MISMATCH" in codes(report)


def test_bad_input_exits_2_with_one_line(tmp_path, sample_root, make_submission, capsys):
    folder = make_submission()
    assert main(["rerun", str(tmp_path), "--data", str(sample_root)]) == 2
    assert "no such script" in capsys.readouterr().err
    assert main(["rerun", str(folder), "--data", str(tmp_path / "nowhere")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["rerun", str(folder), "--data", str(sample_root), "--eval-only"]) == 2
    assert "--artifact" in capsys.readouterr().err


def test_static_flag_puts_static_findings_and_the_rerun_section_in_one_report(tmp_path, sample_root, make_submission):
    folder = make_submission(claims={5: 1.0})
    md = tmp_path / "report.md"
    code, report = rerun(folder, sample_root, tmp_path, "--static", "--markdown", str(md))
    static = {c for c in codes(report) if not c.startswith(("RERUN_", "AUDIT_"))}
    assert static, codes(report)  # e.g. no seed logs in the stand-in folder
    assert code == {"pass": 0, "fail": 1}[report["verdict"]]
    text = md.read_text()
    assert "### Sandboxed rerun (full)" in text and "| 5 |" in text


def test_training_inside_validation_markers_is_not_free(tmp_path, sample_root, make_submission):
    # 3 s of "validation" with a 1 s train limit: only half the limit may be left out, the rest is training time
    train = 'print("phase:val begin", flush=True)\ntime.sleep(3)\nprint("phase:val end", flush=True)'
    folder = make_submission(train=train)
    code, report = rerun(folder, sample_root, tmp_path, "--train-limit", "1", "--grace", "0.5")
    assert code == 1
    assert {"RERUN_TRAIN_TIME_OVER_LIMIT", "RERUN_VALIDATION_PAUSE_OVER_BUDGET"} <= codes(report)
    (over,) = [f for f in report["findings"] if f["code"] == "RERUN_VALIDATION_PAUSE_OVER_BUDGET"]
    assert over["severity"] == "warning" and "VAL_LOSS_EVERY" in over["message"]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("os.unlink(os.environ['SSM_GOLF_AUDIT_LOG'])", "AUDIT_TAMPER"),
        ("os.truncate(os.environ['SSM_GOLF_AUDIT_LOG'], 0)", "AUDIT_TAMPER"),
        ("import shutil\nshutil.rmtree(os.path.dirname(os.environ['SSM_GOLF_AUDIT_LOG']))", "AUDIT_TAMPER"),
        # 201 spawns of an allowed program used to fill the hook's quota and hide the forbidden one after them
        (
            "import subprocess\nfor _ in range(201): subprocess.run(['uname'], capture_output=True)\n"
            "subprocess.run(['sh', '-c', 'true'])",
            "AUDIT_SUBPROCESS",
        ),
        ("import subprocess\nsubprocess.run([sys.executable, '-uI', '-c', 'pass'])", "AUDIT_SUBPROCESS"),
        ("import subprocess\nsubprocess.run([sys.executable, '-c', 'pass'], env={})", "AUDIT_SUBPROCESS"),
    ],
    ids=["unlink", "truncate", "rmtree", "spawn-flood", "python-uI", "python-env-scrubbed"],
)
def test_erasing_or_bypassing_the_audit_trail_fails_the_rerun(tmp_path, sample_root, make_submission, setup, expected):
    # each attempt is wrapped so that a refusal does not also end the script: the finding alone must fail it
    folder = make_submission(setup=f"try:\n{textwrap.indent(setup, '    ')}\nexcept PermissionError:\n    pass")
    code, report = rerun(folder, sample_root, tmp_path)
    assert code == 1 and expected in codes(report), codes(report)
    assert "RERUN_EXIT_NONZERO" not in codes(report)


@pytest.mark.parametrize(
    "setup",
    [
        "ctypes.CDLL(None).unlink(os.environ['SSM_GOLF_AUDIT_LOG'].encode())",
        "ctypes.CDLL(None).truncate(os.environ['SSM_GOLF_AUDIT_LOG'].encode(), ctypes.c_long(0))",
    ],
    ids=["unlink", "truncate"],
)
def test_an_audit_log_erased_past_the_hook_fails_the_rerun(tmp_path, sample_root, make_submission, setup):
    # libc through ctypes raises no audit event: the validator sees the log gone or cut from outside
    folder = make_submission(setup=f"import ctypes\n{setup}")
    code, report = rerun(folder, sample_root, tmp_path)
    tamper = [f for f in report["findings"] if f["code"] == "AUDIT_TAMPER"]
    assert code == 1 and tamper and tamper[0]["severity"] == "error", codes(report)
    assert "AUDIT_NOT_ACTIVE" not in codes(report)


def test_our_script_that_drops_its_per_token_losses_fails_a_full_rerun(tmp_path, sample_root, make_submission):
    # a 20 % byte-accounting deflation, claimed as printed, and the scoring hook removed at run time
    bpb = honest_bpb(make_submission("probe"), sample_root, tmp_path)
    folder = make_submission(claims={5: bpb * 0.8}, eval='os.environ.pop("TOKEN_LOSSES")')
    code, report = rerun(folder, sample_root, tmp_path, "--env", "STANDIN_BPB_FACTOR=0.8")
    (missing,) = [f for f in report["findings"] if f["code"] == "RERUN_TOKEN_LOSSES_MISSING"]
    assert code == 1 and missing["severity"] == "error" and "train_gpt.py reads TOKEN_LOSSES" in missing["message"]


def test_a_foreign_script_without_per_token_losses_is_flagged_unverified(tmp_path, sample_root, make_submission):
    bpb = honest_bpb(make_submission("probe"), sample_root, tmp_path)
    folder = make_submission(claims={5: bpb * 0.8})
    script = folder / "train_gpt.py"
    text = script.read_text()
    start = text.index('if os.environ.get("TOKEN_LOSSES")')
    end = text.index("\n", text.index("np.savez", start))
    script.write_text(text[:start] + "pass  # an upstream record: no per-token losses" + text[end:])
    assert "TOKEN_LOSSES" not in script.read_text()
    md = tmp_path / "report.md"
    code, report = rerun(folder, sample_root, tmp_path, "--env", "STANDIN_BPB_FACTOR=0.8", "--markdown", str(md))
    (unverified,) = [f for f in report["findings"] if f["code"] == "RERUN_SCORE_NOT_RECOMPUTED"]
    assert unverified["severity"] == "warning" and "score not independently verified" in unverified["message"]
    assert report["rerun"]["score_verified"] is False and report["rerun"]["seeds"][0]["recomputed_bpb"] is None
    assert "Score not independently verified" in md.read_text()
    assert code == 0  # an honest foreign rerun is not failed for lacking a hook it never had


def test_a_recomputed_score_is_marked_verified(tmp_path, sample_root, make_submission):
    code, report = rerun(make_submission(), sample_root, tmp_path)
    assert report["rerun"]["score_verified"] is True


def test_a_run_that_exits_nonzero_fails_even_with_a_matching_score(tmp_path, sample_root, make_submission):
    bpb = honest_bpb(make_submission("probe"), sample_root, tmp_path)
    folder = make_submission(claims={5: bpb * 0.8})
    (folder / "train_gpt.py").write_text((folder / "train_gpt.py").read_text() + "sys.exit(1)\n")
    code, report = rerun(folder, sample_root, tmp_path, "--env", "STANDIN_BPB_FACTOR=0.8")
    seed = report["rerun"]["seeds"][0]
    assert seed["reproduced_bpb"] == pytest.approx(seed["claimed_bpb"])  # the printed score matches its claim
    (failed,) = [f for f in report["findings"] if f["code"] == "RERUN_EXIT_NONZERO"]
    assert code == 1 and failed["severity"] == "error" and report["verdict"] == "fail"


def test_the_default_tolerance_is_the_maintainers_0_0025(tmp_path, sample_root, make_submission):
    bpb = honest_bpb(make_submission("probe"), sample_root, tmp_path)
    code, report = rerun(make_submission(claims={5: bpb - 0.003}), sample_root, tmp_path)
    assert code == 1 and "RERUN_BPB_NOT_REPRODUCED" in codes(report)
    assert report["rerun"]["tolerance_bpb"] == 0.0025


def test_a_better_score_other_bytes_and_missing_markers_get_their_warnings(tmp_path, sample_root, make_submission):
    bpb = honest_bpb(make_submission("probe"), sample_root, tmp_path)
    folder = make_submission(claims={5: bpb + 0.01})
    meta = json.loads((folder / "submission.json").read_text())
    meta["seed_results"]["5"]["artifact_bytes"] = 1234
    (folder / "submission.json").write_text(json.dumps(meta))
    script = folder / "train_gpt.py"
    script.write_text(script.read_text().replace('print("phase:train begin", flush=True)', "pass"))
    code, report = rerun(folder, sample_root, tmp_path)
    found = {f["code"]: f["severity"] for f in report["findings"]}
    assert found["RERUN_BPB_BETTER_THAN_CLAIMED"] == "warning"
    assert found["RERUN_BYTES_DIFFER_FROM_CLAIM"] == "warning"
    assert found["RERUN_NO_PHASE_MARKERS"] == "warning"
