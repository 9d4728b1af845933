"""`builder assemble`: a variant -> submissions/<YYYY-MM-DD>_<Name>/ with train_gpt.py, README, submission.json."""

from __future__ import annotations

import argparse
import ast
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


TRACKS = {"record": "10min_16mb", "non-record": "non_record_16mb"}
READABLE_NAME = "train_gpt_readable.py"  # beside a packed train_gpt.py: the same script, unpacked; nothing imports it
# the modules whose env_*("NAME", default) calls and OPTIONS tables make the README's hyperparameter table
KNOB_SOURCES = ("templates/hparams.py", "templates/config.py")


def script_header(spec: VariantSpec, track: str) -> str:
    origin = f" Origin: {spec.origin}." if spec.origin else ""
    recipe = "the record recipe (600 s on 8 GPUs)" if track == "record" else "its own non-record recipe"
    return (
        f"train_gpt.py: the {spec.name} variant with {recipe}, assembled by ssm-golf.{origin}\n\n"
        f"{spec.summary}.\n\n"
        "Every hyperparameter is an environment variable; the variant's own values are in VARIANT_DEFAULTS."
    )


def option_defaults(source: str) -> list[tuple[str, str]]:
    """(ENV_NAME, default) of every `"kwarg": ("ENV_NAME", default)` entry of an OPTIONS table in a module."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "OPTIONS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                for value in node.value.values:
                    if isinstance(value, ast.Tuple) and len(value.elts) == 2:
                        name, default = value.elts
                        if isinstance(name, ast.Constant) and isinstance(name.value, str):
                            out.append((name.value, ast.unparse(default)))
    return out


def knob_table(spec: VariantSpec, defaults: dict[str, str]) -> list[tuple[str, str]]:
    """Every knob of the assembled script with the variant's value."""
    table: dict[str, str] = {}
    for rel in KNOB_SOURCES:
        table.update(hyperparameter_defaults((TEMPLATES_ROOT / rel).read_text(encoding="utf-8"), {}))
    for module in spec.modules:
        path = TEMPLATES_ROOT / Path(*module.split(".")).with_suffix(".py")
        if path.is_file():  # its OPTIONS table, and any knob it reads itself (GPTQ, TTT, ...)
            source = path.read_text(encoding="utf-8")
            table.update(hyperparameter_defaults(source, {}))
            table.update(option_defaults(source))
    table.update(defaults)
    return sorted(table.items())


def origin_section(spec: VariantSpec, track: str) -> str:
    lines = [""]
    recipe = (
        "**Track: record** (10min_16mb): the recipe is sized for 600 s of training on 8xH100."
        if track == "record"
        else "**Track: non-record** (non_record_16mb): the variant's own recipe, not bound to 600 s on 8xH100."
    )
    lines.append(recipe)
    if spec.origin:
        lines += ["", f"Origin: {spec.origin}."]
    if spec.differences:
        lines += ["", "What differs from the origin, and why:", ""] + [f"- {d}" for d in spec.differences]
    return "\n".join(lines) + "\n"


def pack_script(script: str) -> str:
    """The honest packed form: minified, lzma-compressed, base85 text in a two-line self-extracting script."""
    import python_minifier

    from validator.source.codebytes import MINIFY_OPTIONS
    from validator.source.wrappers import build_wrapper

    minified = python_minifier.minify(script, **MINIFY_OPTIONS)
    return build_wrapper(minified.encode("utf-8")).decode("ascii").rstrip("\n") + "\n"


def _git_config(key: str) -> str:
    try:
        out = subprocess.run(["git", "config", key], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def build_files(
    spec: VariantSpec, date: str, author: str, github_id: str, track: str = "record", pack: bool = False
) -> dict[str, str]:
    """The files of a submission folder, as text, from the templates; nothing is written."""
    if track not in TRACKS:
        raise UserError(f"--track {track!r}: choose record or non-record")
    defaults = spec.defaults_as_strings(track)
    try:
        entries = [spec.entry, *spec.modules]
        script = assemble_source(TEMPLATES_ROOT, entries, defaults, script_header(spec, track))
        requirements = requirements_for(third_party_roots(script))
    except (AssemblyError, ValueError) as exc:
        raise UserError(f"variant {spec.name}: {exc}") from exc
    sub = Submission(
        author=author,
        github_id=github_id,
        name=spec.title.replace("_", " "),
        blurb=spec.blurb,
        date=date,
        track=TRACKS[track],
        variant=spec.name,
    )
    files = {"train_gpt.py": pack_script(script) if pack else script}
    if pack:
        files[READABLE_NAME] = script
    extra = origin_section(spec, track)
    if pack:
        extra += (
            f"\n`train_gpt.py` is the packed form (minified, lzma, base85) of `{READABLE_NAME}`, and it is the file "
            "that runs and is counted; the readable one is there to be read.\n"
        )
    code_bytes = len(files["train_gpt.py"].encode("utf-8"))
    files["README.md"] = render_readme(sub, spec.architecture, knob_table(spec, defaults), code_bytes, extra)
    files["submission.json"] = json.dumps(sub.model_dump(), indent=2) + "\n"
    files["requirements.txt"] = requirements
    return files


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
    parser.add_argument(
        "--track",
        choices=sorted(TRACKS),
        default="record",
        help="record: the 600 s / 8-GPU recipe (default); non-record: the variant's own recipe",
    )
    parser.add_argument(
        "--pack",
        action="store_true",
        help="commit train_gpt.py in its packed form (minified + lzma + base85) with the readable script beside it",
    )


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
    files = build_files(spec, date, author, github_id, args.track, args.pack)
    write_folder(out, files, args.force)
    size = len(files["train_gpt.py"].encode("utf-8"))
    print(f"assembled {spec.name} ({args.track}) -> {out} (train_gpt.py {size:,} bytes)")
    return 0
