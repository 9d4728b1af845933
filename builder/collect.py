"""`builder collect`: read a submission's seed logs (through the validator's log grammar) into submission.json.

The seeds collected are those named with `--seeds`, else those submission.json already names (`builder run`
names each seed it ran with success), else, for a folder no run has named any in, every `train_seed<SEED>.log`.
Other `train_seed*.log` files in the folder are left out, with a line saying so; the overrides the runs were made
with (submission.json's `env`, recorded by `builder run`) are kept and shown in the README's results.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from pydantic import ValidationError

from builder.cli import UserError
from builder.render import replace_results, write_atomic
from validator.logs import ParsedLog, parse_log_file
from validator.schema import SeedResult, Submission

DEVICE_RE = re.compile(r"^device:(?P<name>.+) count:(?P<count>\d+)\s*$", re.MULTILINE)
LOG_RE = re.compile(r"train_seed(?P<seed>\d+)\.log")


def seed_result(parsed: ParsedLog, log_name: str) -> tuple[int, SeedResult]:
    """One seed's figures; the score line and result_json must agree."""
    result, score = parsed.result_json, parsed.score
    if result is None or score is None:
        raise UserError(f"{log_name}: no result_json or final score line; the run did not finish, run it again")
    if abs(score.val_bpb - result["val_bpb"]) > 5e-9:
        raise UserError(f"{log_name}: score line {score.val_bpb} and result_json {result['val_bpb']} disagree")
    try:
        seed = int(result["seed"])
        return seed, SeedResult(
            val_loss=float(result["val_loss"]),
            val_bpb=float(result["val_bpb"]),
            artifact_bytes=int(result["bytes_total"]),
            bytes_model=int(result["bytes_model"]),
            bytes_code=int(result["bytes_code"]),
            steps=int(result["steps"]),
            train_time_ms=float(result["train_time_ms"]),
            eval_time_ms=float(result["eval_time_ms"]),
            score_tag=score.tag,
            log=log_name,
        )
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise UserError(f"{log_name}: result_json lacks a field or has a bad value ({exc}); rerun the seed") from exc


def hardware_of(log_text: str, world_size: int) -> str:
    m = DEVICE_RE.search(log_text)
    return f"{world_size}x{m.group('name').strip()}" if m else f"{world_size}xCPU"


def load_submission(folder: Path) -> Submission:
    """submission.json of `folder`, strictly; UserError naming the file when it is missing or invalid."""
    json_path = folder / "submission.json"
    try:
        return Submission.model_validate(json.loads(json_path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise UserError(f"{json_path}: missing; assemble the folder with `builder assemble`") from exc
    except (ValueError, ValidationError) as exc:
        raise UserError(f"{json_path}: not a valid ssm-golf submission.json ({exc}); re-assemble it") from exc


def save_submission(folder: Path, sub: Submission) -> None:
    """Write submission.json and the README's results section (each by temporary file and rename)."""
    write_atomic(folder / "submission.json", json.dumps(sub.model_dump(), indent=2) + "\n")
    readme = folder / "README.md"
    if readme.is_file():
        write_atomic(readme, replace_results(readme.read_text(encoding="utf-8"), sub))


def seed_logs(folder: Path) -> dict[int, Path]:
    """seed -> `train_seed<SEED>.log` in the folder (other names, such as `*.failed.log`, are not seed logs)."""
    found = {}
    for path in sorted(folder.glob("train_seed*.log")):
        if m := LOG_RE.fullmatch(path.name):
            found[int(m.group("seed"))] = path
    return found


def without_results(sub: Submission, env: dict[str, str]) -> Submission:
    """`sub` with no seeds or figures, recording the overrides `env` of the runs to come."""
    data = sub.model_dump()
    data.update(env=env, seeds=[], seed_results={}, val_bpb=None, val_loss=None, val_bpb_std=None)
    data.update(bytes_total=None, bytes_code=None, hardware="", pytorch_version="")
    return Submission.model_validate(data)


def collect(
    folder: Path, seeds: list[int] | None = None, env: dict[str, str] | None = None, quiet: bool = False
) -> Submission:
    """Fill submission.json and the README's results from the seeds' logs; returns the new submission.

    `seeds`: the seeds to collect (default: see the module docstring); `env`: the overrides to record (default:
    those submission.json already records).
    """
    json_path = folder / "submission.json"
    sub = load_submission(folder)
    found = seed_logs(folder)
    wanted = sorted(set(seeds)) if seeds else sub.seeds or sorted(found)
    if not wanted:
        raise UserError(f"{folder}: no train_seed<SEED>.log; run the seeds first with `builder run`")
    missing = [s for s in wanted if s not in found]
    if missing:
        named = "--seeds" if seeds else f"{json_path.name}'s seeds"
        have = " ".join(str(s) for s in wanted if s in found)
        raise UserError(
            f"{folder}: no train_seed{missing[0]}.log for seed {missing[0]} of {named}; run it with "
            f"`builder run --seeds {' '.join(map(str, missing))}`"
            + (f", or collect the others with `builder collect --seeds {have}`" if have else "")
        )
    stray = [found[s].name for s in sorted(found) if s not in wanted]
    if stray and not quiet:
        why = "not among --seeds" if seeds else f"not among the seeds {wanted} of {json_path.name}"
        print(f"{folder}: left out {', '.join(stray)} ({why}; name them with --seeds to collect them)")
    results: dict[str, SeedResult] = {}
    first_result: dict = {}
    for seed in wanted:
        path = found[seed]
        parsed = parse_log_file(path)
        logged_seed, res = seed_result(parsed, path.name)
        if logged_seed != seed:
            raise UserError(f"{path}: its result_json is of seed {logged_seed}; rename it train_seed{logged_seed}.log")
        results[str(seed)] = res
        first_result = first_result or (parsed.result_json or {})
    bpbs = [r.val_bpb for r in results.values()]
    data = sub.model_dump()
    data.update(
        seeds=wanted,
        seed_results={k: v.model_dump() for k, v in results.items()},
        val_bpb=statistics.fmean(bpbs),
        val_loss=statistics.fmean(r.val_loss for r in results.values()),
        val_bpb_std=statistics.stdev(bpbs) if len(bpbs) > 1 else None,
        bytes_total=max(r.artifact_bytes for r in results.values()),
        bytes_code=max(r.bytes_code for r in results.values()),
        hardware=hardware_of(
            found[wanted[0]].read_text(encoding="utf-8", errors="replace"), first_result.get("world_size", 1)
        ),
        pytorch_version=str(first_result.get("torch", "")),
    )
    if env is not None:
        data["env"] = env
    new = Submission.model_validate(data)
    save_submission(folder, new)
    return new


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", type=Path, help="a folder with train_seed<SEED>.log files")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="the seeds to collect (default: those submission.json names)"
    )


def run(args: argparse.Namespace) -> int:
    sub = collect(args.submission, seeds=args.seeds)
    print(
        f"{args.submission}: val_bpb {sub.val_bpb:.8f} over seeds {sub.seeds}; "
        f"largest artifact {sub.bytes_total:,} bytes (code {sub.bytes_code:,})"
    )
    return 0
