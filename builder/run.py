"""`builder run`: run a submission's train_gpt.py once per seed and keep each seed's log in the folder."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from builder.cli import UserError
from builder.render import write_atomic


def check_inputs(submission: Path, data: Path, tokenizer: Path) -> None:
    if not (submission / "train_gpt.py").is_file():
        raise UserError(f"{submission}: no train_gpt.py; pass a folder made by `builder assemble`")
    if not data.is_dir() or not any(data.glob("fineweb_train_*.bin")) or not any(data.glob("fineweb_val_*.bin")):
        raise UserError(
            f"{data}: needs fineweb_train_*.bin and fineweb_val_*.bin shards; make them with `builder data sample`"
        )
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: tokenizer model not found; pass the .model file that made the shards")


def launch_command(nproc: int, script: str = "train_gpt.py") -> list[str]:
    """python for one process, torchrun (as a module of the same interpreter) for several."""
    if nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def run_seed(
    submission: Path, seed: int, data: Path, tokenizer: Path, nproc: int, workdir: Path, extra_env: dict[str, str]
) -> Path:
    """Run one seed in a fresh copy of the script; returns the log copied into the submission folder."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    shutil.copy2(submission / "train_gpt.py", workdir / "train_gpt.py")
    run_id = f"train_seed{seed}"
    env = dict(os.environ)
    env.update(DATA_PATH=str(data.resolve()), TOKENIZER_PATH=str(tokenizer.resolve()), SEED=str(seed), RUN_ID=run_id)
    env.update(extra_env)
    env["PYTHONUNBUFFERED"] = "1"
    print(f"== seed {seed}: {' '.join(launch_command(nproc))} (in {workdir})", flush=True)
    proc = subprocess.run(launch_command(nproc), cwd=workdir, env=env, check=False)
    log = workdir / "logs" / f"{run_id}.txt"
    if proc.returncode != 0:
        kept = ""
        if log.is_file():
            failed = submission / f"{run_id}.failed.log"
            write_atomic(failed, log.read_bytes())
            kept = f"; its log is in {failed}"
        raise UserError(f"seed {seed}: train_gpt.py exited with status {proc.returncode}{kept}")
    if not log.is_file():
        raise UserError(f"seed {seed}: the run wrote no {log}; is this an ssm-golf or upstream-style script?")
    target = submission / f"{run_id}.log"
    write_atomic(target, log.read_bytes())
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", type=Path, help="a folder made by `builder assemble`")
    parser.add_argument("--data", type=Path, required=True, help="folder of fineweb_{train,val}_*.bin shards")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the sentencepiece .model of the shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node; must divide 8")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    parser.add_argument("--workdir", type=Path, default=Path("runs"), help="where each seed runs (default ./runs)")


def run(args: argparse.Namespace) -> int:
    submission = args.submission
    check_inputs(submission, args.data, args.tokenizer)
    if args.nproc < 1 or 8 % args.nproc:
        raise UserError(f"--nproc {args.nproc} must divide 8")
    extra = parse_env(args.env)
    for seed in args.seeds:
        workdir = args.workdir / submission.resolve().name / f"seed{seed}"
        log = run_seed(submission, seed, args.data, args.tokenizer, args.nproc, workdir, extra)
        print(f"== seed {seed}: log {log}", flush=True)
    return 0
