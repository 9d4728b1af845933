"""`builder collect`: read a submission's seed logs (through the validator's log grammar) into submission.json."""

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


def collect(folder: Path) -> Submission:
    """Fill submission.json and the README's results from every train_seed*.log; returns the new submission."""
    json_path = folder / "submission.json"
    try:
        sub = Submission.model_validate(json.loads(json_path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise UserError(f"{json_path}: missing; assemble the folder with `builder assemble`") from exc
    except (ValueError, ValidationError) as exc:
        raise UserError(f"{json_path}: not a valid ssm-golf submission.json ({exc}); re-assemble it") from exc
    logs = sorted(folder.glob("train_seed*.log"))
    logs = [p for p in logs if not p.name.endswith(".failed.log")]
    if not logs:
        raise UserError(f"{folder}: no train_seed<SEED>.log; run the seeds first with `builder run`")
    results: dict[str, SeedResult] = {}
    first_result: dict = {}
    for path in logs:
        parsed = parse_log_file(path)
        seed, res = seed_result(parsed, path.name)
        if str(seed) in results:
            raise UserError(f"{path}: seed {seed} also appears in {results[str(seed)].log}; keep one log per seed")
        results[str(seed)] = res
        first_result = first_result or (parsed.result_json or {})
    bpbs = [r.val_bpb for r in results.values()]
    data = sub.model_dump()
    data.update(
        seeds=sorted(int(s) for s in results),
        seed_results={k: v.model_dump() for k, v in results.items()},
        val_bpb=statistics.fmean(bpbs),
        val_loss=statistics.fmean(r.val_loss for r in results.values()),
        val_bpb_std=statistics.stdev(bpbs) if len(bpbs) > 1 else None,
        bytes_total=max(r.artifact_bytes for r in results.values()),
        bytes_code=max(r.bytes_code for r in results.values()),
        hardware=hardware_of(logs[0].read_text(encoding="utf-8", errors="replace"), first_result.get("world_size", 1)),
        pytorch_version=str(first_result.get("torch", "")),
    )
    new = Submission.model_validate(data)
    write_atomic(json_path, json.dumps(new.model_dump(), indent=2) + "\n")
    readme = folder / "README.md"
    if readme.is_file():
        write_atomic(readme, replace_results(readme.read_text(encoding="utf-8"), new))
    return new


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", type=Path, help="a folder with train_seed<SEED>.log files")


def run(args: argparse.Namespace) -> int:
    sub = collect(args.submission)
    print(
        f"{args.submission}: val_bpb {sub.val_bpb:.8f} over seeds {sub.seeds}; "
        f"largest artifact {sub.bytes_total:,} bytes (code {sub.bytes_code:,})"
    )
    return 0
