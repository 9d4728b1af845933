"""`builder run`: run a submission's train_gpt.py once per seed in the sandbox and keep each seed's log in the folder.

Each seed runs in its own copy of the folder (`--workdir/<folder>/seed<SEED>`) through validator.sandbox: locally
(own process group, scrubbed environment, no network where the platform allows, audit hook, wall-clock limits with a
hard kill) or in the ssm-golf container (`--backend docker`). Several processes per node go through torchrun;
several nodes through torchrun's own rendezvous options (`--nnodes --node-rank --rdzv-endpoint ...`), run once on
every node with the same rendezvous and the node's own rank.

Before anything runs, every shard of --data is checked (header, version, size against its token count). A seed's
log is kept in the folder only when its run succeeded (exit 0 and a result_json line); then the seed is recorded in
submission.json and the README's results (as `builder collect` does), with the run's `--env` overrides in
submission.json's `env`, which `validator rerun` applies again. A failed run's log stays in the work dir. Overrides
that are not hyperparameters of the script (OMP_NUM_THREADS, CUDA_*, ...) reach the run but are not recorded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from builder.cli import UserError
from builder.collect import collect, load_submission, save_submission, without_results
from builder.data.shards import SPLITS, list_shards, read_header
from builder.render import write_atomic
from validator.findings import Finding, Severity
from validator.logs import parse_log_file
from validator.sandbox import Launch, Limits, SandboxError, SandboxRequest, SandboxResult, run_sandboxed
from validator.sandbox.audit import audit_findings
from validator.sandbox.verdict import run_findings
from validator.schema import env_name_problem

# --env names that builder run sets itself from its own options
OWN_ENV = {"SEED": "--seeds", "RUN_ID": "--seeds", "DATA_PATH": "--data", "TOKENIZER_PATH": "--tokenizer"}


def check_inputs(submission: Path, data: Path, tokenizer: Path) -> None:
    if not (submission / "train_gpt.py").is_file():
        raise UserError(f"{submission}: no train_gpt.py; pass a folder made by `builder assemble`")
    if not data.is_dir() or not any(data.glob("fineweb_train_*.bin")) or not any(data.glob("fineweb_val_*.bin")):
        raise UserError(
            f"{data}: needs fineweb_train_*.bin and fineweb_val_*.bin shards; make them with `builder data sample`"
        )
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: tokenizer model not found; pass the .model file that made the shards")


def check_shards(data: Path) -> int:
    """Check the header and size of every shard of `data`; returns how many. ShardError names a bad file."""
    paths = [path for split in SPLITS for path in list_shards(data, split)]
    for path in paths:
        read_header(path)
    return len(paths)


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--env {pair!r} is not KEY=VALUE")
        if key in OWN_ENV:
            raise UserError(f"--env {key}: builder run sets {key} itself; use {OWN_ENV[key]} instead")
        env[key] = value
    return env


def recorded_overrides(env: dict[str, str]) -> dict[str, str]:
    """The overrides submission.json records: the hyperparameter-shaped names (validator.schema.env_name_problem)."""
    return {k: v for k, v in env.items() if env_name_problem(k) is None}


def launch_from_args(args: argparse.Namespace) -> Launch:
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise UserError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT, the same on every node")
    return Launch(
        nproc=args.nproc,
        launcher=args.launcher,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_backend=args.rdzv_backend,
        rdzv_id=args.rdzv_id,
    )


def _report(seed: int, findings: list[Finding]) -> None:
    for f in findings:
        print(f"== seed {seed}: {f.severity.value} {f.code}: {f.message}", file=sys.stderr, flush=True)


def run_seed(args: argparse.Namespace, seed: int, extra_env: dict[str, str]) -> Path | None:
    """Run one seed in a fresh copy of the folder; returns the log copied into the submission folder.

    On a node of rank above 0 (its processes write no log; node 0 keeps it) returns None once the run exited 0.
    """
    submission: Path = args.submission
    workdir = args.workdir / submission.resolve().name / f"seed{seed}"
    session = workdir.with_name(f"seed{seed}.sandbox")  # hook, audit log, home and temp of the run
    for old in (workdir, session):
        if old.exists():
            shutil.rmtree(old)
    run_id = f"train_seed{seed}"
    limits = Limits(args.train_limit, args.eval_limit, args.setup_allowance, args.grace)
    request = SandboxRequest(
        submission=submission,
        session_dir=session,
        work_dir=workdir,
        env={**extra_env, "SEED": str(seed), "RUN_ID": run_id},
        data_dir=args.data,
        tokenizer=args.tokenizer,
        backend=args.backend,
        launch=launch_from_args(args),
        limits=limits,
        gpus={"auto": None, "yes": True, "no": False}[args.gpus],
        image=args.image,
        netns=not args.no_netns,
        echo=True,
    )
    print(f"== seed {seed}: {args.backend} sandbox, work dir {workdir}", flush=True)
    try:
        result: SandboxResult = run_sandboxed(request)
    except SandboxError as exc:
        raise UserError(str(exc)) from exc
    where = f"seed {seed}"
    findings = run_findings(result, limits, ("train", "eval"), where)
    # the sandbox puts the hook into every Python process, so a missing or cut log is the run erasing its own trail
    findings += audit_findings(result.audit_events, where, injected=True, log_problem=result.audit_log_problem)
    _report(seed, findings)
    log = result.work_dir / "logs" / f"{run_id}.txt"
    failure = None
    if result.killed:
        failure = f"train_gpt.py was killed: {result.killed}"
    elif result.returncode != 0:
        failure = f"train_gpt.py exited with status {result.returncode}"
    elif args.node_rank > 0:
        return None
    elif not log.is_file():
        failure = f"the run wrote no {log.name}; is this an ssm-golf or upstream-style script?"
    elif parse_log_file(log).result_json is None:
        failure = f"{log.name} has no result_json line; the run did not finish"
    if failure:
        if not log.is_file():  # keep what it printed instead
            workdir.mkdir(parents=True, exist_ok=True)
            log = workdir / f"{run_id}.output.txt"
            write_atomic(log, result.text + "\n")
        raise UserError(f"seed {seed}: {failure}; its log is in {log} (nothing was added to {submission})")
    target = submission / f"{run_id}.log"
    write_atomic(target, log.read_bytes())
    errors = [f for f in findings if f.severity == Severity.ERROR]
    if errors:
        print(f"== seed {seed}: {len(errors)} sandbox finding(s) of severity error: validator rerun will fail it")
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", type=Path, help="a folder made by `builder assemble`")
    parser.add_argument("--data", type=Path, required=True, help="folder of fineweb_{train,val}_*.bin shards")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the sentencepiece .model of the shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node; must divide 8")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
    parser.add_argument("--workdir", type=Path, default=Path("runs"), help="where each seed runs (default ./runs)")
    sandbox = parser.add_argument_group("sandbox (validator.sandbox; the same limits as validator rerun)")
    sandbox.add_argument("--backend", choices=("local", "docker"), default="local")
    sandbox.add_argument("--image", default="ssm-golf:latest", help="the image of --backend docker")
    sandbox.add_argument("--gpus", choices=("auto", "yes", "no"), default="auto")
    sandbox.add_argument("--no-netns", action="store_true", help="local: no network namespace, the hook only")
    sandbox.add_argument("--launcher", choices=("auto", "torchrun", "python"), default="auto")
    sandbox.add_argument("--train-limit", type=float, default=600.0, help="seconds of the train phase (600)")
    sandbox.add_argument("--eval-limit", type=float, default=600.0, help="seconds of the eval phase (600)")
    sandbox.add_argument("--setup-allowance", type=float, default=600.0, help="seconds outside the two phases")
    sandbox.add_argument("--grace", type=float, default=30.0, help="seconds a phase may overrun before the kill")
    multi = parser.add_argument_group("several nodes: torchrun's rendezvous options, passed through")
    multi.add_argument("--nnodes", type=int, default=1, help="torchrun --nnodes")
    multi.add_argument("--node-rank", type=int, default=0, help="torchrun --node-rank (this node's)")
    multi.add_argument("--rdzv-endpoint", help="torchrun --rdzv-endpoint HOST:PORT, the same on every node")
    multi.add_argument("--rdzv-backend", default="c10d", help="torchrun --rdzv-backend")
    multi.add_argument("--rdzv-id", help="torchrun --rdzv-id, the same on every node")


def run(args: argparse.Namespace) -> int:
    check_inputs(args.submission, args.data, args.tokenizer)
    if args.nproc < 1 or 8 % args.nproc:
        raise UserError(f"--nproc {args.nproc} must divide 8")
    extra = parse_env(args.env)
    overrides = recorded_overrides(extra)
    if unrecorded := sorted(set(extra) - set(overrides)):
        print(f"== not recorded in submission.json (not a hyperparameter of the script): {', '.join(unrecorded)}")
    sub = load_submission(args.submission)
    seeds = list(dict.fromkeys(args.seeds))
    start_over = bool(sub.seeds) and sub.env != overrides
    if start_over:
        others = [s for s in sub.seeds if s not in seeds]
        if others:
            old = " ".join(f"--env {k}={v}" for k, v in sorted(sub.env.items())) or "no --env"
            raise UserError(
                f"{args.submission / 'submission.json'}: seeds {sub.seeds} were run with {old}; pass the same, or run "
                f"all of them again with the new overrides: --seeds {' '.join(map(str, sorted({*sub.seeds, *seeds})))}"
            )
    print(f"== {check_shards(args.data)} shards of {args.data} checked", flush=True)
    if start_over:  # the results of the old overrides go to the work dir; each seed is recorded again as it succeeds
        aside = args.workdir / args.submission.resolve().name / "previous"
        aside.mkdir(parents=True, exist_ok=True)
        for seed in sub.seeds:
            log = args.submission / f"train_seed{seed}.log"
            if log.is_file():
                log.replace(aside / log.name)
        save_submission(args.submission, without_results(sub, overrides))
        print(f"== the results of the previous overrides ({sub.env}) are set aside in {aside}")
        sub = load_submission(args.submission)
    for seed in seeds:
        log = run_seed(args, seed, extra)
        if log is None:
            print(f"== seed {seed}: done on node rank {args.node_rank}; node 0 keeps the log and records it")
            continue
        kept = [s for s in sub.seeds if (args.submission / f"train_seed{s}.log").is_file()]
        if dropped := sorted(set(sub.seeds) - set(kept)):
            print(f"== seeds {dropped} of submission.json have no log in the folder any more; no longer recorded")
        recorded = collect(args.submission, seeds=sorted({*kept, seed}), env=overrides, quiet=True)
        sub = recorded
        print(f"== seed {seed}: log {log}; recorded in submission.json, val_bpb {recorded.val_bpb:.8f}", flush=True)
    return 0
