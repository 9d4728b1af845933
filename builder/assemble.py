"""`builder assemble`: a variant -> submissions/<YYYY-MM-DD>_<Name>/ with train_gpt.py, README, submission.json."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from builder.assembler import AssemblyError, assemble_source, third_party_roots
from builder.cli import UserError
from builder.render import hyperparameter_defaults, render_readme, requirements_for, write_atomic
from builder.variants import VariantSpec, get_variant
from validator.schema import Submission

TEMPLATES_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the templates package


def script_header(spec: VariantSpec) -> str:
    return (
        f"train_gpt.py: the {spec.name} variant, assembled by ssm-golf from its templates.\n\n"
        f"{spec.summary}.\n\n"
        "Run: torchrun --standalone --nproc_per_node=8 train_gpt.py (CUDA), or python train_gpt.py (CPU, tiny\n"
        "settings through the environment). Every hyperparameter is an environment variable; see Hyperparameters."
    )


def _git_config(key: str) -> str:
    try:
        out = subprocess.run(["git", "config", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def build_files(spec: VariantSpec, date: str, author: str, github_id: str) -> dict[str, str]:
    """The files of a submission folder, as text, from the templates; nothing is written."""
    try:
        script = assemble_source(TEMPLATES_ROOT, spec.entry, spec.defaults_as_strings(), script_header(spec))
        requirements = requirements_for(third_party_roots(script))
    except (AssemblyError, ValueError) as exc:
        raise UserError(f"variant {spec.name}: {exc}") from exc
    sub = Submission(
        author=author,
        github_id=github_id,
        name=spec.title.replace("_", " "),
        blurb=spec.blurb,
        date=date,
        track=spec.track,
        variant=spec.name,
    )
    hparams_src = (TEMPLATES_ROOT / "templates" / "hparams.py").read_text(encoding="utf-8")
    hparams = hyperparameter_defaults(hparams_src, spec.defaults_as_strings())
    readme = render_readme(sub, spec.architecture, hparams, len(script.encode("utf-8")))
    return {
        "train_gpt.py": script,
        "README.md": readme,
        "submission.json": json.dumps(sub.model_dump(), indent=2) + "\n",
        "requirements.txt": requirements,
    }


def write_folder(out: Path, files: dict[str, str], force: bool) -> None:
    """Write every file into a fresh temporary folder beside `out`, then swap it in."""
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; pass --force to replace it (its logs go with it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        for name, text in files.items():
            write_atomic(tmp / name, text)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", required=True, help="a name from `builder list`")
    parser.add_argument("--out", type=Path, help="the folder to write (default submissions/<date>_<Name>)")
    parser.add_argument("--date", help="YYYY-MM-DD for the folder and submission.json (default today, UTC)")
    parser.add_argument("--author", help="default: git config user.name")
    parser.add_argument("--github-id", help="default: git config github.user")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")


def run(args: argparse.Namespace) -> int:
    spec = get_variant(args.variant)
    date = args.date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        dt.date.fromisoformat(date)
    except ValueError as exc:
        raise UserError(f"--date {date!r} is not YYYY-MM-DD") from exc
    author = args.author or _git_config("user.name") or "unknown"
    github_id = args.github_id or _git_config("github.user") or "unknown"
    out = args.out or Path("submissions") / f"{date}_{spec.title}"
    files = build_files(spec, date, author, github_id)
    write_folder(out, files, args.force)
    size = len(files["train_gpt.py"].encode("utf-8"))
    print(f"assembled {spec.name} -> {out} (train_gpt.py {size:,} bytes)")
    return 0
