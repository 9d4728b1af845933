"""`builder run` and `collect` around a stand-in script: overrides and seeds recorded in submission.json and the
README, failed runs' logs kept out of the folder, stray logs left out, every shard checked before a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from builder.cli import main
from builder.data.sample import make_sample
from validator.schema import Submission

# Behaves like train_gpt.py as far as builder run and collect can see; fails for SEED 13.
STAND_IN = r"""
import json, os
from pathlib import Path
seed = int(os.environ["SEED"])
print("phase:train begin", flush=True)
print("phase:train end", flush=True)
print("phase:eval begin", flush=True)
bpb = round(1.0 + int(os.environ.get("MODEL_DIM", "512")) / 1000 + seed / 1e3, 8)
lines = [f"seed:{seed}", f"model_dim:{os.environ.get('MODEL_DIM', '-')} omp:{os.environ.get('OMP_NUM_THREADS', '-')}",
         f"final_int8_zlib_roundtrip_exact val_loss:2.00000000 val_bpb:{bpb:.8f}"]
claimed = bpb + float(os.environ.get("STANDIN_JSON_SHIFT", "0"))  # result_json's score, off the line's when set
if seed == 13:
    lines.append("Traceback: out of memory")
else:
    result = dict(seed=seed, world_size=1, steps=3, train_time_ms=10.0, eval_time_ms=1.0, val_loss=2.0,
                  val_bpb=claimed, bytes_model=1000 + seed, bytes_code=500, bytes_total=1500 + seed, torch="2.x")
    lines.append("result_json " + json.dumps(result))
Path("logs").mkdir(exist_ok=True)
Path("logs", os.environ["RUN_ID"] + ".txt").write_text("\n".join(lines) + "\n")
print("phase:eval end", flush=True)
raise SystemExit(1 if seed == 13 else 0)
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    sub = tmp_path / "sub"
    assert main(["assemble", "--variant", "baseline", "--out", str(sub), "--date", "2026-11-27", "--author", "t"]) == 0
    (sub / "train_gpt.py").write_text(STAND_IN)
    return sub


def run(folder: Path, sample_data, *extra: str) -> int:
    data, tokenizer = sample_data
    workdir = folder.parent / "runs"
    args = ["run", str(folder), "--data", str(data), "--tokenizer", str(tokenizer), "--gpus", "no"]
    return main([*args, "--workdir", str(workdir), "--launcher", "python", *extra])


def submission(folder: Path) -> Submission:
    return Submission.model_validate_json((folder / "submission.json").read_text())


def test_overrides_and_seeds_are_recorded(folder, sample_data, capsys):
    assert run(folder, sample_data, "--seeds", "1", "2", "--env", "MODEL_DIM=64", "--env", "OMP_NUM_THREADS=1") == 0
    out = capsys.readouterr().out
    assert "not recorded in submission.json (not a hyperparameter of the script): OMP_NUM_THREADS" in out
    assert "model_dim:64 omp:1" in (folder / "train_seed1.log").read_text()  # both reached the run
    sub = submission(folder)
    assert sub.env == {"MODEL_DIM": "64"} and sub.seeds == [1, 2]
    assert sub.val_bpb == pytest.approx((1.065 + 1.066) / 2, abs=1e-12)  # the mean of the seeds' scores
    assert sub.bytes_total == 1502  # the largest seed's total: every seed must fit
    readme = (folder / "README.md").read_text()
    assert "| 1 | 1.06500000 |" in readme and "`MODEL_DIM=64`" in readme
    assert "MODEL_DIM=64 RUN_ID=train_seed1 SEED=1 " in readme  # the command that runs it again
    # collect reads the same seeds again and keeps the overrides
    assert main(["collect", str(folder)]) == 0
    assert submission(folder) == sub


def test_a_failed_run_leaves_the_folder_as_it_was(folder, sample_data, capsys):
    assert run(folder, sample_data, "--seeds", "1") == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert run(folder, sample_data, "--seeds", "13") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    kept = folder.parent / "runs" / "sub" / "seed13" / "logs" / "train_seed13.txt"
    said = f"seed 13: train_gpt.py exited with status 1; its log is in {kept} (nothing was added to {folder})"
    assert err == f"builder run: error: {said}"
    assert "out of memory" in kept.read_text()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_other_overrides_need_every_seed_again(folder, sample_data, capsys):
    assert run(folder, sample_data, "--seeds", "1", "2", "--env", "MODEL_DIM=64") == 0
    capsys.readouterr()
    assert run(folder, sample_data, "--seeds", "1", "--env", "MODEL_DIM=128") == 2
    err = capsys.readouterr().err
    assert "seeds [1, 2] were run with --env MODEL_DIM=64; pass the same" in err and "--seeds 1 2" in err
    assert submission(folder).env == {"MODEL_DIM": "64"}
    # every seed again: the old results are set aside, each seed is recorded as it succeeds; 13 fails, 1 never runs
    assert run(folder, sample_data, "--seeds", "2", "13", "1", "--env", "MODEL_DIM=128") == 2
    sub = submission(folder)
    assert sub.env == {"MODEL_DIM": "128"} and sub.seeds == [2] and sub.val_bpb == pytest.approx(1.13, abs=1e-12)
    assert not (folder / "train_seed1.log").exists()
    assert (folder.parent / "runs" / "sub" / "previous" / "train_seed1.log").is_file()


