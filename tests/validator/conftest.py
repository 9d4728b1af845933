"""Synthetic submission folders for the validator's tests: a clean record, and knobs that break one rule at a time."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

SP1024_TOKENS = 62_021_632
VAL_BYTES = 151_080_891
RATIO = SP1024_TOKENS / VAL_BYTES  # tokens per byte of the canonical val split (SP1024)

CLEAN_SCRIPT = '''"""Synthetic training script written for the validator's tests."""

import os

import torch


def main() -> None:
    seed = int(os.environ.get("SEED", "1337"))
    torch.manual_seed(seed)
    print(f"seed:{seed}")


if __name__ == "__main__":
    main()
'''

CLEAN_BPB = {42: 1.0500120, 1337: 1.0502230, 2024: 1.0498710}


def loss_for(bpb: float, ratio: float = RATIO) -> float:
    """The val_loss (nats/token) that goes with `bpb` when the byte denominator is canonical."""
    return bpb * math.log(2) / ratio


def make_log(
    seed: int,
    bpb: float,
    *,
    code_bytes: int,
    model_bytes: int = 15_500_000,
    train_ms: float = 598_123.0,
    stopped: bool = True,
    hessian_s: float | None = None,
    eval_ms: float = 95_000.0,
    hparams: dict[str, str] | None = None,
    val_tokens: int = SP1024_TOKENS,
    train_shards: int = 80,
    loss: float | None = None,
    code_lines: list[str] | None = None,
    embedded_source: str | None = None,
    total_bytes: int | None = None,
) -> str:
    """A log in the upstream formats plus ssm-golf's result_json line."""
    params = {
        "iterations": "20000",
        "max_wallclock_seconds": "600.0",
        "seed": str(seed),
        "tokenizer_path": "./data/tokenizers/fineweb_1024_bpe.model",
        "train_files": "./data/datasets/fineweb10B_sp1024/fineweb_train_*.bin",
        "val_files": "./data/datasets/fineweb10B_sp1024/fineweb_val_*.bin",
        "vocab_size": "1024",
        "model_dim": "512",
    }
    params.update(hparams or {})
    val_loss = loss if loss is not None else loss_for(bpb)
    total = total_bytes if total_bytes is not None else model_bytes + code_bytes
    lines = []
    if embedded_source is not None:
        lines += embedded_source.rstrip("\n").split("\n") + ["=" * 100]
    lines += ["Hyperparameters:"] + [f"  {k}: {v}" for k, v in sorted(params.items())]
    lines += [f"train_shards: {train_shards}", f"val_tokens: {val_tokens}", "model_params:17059912"]
    steps = 13_000
    for step in (1, 2, 500, 1000, 5000, 10000, steps):
        t = train_ms * step / steps
        loss_now = 3.0 + 4.0 / step
        lines.append(f"step:{step}/20000 train_loss:{loss_now:.4f} train_time:{t:.0f}ms step_avg:{t / step:.2f}ms")
    lines.append(f"step:{steps}/20000 val_loss:{val_loss:.4f} val_bpb:{bpb:.4f} train_time:{train_ms:.0f}ms")
    if stopped:
        lines.append(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{steps}/20000")
    lines.append("peak memory allocated: 10119 MiB reserved: 10294 MiB")
    if hessian_s is not None:
        lines += ["GPTQ:collecting Hessians from calibration data...", f"GPTQ:collected 67 Hessians in {hessian_s}s"]
    lines += code_lines if code_lines is not None else [f"Code size: {code_bytes} bytes"]
    lines += [
        f"Serialized model int8+zlib: {model_bytes} bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)",
        f"Total submission size int8+zlib: {total} bytes",
        f"final_int8_zlib_roundtrip val_loss:{val_loss:.4f} val_bpb:{bpb:.4f} eval_time:{eval_ms:.0f}ms",
        f"final_int8_zlib_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{bpb:.8f}",
    ]
    result = {
        "seed": seed,
        "world_size": 8,
        "steps": steps,
        "train_time_ms": train_ms,
        "eval_time_ms": eval_ms,
        "val_loss": val_loss,
        "val_bpb": bpb,
        "bytes_model": model_bytes,
        "bytes_code": code_bytes,
        "bytes_total": total,
        "artifact": "final_model.int8.ptz",
        "artifact_sha256": "0" * 64,
        "score_tag": "final_int8_zlib_roundtrip_exact",
    }
    lines.append("result_json " + json.dumps(result))
    return "\n".join(lines) + "\n"


def write_submission(
    root: Path,
    *,
    name: str = "2026-05-01_CleanSSM",
    track_dir: str = "track_10min_16mb",
    seeds: dict[int, float] | None = None,
    script: str = CLEAN_SCRIPT,
    readme: str = "# Clean SSM\n\nSynthetic record folder for tests. Three seeds.\n",
    json_overrides: dict | None = None,
    log_kwargs: dict | None = None,
    per_seed_kwargs: dict[int, dict] | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """A records/<track>/<name>/ folder that passes every check unless a knob breaks it."""
    seeds = dict(CLEAN_BPB if seeds is None else seeds)
    folder = root / "records" / track_dir / name
    folder.mkdir(parents=True)
    code_bytes = len(script.encode())
    totals = {}
    for seed, bpb in seeds.items():
        kwargs = {"code_bytes": code_bytes, **(log_kwargs or {}), **((per_seed_kwargs or {}).get(seed, {}))}
        text = make_log(seed, bpb, **kwargs)
        totals[seed] = int(text.rsplit("Total submission size int8+zlib: ", 1)[1].split()[0])
        if "logs" not in skip:
            (folder / f"train_seed{seed}.log").write_text(text)
    mean = sum(seeds.values()) / len(seeds)
    data = {
        "author": "Test Author",
        "github_id": "test-author",
        "name": "Clean SSM",
        "blurb": "synthetic",
        "date": name[:10],
        "track": "10min_16mb" if track_dir == "track_10min_16mb" else "non_record_16mb",
        "variant": "clean",
        "val_bpb": round(mean, 8),
        "val_loss": round(sum(loss_for(b) for b in seeds.values()) / len(seeds), 8),
        "bytes_total": max(totals.values()),
        "bytes_code": code_bytes,
        "seeds": sorted(seeds),
        "seed_results": {
            str(s): {
                "val_loss": round(loss_for(b), 8),
                "val_bpb": b,
                "artifact_bytes": totals[s],
                "bytes_model": totals[s] - code_bytes,
                "bytes_code": code_bytes,
                "steps": 13000,
                "train_time_ms": 598123.0,
                "eval_time_ms": 95000.0,
                "score_tag": "final_int8_zlib_roundtrip_exact",
                "log": f"train_seed{s}.log",
            }
            for s, b in seeds.items()
        },
        "hardware": "8xH100 80GB SXM",
        "pytorch_version": "2.9.1+cu128",
    }
    data.update(json_overrides or {})
    if "submission.json" not in skip:
        (folder / "submission.json").write_text(json.dumps(data, indent=2))
    if "train_gpt.py" not in skip:
        (folder / "train_gpt.py").write_text(script)
    if "README.md" not in skip:
        (folder / "README.md").write_text(readme)
    (folder / "requirements.txt").write_text("torch\nsentencepiece\n")
    return folder


@pytest.fixture
def make_submission(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def _make(**kwargs) -> Path:
        return write_submission(tmp_path / f"case{next(counter)}", **kwargs)

    return _make


@pytest.fixture(autouse=True)
def _private_code_bytes_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """validator.source caches wrapped sizes on disk; tests keep theirs out of the user's ~/.cache."""
    monkeypatch.setenv("SSM_GOLF_CACHE", str(tmp_path_factory.mktemp("codebytes-cache")))
