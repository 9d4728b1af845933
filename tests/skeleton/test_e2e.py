"""End to end on the CPU: sample data -> assemble -> run -> every contract line -> collect -> eval-only re-score."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import sentencepiece as spm
import torch

from builder.cli import main
from templates.bpb import build_byte_tables, target_bytes
from validator.logs import parse_log_file
from validator.schema import Submission

from .conftest import TINY_ENV  # noqa: TID252

CONTRACT = [
    r"^step:1/\d+ train_loss:[0-9.]+ train_time:\d+ms step_avg:[0-9.]+ms$",
    r"^step:\d+/\d+ val_loss:[0-9.]+ val_bpb:[0-9.]+ train_time:\d+ms step_avg:[0-9.]+ms$",
    r"^stopping_early: wallclock_cap train_time:\d+ms step:\d+/100000$",
    r"^Serialized model: \d+ bytes$",
    r"^Code size: \d+ bytes$",
    r"^Serialized model int8\+zlib: \d+ bytes \(payload:\d+ raw_torch:\d+ payload_ratio:[0-9.]+x since_start:\d+s\)$",
    r"^Total submission size int8\+zlib: \d+ bytes$",
    r"^final_int8_zlib_roundtrip val_loss:[0-9.]+ val_bpb:[0-9.]+ eval_time:\d+ms$",
    r"^final_int8_zlib_roundtrip_exact val_loss:\d\.\d{8} val_bpb:\d\.\d{8}$",
    r"^phase:train begin$",
    r"^phase:train end$",
    r"^phase:eval begin$",
    r"^phase:eval end$",
    r"^seed:1337$",
]


def test_sample_assemble_run_collect_rescore(tmp_path, sample_data, capsys):
    data, tokenizer = sample_data
    sub = tmp_path / "submissions" / "2026-11-23_Baseline"
    assert main(["assemble", "--variant", "baseline", "--out", str(sub), "--date", "2026-11-23", "--author", "t"]) == 0

    env = {**TINY_ENV, "ITERATIONS": "100000", "MAX_WALLCLOCK_SECONDS": "3"}
    run_args = ["run", str(sub), "--data", str(data), "--tokenizer", str(tokenizer), "--seeds", "1337"]
    run_args += ["--workdir", str(tmp_path / "runs")] + [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
    assert main(run_args) == 0
    log = sub / "train_seed1337.log"
    text = log.read_text()
    source, sep, output = text.partition("=" * 100 + "\n")
    assert sep and source.strip() == (sub / "train_gpt.py").read_text().strip()  # the log embeds the script
    lines = output.splitlines()
    for pattern in CONTRACT:
        assert any(re.match(pattern, line) for line in lines), f"no line matches {pattern}"
    assert lines[-1].startswith("result_json ")
    result = json.loads(lines[-1].removeprefix("result_json "))
    assert result["bytes_code"] == len((sub / "train_gpt.py").read_bytes())
    assert result["bytes_total"] == result["bytes_code"] + result["bytes_model"]
    workdir = tmp_path / "runs" / sub.name / "seed1337"
    artifact = workdir / result["artifact"]
    assert artifact.stat().st_size == result["bytes_model"]
    parsed = parse_log_file(log)
    assert parsed.stopped_early and parsed.score.val_bpb == round(result["val_bpb"], 8)

    assert main(["collect", str(sub)]) == 0
    collected = Submission.model_validate_json((sub / "submission.json").read_text())
    assert collected.seeds == [1337] and collected.bytes_total == result["bytes_total"]
    assert math.isclose(collected.val_bpb, result["val_bpb"])
    assert "| 1337 |" in (sub / "README.md").read_text()

    # Re-score the artifact without training; recompute val_bpb from the per-token losses independently.
    losses_file = tmp_path / "losses.npz"
    child_env = {**os.environ, **env, "DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer)}
    child_env.update(EVAL_ONLY="1", ARTIFACT=str(artifact), TOKEN_LOSSES=str(losses_file), RUN_ID="rescore")
    proc = subprocess.run(
        [sys.executable, "train_gpt.py"], cwd=workdir, env=child_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rescored = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("result_json "))
    assert rescored["eval_only"] and rescored["steps"] == 0
    assert rescored["val_bpb"] == result["val_bpb"] and rescored["artifact_sha256"] == result["artifact_sha256"]
    arrays = np.load(losses_file)
    tokens = torch.from_numpy(arrays["tokens"].astype(np.int64))
    losses = torch.from_numpy(arrays["losses"]).double()
    assert tokens.numel() == losses.numel() + 1 == int(TINY_ENV["VAL_TOKENS"]) + 1
    tables = build_byte_tables(spm.SentencePieceProcessor(model_file=str(tokenizer)), 1024, torch.device("cpu"))
    n_bytes = target_bytes(tokens[:-1], tokens[1:], tables).sum().item()
    bpb = losses.sum().item() / math.log(2) / n_bytes
    assert math.isclose(bpb, result["val_bpb"], rel_tol=1e-6)