def test_collect_leaves_out_stray_logs_and_takes_asked_seeds(folder, sample_data, capsys):
    assert run(folder, sample_data, "--seeds", "1", "2") == 0
    shutil.copy(folder / "train_seed2.log", folder / "train_seed99.log")  # a log that is not seed 99's
    (folder / "train_seed5.failed.log").write_text("an old failure\n")
    capsys.readouterr()
    assert main(["collect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "left out train_seed99.log (not among the seeds [1, 2] of submission.json" in out
    assert submission(folder).seeds == [1, 2]
    assert main(["collect", str(folder), "--seeds", "2"]) == 0
    assert submission(folder).seeds == [2]
    assert main(["collect", str(folder), "--seeds", "2", "99"]) == 2
    assert "train_seed99.log: its result_json is of seed 2" in capsys.readouterr().err
    assert main(["collect", str(folder), "--seeds", "2", "7"]) == 2
    err = capsys.readouterr().err
    assert "no train_seed7.log for seed 7 of --seeds" in err and "builder collect --seeds 2" in err


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "wrong size"),
        (lambda p: p.write_bytes(b"\0" * 4 + p.read_bytes()[4:]), "bad magic 0"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "short file"),
    ],
)
def test_every_shard_is_checked_before_the_run(folder, tmp_path, capsys, damage, expected):
    made = make_sample(tmp_path / "data", docs=60, val_docs=6, tokens_per_shard=3000)
    shards = sorted(made.data_path.glob("fineweb_*.bin"))
    last = sorted(made.data_path.glob("fineweb_train_*.bin"))[-1]
    assert len(shards) > 3 and last.name != "fineweb_train_000000.bin"
    damage(last)
    capsys.readouterr()
    assert run(folder, (made.data_path, made.tokenizer_path), "--seeds", "1") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"builder run: error: {last}: {expected}") and "make" in line  # the file and the fix
    assert not (tmp_path / "runs").exists() and submission(folder).seeds == []


@pytest.mark.parametrize(("pair", "option"), [("SEED=3", "--seeds"), ("DATA_PATH=x", "--data")])
def test_env_that_builder_run_sets_itself(folder, sample_data, capsys, pair, option):
    assert run(folder, sample_data, "--env", pair) == 2
    assert f"use {option} instead" in capsys.readouterr().err
    assert json.loads((folder / "submission.json").read_text())["seeds"] == []


def test_a_node_of_rank_above_0_records_nothing(folder, sample_data, tmp_path, monkeypatch, capsys):
    import builder.run as run_module
    from validator.sandbox import SandboxResult

    def fake(request):  # node 1's processes exit 0 and write no log (node 0 keeps it)
        request.work_dir.mkdir(parents=True)
        return SandboxResult([], 0, None, 0.1, [], {}, [], request.work_dir, "allowed")

    monkeypatch.setattr(run_module, "run_sandboxed", fake)
    multi = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500", "--seeds", "4"]
    assert run(folder, sample_data, *multi, "--env", "MODEL_DIM=64") == 0
    assert "done on node rank 1; node 0 keeps the log" in capsys.readouterr().out
    assert not list(folder.glob("train_seed*")) and submission(folder).seeds == []


def test_collect_refuses_a_log_whose_score_line_and_result_json_disagree(folder, sample_data, capsys):
    """The score line (the artifact's) and result_json must agree: a result_json that carries another figure (the
    score before quantisation, say) is refused, not copied into submission.json, whether it comes from the run or
    from a log edited afterwards."""
    assert run(folder, sample_data, "--seeds", "1", "--env", "STANDIN_JSON_SHIFT=0.01") == 2
    assert "disagree" in capsys.readouterr().err
    assert run(folder, sample_data, "--seeds", "1") == 0
    before = (folder / "submission.json").read_bytes()
    log = folder / "train_seed1.log"
    lines = log.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("result_json "))
    result = json.loads(lines[at].removeprefix("result_json "))
    lines[at] = "result_json " + json.dumps({**result, "val_bpb": result["val_bpb"] + 0.01})
    log.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["collect", str(folder)]) == 2
    assert "train_seed1.log" in (err := capsys.readouterr().err) and "disagree" in err
    assert (folder / "submission.json").read_bytes() == before
