"""templates/train.py's main() in this process, on the tiny sample: what it hands the scorer (EVAL_MODE=stateful
reaches every evaluation) and how its wall-clock cap is set (a variant's registered reserve is taken off it)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import templates.mixers.attention  # noqa: F401 (registers the baseline's mixer)
import templates.train as train
from templates.evaluate import evaluate

from .conftest import TINY_ENV  # noqa: TID252


def _run_main(monkeypatch, tmp_path, sample_data, capsys, **env: str) -> list[str]:
    """main() in tmp_path with the tiny settings, the sample data and `env`; the console lines it printed."""
    data, tokenizer = sample_data
    for key, value in {**TINY_ENV, "DATA_PATH": str(data), "TOKENIZER_PATH": str(tokenizer), **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    train.main()
    return capsys.readouterr().out.splitlines()


def _result(lines: list[str]) -> dict:
    return json.loads(next(line for line in lines if line.startswith("result_json ")).removeprefix("result_json "))


@pytest.mark.parametrize("mode", ["stateful", "windows"])
def test_eval_mode_reaches_every_evaluation(monkeypatch, tmp_path, sample_data, capsys, mode):
    """The ttsm and lru recipes set EVAL_MODE=stateful: the mid-run and the final scores must both be stateful (and
    neither of them under the default, windows)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stateful"))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", spy)
    monkeypatch.setattr(train, "STAGES", {})  # no variant stage registered by other tests (GPTQ export, TTT)
    lines = _run_main(monkeypatch, tmp_path, sample_data, capsys, ITERATIONS="2", VAL_LOSS_EVERY="1", EVAL_MODE=mode)
    assert _result(lines)["steps"] == 2
    assert calls == [mode == "stateful"] * 3  # after step 1, the last step's, then the artifact's (the final score)


def test_training_stops_at_the_cap_less_the_registered_reserve(monkeypatch, tmp_path, sample_data, capsys):
    """A variant that registers STAGES["reserve_s"] (GPTQ: time kept for the export) trains to the cap minus the
    reserve: here a 6 s cap less a 5 s reserve stops near 1 s, far from the 6 s it would train without it."""
    cap_s, reserve_s = 6.0, 5.0
    monkeypatch.setattr(train, "STAGES", {"reserve_s": lambda: reserve_s})
    lines = _run_main(
        monkeypatch, tmp_path, sample_data, capsys, ITERATIONS="100000", VAL_LOSS_EVERY="0",
        MAX_WALLCLOCK_SECONDS=str(cap_s),
    )  # fmt: skip
    result = _result(lines)
    stop = next(line for line in lines if line.startswith("stopping_early: wallclock_cap "))
    assert re.fullmatch(rf"stopping_early: wallclock_cap train_time:\d+ms step:{result['steps']}/100000", stop)
    assert abs(int(re.search(r"train_time:(\d+)ms", stop).group(1)) - result["train_time_ms"]) <= 1
    # generous for a loaded machine: the effective cap is 1000 ms; without the reserve training would run to ~6000
    assert result["train_time_ms"] <= 1000.0 * (cap_s - reserve_s) + 2500.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_with_accumulation_train_like_eager(monkeypatch, tmp_path, sample_data, capsys):
    """COMPILE_MODE=reduce-overhead with several micro-steps: the first micro-step's .grad is the backward graph's
    output, which the second replay overwrites (it stopped ttsm in its warm-up on one GPU, 8 micro-steps). Each
    step's loss must equal the run without CUDA graphs."""
    monkeypatch.setattr(train, "STAGES", {})
    losses = {}
    for mode in ("reduce-overhead", "default"):
        lines = _run_main(
            monkeypatch, tmp_path, sample_data, capsys, COMPILE_MODE=mode, GRAD_ACCUM_STEPS="2", ITERATIONS="6",
            WARMUP_STEPS="2", VAL_LOSS_EVERY="0", RUN_ID=f"graphs_{mode}",
        )  # fmt: skip
        losses[mode] = [float(m) for m in re.findall(r"^step:\d+/6 train_loss:([0-9.]+)", "\n".join(lines), re.M)]
    assert len(losses["default"]) == 6
    assert losses["reduce-overhead"] == pytest.approx(losses["default"], rel=2e-3)
