"""Findings cannot be hidden (issue 13, item 3): every log is read, what cannot be read or audited fails a record."""

from __future__ import annotations

import base64
import lzma

from validator.checks import run_checks
from validator.checks.context import load_context
from validator.findings import Severity


def _findings(folder, **options):
    from validator.checks.context import CheckOptions

    ctx = load_context(folder, CheckOptions(**options))
    return ctx, run_checks(ctx)


def _by_code(findings) -> dict:
    out: dict = {}
    for f in findings:
        out.setdefault(f.code, []).append(f)
    return out


def test_junk_logs_sorting_first_do_not_push_the_real_logs_out(make_submission):
    folder = make_submission(log_kwargs={"eval_ms": 700_000.0})  # the real logs break the eval limit
    for i in range(200):
        (folder / f"0000_junk_{i:03d}.log").write_text(f"junk {i} val_loss nothing here\n")
    ctx, findings = _findings(folder)
    codes = _by_code(findings)
    assert {r.rel for r in ctx.runs} >= {"train_seed42.log", "train_seed1337.log", "train_seed2024.log"}
    assert codes["EVAL_TIME_OVER_LIMIT"][0].severity is Severity.ERROR
    assert "LOGS_NOT_READ" not in codes


def test_logs_in_a_junk_padded_subfolder_are_read(make_submission):
    folder = make_submission()
    (folder / "aaa").mkdir()
    for i in range(100):
        (folder / "aaa" / f"train_{i:03d}.txt").write_text("val_loss junk\n")
    sub = folder / "zzz"
    sub.mkdir()
    (sub / "train_seed7.log").write_text("ngram_cache_enabled: True\nval_loss:1 \n")
    ctx, _ = _findings(folder)
    assert "zzz/train_seed7.log" in {r.rel for r in ctx.runs}


def test_listing_cap_is_an_error_for_a_record(make_submission, monkeypatch):
    import validator.folder as vf

    monkeypatch.setattr(vf, "MAX_FILES", 50)
    folder = make_submission()
    (folder / "aaa").mkdir()
    for i in range(60):
        (folder / "aaa" / f"f{i}.bin").write_bytes(b"x")
    _, findings = _findings(folder)
    too_many = _by_code(findings)["TOO_MANY_FILES"]
    assert too_many[0].severity is Severity.ERROR and "cannot be accepted unread" in too_many[0].message
    _, findings = _findings(folder, record=False)
    assert _by_code(findings)["TOO_MANY_FILES"][0].severity is Severity.WARNING


def test_read_budget_hit_is_an_error_naming_the_unread_logs(make_submission, monkeypatch):
    import validator.checks.context as vc

    folder = make_submission()
    for i in range(5):
        (folder / f"zz_extra_{i}.log").write_text("val_loss: 1\n" * 200)
    real = sum(p.stat().st_size for p in folder.glob("train_seed*.log"))
    monkeypatch.setattr(vc, "LOG_READ_BUDGET_BYTES", real + 100)
    ctx, findings = _findings(folder)
    unread = _by_code(findings)["LOGS_NOT_READ"][0]
    assert unread.severity is Severity.ERROR and "5 of 8" in unread.message and "zz_extra_0.log" in unread.message
    assert {"train_seed42.log", "train_seed1337.log"} <= {r.rel for r in ctx.runs}  # the telling names first


XOR_WRAPPER = """import lzma, base64
KEY = 23
P = "{payload}"
exec(lzma.decompress(bytes(b ^ KEY for b in base64.b85decode(P))))
"""


def test_unknown_wrapper_encoding_is_an_error_for_a_record(make_submission):
    inner = lzma.compress(b"print('hidden code')\n")
    payload = base64.b85encode(bytes(b ^ 23 for b in inner)).decode()
    folder = make_submission(script=XOR_WRAPPER.format(payload=payload))
    _, findings = _findings(folder)
    hit = _by_code(findings)["WRAPPER_UNDECODABLE"][0]
    assert hit.severity is Severity.ERROR and hit.file == "train_gpt.py"
    assert "\n" not in hit.message and "cannot be accepted unaudited" in hit.message
    _, findings = _findings(folder, record=False)
    assert _by_code(findings)["WRAPPER_UNDECODABLE"][0].severity is Severity.WARNING


def test_script_with_nul_bytes_is_an_error_for_a_record(make_submission):
    folder = make_submission()
    (folder / "train_gpt.py").write_bytes(b"import os\x00\nprint(1)\n")
    _, findings = _findings(folder)
    hit = _by_code(findings)["SOURCE_UNPARSED"][0]
    assert hit.severity is Severity.ERROR and "null bytes" in hit.message and "\n" not in hit.message


def test_logs_without_score_or_size_lines_fail_a_record(make_submission):
    folder = make_submission()
    for log in folder.glob("train_seed*.log"):
        kept = [
            line
            for line in log.read_text().splitlines()
            if not line.startswith(("final_", "Total submission", "Serialized", "result_json"))
        ]
        log.write_text("\n".join(kept) + "\n")
    _, findings = _findings(folder)
    codes = _by_code(findings)
    assert codes["NO_SCORE_LINE"][0].severity is Severity.ERROR
    assert codes["NO_SIZE_LINE"][0].severity is Severity.ERROR
    _, findings = _findings(folder, record=False)
    assert _by_code(findings)["NO_SCORE_LINE"][0].severity is Severity.WARNING
