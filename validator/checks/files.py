"""Required files, the folder's name, and its track (misfiled records)."""

from __future__ import annotations

import re

from validator.checks.context import TRACK_DIR_NAMES, Context
from validator.findings import Finding, error, note, warning

FOLDER_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_[A-Za-z0-9][A-Za-z0-9._+\-]*$")
NON_RECORD_WORDS = re.compile(r"\bnon[- _]?record\b", re.IGNORECASE)


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    files = ctx.folder.files
    if not any(f.lower() == "readme.md" for f in ctx.folder.top_level()):
        out.append(error("MISSING_README", "no README.md; add one describing the run and how to reproduce it"))
    if ctx.json_file is None:
        out.append(error("MISSING_SUBMISSION_JSON", "no submission.json; add name, github_id, val_bpb and the figures"))
    if "train_gpt.py" not in files:
        others = [f for f in ctx.folder.top_level() if f.endswith(".py")]
        hint = f" (found {', '.join(others[:3])})" if others else ""
        if ctx.options.allow_missing_code:
            out.append(note("MISSING_SCRIPT", f"no train_gpt.py{hint}; allowed by --allow-missing-code"))
        else:
            out.append(error("MISSING_SCRIPT", f"no train_gpt.py{hint}; all counted code must live in train_gpt.py"))
    if not ctx.runs:
        out.append(error("MISSING_LOGS", "no training log; add the log each seed's run wrote (train_seed<N>.log)"))
    else:
        out.extend(_evidence(ctx))
    if "requirements.txt" not in files:
        out.append(note("NO_REQUIREMENTS", "no requirements.txt; list the packages beyond the RunPod image"))
    name = ctx.folder.name
    if not FOLDER_NAME.match(name):
        out.append(error("FOLDER_NAME", f"folder name {name!r} is not YYYY-MM-DD_<Name> without spaces"))
    sub = ctx.submission
    if sub and sub.date and FOLDER_NAME.match(name) and not name.startswith(sub.date):
        out.append(note("FOLDER_DATE", f"folder date {name[:10]} differs from submission.json date {sub.date}"))
    if ctx.track_dir is not None and ctx.track_dir not in TRACK_DIR_NAMES:
        out.append(
            error("TRACK_DIR_UNKNOWN", f"parent folder {ctx.track_dir!r} is not one of {sorted(TRACK_DIR_NAMES)}")
        )
    out.extend(_track_consistency(ctx))
    return out


def _evidence(ctx: Context) -> list[Finding]:
    """Logs that hold no score line, or no size line, at all: for a record claim the claim cannot be checked."""
    out: list[Finding] = []
    make = error if ctx.is_record else warning
    n = len(ctx.runs)
    if not ctx.scored_runs:
        out.append(
            make(
                "NO_SCORE_LINE",
                f"none of the {n} log(s) holds a final score line (e.g. final_int8_zlib_roundtrip_exact val_loss:... "
                "val_bpb:...): the claimed val_bpb cannot be checked; commit the complete logs",
            )
        )
    sized = [
        r
        for r in ctx.runs
        if r.log.bytes_total is not None or r.log.bytes_model is not None or r.log.bytes_total_approx is not None
    ]
    if not sized and not any(r.log.result_json for r in ctx.runs):
        out.append(
            make(
                "NO_SIZE_LINE",
                f"none of the {n} log(s) holds a 'Total submission size' or 'Serialized model' line: the "
                "16,000,000-byte cap cannot be checked; commit the complete logs",
            )
        )
    return out


def _track_consistency(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    sub = ctx.submission
    dir_track = TRACK_DIR_NAMES.get(ctx.track_dir or "")
    if sub and sub.track and dir_track and sub.track != dir_track:
        out.append(
            error(
                "TRACK_MISFILED",
                f"submission.json says {sub.track_raw!r} but the folder is under {ctx.track_dir}; move it",
                ctx.json_file,
            )
        )
    if sub and sub.unlimited_compute and ctx.track == "10min_16mb":
        out.append(error("TRACK_MISFILED", "unlimited-compute run filed in the 10-minute record track", ctx.json_file))
    if ctx.track == "10min_16mb" and ctx.readme and NON_RECORD_WORDS.search(ctx.readme[:4000]):
        out.append(
            warning(
                "TRACK_MISFILED", "README calls this a non-record submission but it is in the record track", "README.md"
            )
        )
    if ctx.track == "10min_16mb" and sub and sub.hardware and not re.search(r"8\s*x\s*H100", sub.hardware, re.I):
        out.append(
            warning("HARDWARE_NOT_8XH100", f"hardware {sub.hardware!r}; records run on 8xH100 SXM", ctx.json_file)
        )
    if ctx.track is None:
        out.append(note("TRACK_UNKNOWN", "track unknown (no records/<track>/ parent, no 'track'); pass --track"))
    return out
