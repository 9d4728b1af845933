"""Fixtures of the sandbox tests: sample data, and a contract-following stand-in script with sabotage slots.

The stand-in behaves like an ssm-golf train_gpt.py as far as the sandbox and `validator rerun` can see
(phase markers, artifact, score lines, per-token losses, result_json) but needs only numpy, so the sabotage
tests run in a second or two each. The real assembled baseline is exercised in test_rerun_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.data.sample import make_sample
from validator.bytetable import byte_table

STAND_IN = r"""
import hashlib, json, math, os, sys, time
from pathlib import Path
import numpy as np

SCORED = 512
eval_only = os.environ.get("EVAL_ONLY") == "1"
seed = int(os.environ.get("SEED", "0"))
print(f"seed:{seed}", flush=True)
# SABOTAGE:setup
if not eval_only:
    print("phase:train begin", flush=True)
    # SABOTAGE:train
    time.sleep(0.05)
    print("phase:train end", flush=True)
    artifact = Path("final_model.int8.ptz")
    rng = np.random.default_rng(seed)
    with open(artifact, "wb") as fh:
        fh.write(rng.bytes(4096))
        fh.truncate(int(os.environ.get("STANDIN_ARTIFACT_BYTES", "4096")))
else:
    artifact = Path(os.environ["ARTIFACT"])
code = Path(__file__).stat().st_size
print(f"Serialized model int8+zlib: {artifact.stat().st_size} bytes", flush=True)
print(f"Code size: {code} bytes", flush=True)
print(f"Total submission size int8+zlib: {artifact.stat().st_size + code} bytes", flush=True)
print("phase:eval begin", flush=True)
# SABOTAGE:eval
shard = sorted(Path(os.environ["DATA_PATH"]).glob("fineweb_val_*.bin"))[0]
tokens = np.fromfile(shard, dtype="<u2", offset=1024).astype(np.int64)[: SCORED + 1]
sha = hashlib.sha256(artifact.read_bytes()).hexdigest()
losses = np.random.default_rng(int(sha[:8], 16)).uniform(1.0, 3.0, SCORED)
table = json.loads(Path("byte_table.json").read_text())
base, space, boundary = (np.array(table[k]) for k in ("base", "space", "boundary"))
nbytes = int((base[tokens[1:]] + (space[tokens[1:]] & ~boundary[tokens[:-1]])).sum())
val_loss = float(losses.mean())
val_bpb = float(losses.sum() / math.log(2) / nbytes) * float(os.environ.get("STANDIN_BPB_FACTOR", "1"))
print(f"final_int8_zlib_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}", flush=True)
print("phase:eval end", flush=True)
if os.environ.get("TOKEN_LOSSES"):
    np.savez(os.environ["TOKEN_LOSSES"], tokens=tokens.astype(np.int32), losses=losses.astype(np.float32))
result = dict(seed=seed, world_size=1, steps=1, train_time_ms=50.0, eval_time_ms=1.0, val_loss=val_loss,
              val_bpb=val_bpb, bytes_model=artifact.stat().st_size, bytes_code=code,
              bytes_total=artifact.stat().st_size + code, artifact=artifact.name, artifact_sha256=sha,
              score_tag="final_int8_zlib_roundtrip_exact")
print("result_json " + json.dumps(result), flush=True)
"""


def stand_in_script(**sabotage: str) -> str:
    """The stand-in with code inserted at the named slots (setup, train, eval)."""
    lines = STAND_IN.splitlines()
    for slot, code in sabotage.items():
        at = next(i for i, line in enumerate(lines) if line.strip() == f"# SABOTAGE:{slot}")
        indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
        lines[at : at + 1] = [indent + line for line in code.strip().splitlines()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated dataset laid out like upstream's data/ folder (datasets/, tokenizers/)."""
    out = tmp_path_factory.mktemp("sandbox_sample")
    make_sample(out, docs=200, val_docs=30, seed=1)
    return out


@pytest.fixture(scope="session")
def sample_paths(sample_root: Path) -> tuple[Path, Path]:
    return sample_root / "datasets" / "fineweb10B_sp1024", sample_root / "tokenizers" / "fineweb_1024_bpe.model"


@pytest.fixture
def make_submission(tmp_path: Path, sample_paths: tuple[Path, Path]):
    """Writes a stand-in submission folder; `claims` maps seed -> claimed val_bpb for submission.json."""
    table = byte_table(sample_paths[1])
    table_json = json.dumps(
        {
            "base": table.base_bytes.tolist(),
            "space": table.leading_space.tolist(),
            "boundary": table.boundary.tolist(),
        }
    )

    def make(name: str = "2026-11-23_StandIn", claims: dict[int, float] | None = None, **sabotage: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train_gpt.py").write_text(stand_in_script(**sabotage))
        (folder / "byte_table.json").write_text(table_json)
        (folder / "README.md").write_text("# Stand-in\n")
        if claims:
            results = {str(s): {"val_bpb": bpb, "val_loss": 2.0} for s, bpb in claims.items()}
            meta = {"author": "t", "github_id": "t", "name": "Stand-in", "date": "2026-11-23"}
            meta.update(seeds=sorted(claims), seed_results=results, val_bpb=min(claims.values()))
            (folder / "submission.json").write_text(json.dumps(meta))
        return folder

    return make
