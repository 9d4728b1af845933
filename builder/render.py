"""The words and lists around a script: README.md, requirements.txt and the hyperparameter table."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

from validator.schema import Submission

RESULTS_BEGIN = "<!-- results:begin -->"
RESULTS_END = "<!-- results:end -->"

# import root -> requirement line (floors: the oldest releases the challenge image and ssm-golf support)
REQUIREMENTS = {
    "torch": "torch>=2.9",
    "triton": "triton>=3.5",
    "numpy": "numpy>=1.26",
    "sentencepiece": "sentencepiece>=0.2",
    "brotli": "brotli>=1.1",
}


def requirements_for(roots: set[str]) -> str:
    unknown = sorted(roots - set(REQUIREMENTS))
    if unknown:
        raise ValueError(f"the script imports {unknown}, which ssm-golf has no requirement line for")
    return "".join(REQUIREMENTS[r] + "\n" for r in sorted(roots))


def hyperparameter_defaults(hparams_source: str, overrides: dict[str, str]) -> list[tuple[str, str]]:
    """(ENV_NAME, default) for every env_*("NAME", default) call in templates/hparams.py, with the variant's values."""
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(hparams_source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id.startswith("env_")
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            default = node.args[1]
            out[node.args[0].value] = str(default.value) if isinstance(default, ast.Constant) else ast.unparse(default)
    out.update(overrides)
    return sorted(out.items())


def env_prefix(env: dict[str, str]) -> str:
    """`K=V K=V ` for a command line (values quoted for the shell), empty for no overrides."""
    return "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(env.items()))


DEFAULT_DATA = ("./data/datasets/fineweb10B_sp1024", "./data/tokenizers/fineweb_1024_bpe.model")


def variant_knobs(variant: str | None) -> dict[str, str]:
    """The record defaults of a known variant (its data paths, artifact name, score tag), else none."""
    from builder.variants import load_variants

    try:
        spec = load_variants().get(variant or "")
    except Exception:  # a broken spec file is reported by `builder list`; the README falls back to the defaults
        return {}
    return spec.defaults_as_strings() if spec else {}


def run_command(nproc: int = 8, seed: int = 1337, env: dict[str, str] | None = None, knobs: dict | None = None) -> str:
    knobs = knobs or {}
    data = knobs.get("DATA_PATH", DEFAULT_DATA[0])
    tokenizer = knobs.get("TOKENIZER_PATH", DEFAULT_DATA[1])
    return (
        f"{env_prefix(env or {})}RUN_ID=train_seed{seed} SEED={seed} DATA_PATH={data} TOKENIZER_PATH={tokenizer} "
        f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py"
    )


def overrides_text(sub: Submission) -> list[str]:
    """The README lines that say which overrides the runs were made with, and how to run one again."""
    world = re.match(r"(\d+)x", sub.hardware)
    nproc = int(world.group(1)) if world else 8
    command = run_command(nproc=nproc, seed=sub.seeds[0], env=sub.env, knobs=variant_knobs(sub.variant))
    if sub.env:
        shown = ", ".join(f"`{k}={v}`" for k, v in sorted(sub.env.items()))
        said = (
            f"Run with these overrides of the defaults below: {shown}. They are recorded in submission.json "
            "(`env`), and `validator rerun` applies them."
        )
    else:
        said = "Run with the defaults below, no overrides."
    return [said, "", f"```bash\n{command}\n```"]


def results_section(sub: Submission) -> str:
    if not sub.seed_results:
        body = "Not run yet. `builder run` writes one `train_seed<SEED>.log` per seed and fills this in."
        return f"{RESULTS_BEGIN}\n{body}\n{RESULTS_END}"
    rows = [
        "| seed | val_bpb | val_loss | steps | train time | eval time | artifact bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, r in sorted(sub.seed_results.items(), key=lambda kv: int(kv[0])):
        rows.append(
            f"| {seed} | {r.val_bpb:.8f} | {r.val_loss:.8f} | {r.steps} | {r.train_time_ms / 1000:.1f} s "
            f"| {r.eval_time_ms / 1000:.1f} s | {r.artifact_bytes:,} |"
        )
    std = f" (std {sub.val_bpb_std:.5f})" if sub.val_bpb_std is not None else ""
    summary = (
        f"Mean val_bpb over {len(sub.seeds)} seed(s): **{sub.val_bpb:.8f}**{std}. Largest artifact: "
        f"{sub.bytes_total:,} bytes (code {sub.bytes_code:,} bytes) of the 16,000,000 allowed."
    )
    return "\n".join([RESULTS_BEGIN, summary, "", *rows, "", *overrides_text(sub), RESULTS_END])


def render_readme(
    sub: Submission,
    architecture: list[tuple[str, str]],
    hparams: list[tuple[str, str]],
    code_bytes: int,
    extra: str = "",
) -> str:
    arch = "\n".join(f"| {k} | {v} |" for k, v in architecture)
    knobs = dict(hparams)
    artifact = knobs.get("ARTIFACT_NAME", "final_model.int8.ptz")
    score = knobs.get("SCORE_TAG", "final_int8_zlib_roundtrip")
    data_variant = knobs.get("DATA_PATH", DEFAULT_DATA[0]).rstrip("/").rsplit("_", 1)[-1]
    hp = "\n".join(f"| `{k}` | `{v}` |" for k, v in hparams)
    return f"""# {sub.name}

{sub.blurb}
{extra}
Assembled by ssm-golf from its templates (variant `{sub.variant}`); `train_gpt.py` is self-contained
({code_bytes:,} bytes, all counted code) and needs only what `requirements.txt` names.

## Architecture

| part | choice |
|---|---|
{arch}

## Reproduce

From this folder, with the data of `builder data fineweb --variant {data_variant}` (or any folder of the same layout):

```bash
pip install -r requirements.txt
{run_command(knobs=knobs)}
```

Each run writes `logs/<RUN_ID>.txt` and the artifact `{artifact}`; the score of record is the
`{score}_exact` line, computed on the model read back from the artifact. With ssm-golf installed,
`builder run . --data DATA --tokenizer MODEL --seeds 1337 42 2025 --nproc 8` runs every seed and fills in the
results below (`builder collect .` reads the logs again). `EVAL_ONLY=1 ARTIFACT={artifact}` re-scores an
artifact without training.

## Results

{results_section(sub)}

## Hyperparameters

Every value can be overridden by the environment variable of the same name.

| variable | default |
|---|---|
{hp}
"""


def replace_results(readme: str, sub: Submission) -> str:
    """README text with its results section rewritten; the section is appended if the markers are missing."""
    start, end = readme.find(RESULTS_BEGIN), readme.find(RESULTS_END)
    if start == -1 or end == -1 or end < start:
        return readme.rstrip("\n") + "\n\n## Results\n\n" + results_section(sub) + "\n"
    return readme[:start] + results_section(sub) + readme[end + len(RESULTS_END) :]


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary sibling, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    tmp.replace(path)
