"""End to end on the CPU with the real assembled baseline: builder run (sandboxed) -> collect -> validator rerun,
in full and eval-only, both reproducing the claims; the tiny settings make training deterministic (no wall-clock cap).
"""

from __future__ import annotations

import json

import pytest

from builder.cli import main as builder
from validator.cli import main as validator

TINY = {
    "VOCAB_SIZE": "1024",
    "MODEL_DIM": "32",
    "NUM_LAYERS": "2",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "TRAIN_SEQ_LEN": "32",
    "TRAIN_BATCH_TOKENS": "256",
    "GRAD_ACCUM_STEPS": "1",
    "ITERATIONS": "3",
    "WARMUP_STEPS": "1",
    "VAL_BATCH_SIZE": "2048",
    "VAL_TOKENS": "2048",
    "MAX_WALLCLOCK_SECONDS": "0",
}
ENV_ARGS = [a for k, v in TINY.items() for a in ("--env", f"{k}={v}")]


def as_rerun(report: dict) -> dict:
    (section,) = [s for s in report["sections"] if s["title"].startswith("Sandboxed rerun")]
    return {"findings": report["findings"], "rerun": section["data"]}


ASSEMBLE = ["assemble", "--variant", "baseline", "--date", "2026-11-23", "--author", "t"]


@pytest.mark.slow
def test_builder_run_then_rerun_full_and_eval_only(tmp_path, sample_root, sample_paths):
    data, tokenizer = sample_paths
    sub = tmp_path / "submissions" / "2026-11-23_Baseline"
    assert builder(ASSEMBLE + ["--out", str(sub)]) == 0
    runs = tmp_path / "runs"
    args = ["run", str(sub), "--data", str(data), "--tokenizer", str(tokenizer), "--seeds", "1337"]
    assert builder([*args, "--workdir", str(runs), "--gpus", "no", *ENV_ARGS]) == 0
    assert (sub / "train_seed1337.log").is_file()
    assert (runs / sub.name / "seed1337.sandbox" / "audit" / "events.jsonl").is_file()  # it ran in the sandbox
    assert builder(["collect", str(sub)]) == 0
    claimed = json.loads((sub / "submission.json").read_text())["seed_results"]["1337"]["val_bpb"]

    report_file = tmp_path / "full.json"
    common = ["rerun", str(sub), "--data", str(sample_root), "--gpus", "no", *ENV_ARGS]
    code = validator([*common, "--workdir", str(tmp_path / "rerun_full"), "--json", str(report_file)])
    report = as_rerun(json.loads(report_file.read_text()))
    assert code == 0, report["findings"]
    seed = report["rerun"]["seeds"][0]
    assert seed["seed"] == 1337 and seed["exit_code"] == 0
    assert seed["claimed_bpb"] == pytest.approx(claimed, abs=1e-8)
    assert abs(seed["bpb_gap"]) < 1e-6
    assert seed["recomputed_bpb"] == pytest.approx(seed["script_bpb"], rel=1e-6)
    assert seed["train_s_measured"] > 0 and seed["eval_s_measured"] > 0
    assert not [f for f in report["findings"] if f["code"].startswith("AUDIT_")]

    artifact = runs / sub.name / "seed1337" / "final_model.int8.ptz"
    report_file = tmp_path / "eval.json"
    code = validator(
        [*common, "--eval-only", "--artifact", str(artifact), "--workdir", str(tmp_path / "rerun_eval"), "--json",
         str(report_file)]
    )  # fmt: skip
    report = as_rerun(json.loads(report_file.read_text()))
    assert code == 0, report["findings"]
    seed = report["rerun"]["seeds"][0]
    assert report["rerun"]["mode"] == "eval-only" and seed["seed"] == 1337  # found by the artifact's sha256
    assert seed["bytes_artifact"] == artifact.stat().st_size
    assert abs(seed["bpb_gap"]) < 1e-6 and seed["train_s_measured"] is None


def test_builder_run_refuses_multi_node_without_a_rendezvous(tmp_path, sample_paths, capsys):
    data, tokenizer = sample_paths
    sub = tmp_path / "sub"
    assert builder(ASSEMBLE + ["--out", str(sub)]) == 0
    args = ["run", str(sub), "--data", str(data), "--tokenizer", str(tokenizer), "--nnodes", "2"]
    assert builder([*args, "--workdir", str(tmp_path / "runs")]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err


def test_builder_run_passes_rendezvous_options_to_torchrun(monkeypatch, tmp_path, sample_paths):
    import builder.run as run_module

    seen = {}

    def capture(request):
        seen["request"] = request
        raise run_module.SandboxError("stop here")

    monkeypatch.setattr(run_module, "run_sandboxed", capture)
    data, tokenizer = sample_paths
    sub = tmp_path / "sub"
    assert builder(ASSEMBLE + ["--out", str(sub)]) == 0
    args = ["run", str(sub), "--data", str(data), "--tokenizer", str(tokenizer), "--nproc", "8", "--nnodes", "2"]
    args += ["--node-rank", "1", "--rdzv-endpoint", "node0:29500", "--rdzv-id", "golf", "--workdir", str(tmp_path)]
    assert builder([*args, "--backend", "docker", "--seeds", "7"]) == 2
    request = seen["request"]
    assert request.backend == "docker" and request.env["RUN_ID"] == "train_seed7"
    assert request.launch.nnodes == 2 and request.launch.rdzv_endpoint == "node0:29500"
    assert request.network_allowed  # several nodes talk over the network
    from validator.sandbox.layout import launch_command

    command = launch_command(request.launch, "train_gpt.py", "python", True)
    assert command[:3] == ["python", "-m", "torch.distributed.run"] and "--rdzv-endpoint=node0:29500" in command
