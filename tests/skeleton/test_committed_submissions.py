"""The assembled folders committed under submissions/ are what today's templates assemble: no drift."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from builder.assemble import READABLE_NAME, build_files
from builder.variants import get_variant

SUBMISSIONS = Path(__file__).resolve().parents[2] / "submissions"
FOLDERS = sorted(p for p in SUBMISSIONS.iterdir() if (p / "submission.json").is_file())


def _track(sub: dict) -> str:
    """The spec track a committed submission.json's challenge track stands for."""
    return "record" if sub["track"] == "10min_16mb" else "non-record"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_committed_script_is_what_the_templates_assemble(folder):
    sub = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    track = _track(sub)
    packed = (folder / READABLE_NAME).is_file()
    files = build_files(get_variant(sub["variant"]), sub["date"], "-", "-", track, packed)
    for name in ("train_gpt.py", READABLE_NAME) if packed else ("train_gpt.py",):
        assert (folder / name).read_text(encoding="utf-8") == files[name], (
            f"{folder.name}/{name} is stale: re-run `builder assemble --variant {sub['variant']}` into it"
        )


def test_every_variant_has_a_committed_folder():
    assert {json.loads((f / "submission.json").read_text())["variant"] for f in FOLDERS} >= {
        "baseline", "kill-mamba2", "ttsm", "mamba3-hybrid", "lru", "hybrid-3to1",
    }  # fmt: skip


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_committed_script_carries_every_default_of_its_spec(folder):
    """Read from the script's own text, not through the assembler: VARIANT_DEFAULTS is the spec's defaults for the
    folder's track, every key and value (a default the assembler dropped would otherwise be re-committed by the
    staleness test's own advice)."""
    sub = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    track = _track(sub)
    script = folder / (READABLE_NAME if (folder / READABLE_NAME).is_file() else "train_gpt.py")
    tree = ast.parse(script.read_text(encoding="utf-8"))

    def names(node: ast.stmt) -> list[str | None]:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        return [getattr(target, "id", None) for target in targets]

    assigns = [node for node in tree.body if isinstance(node, ast.AnnAssign | ast.Assign)]
    found = [node.value for node in assigns if "VARIANT_DEFAULTS" in names(node)]
    assert len(found) == 1, f"{script.name}: one VARIANT_DEFAULTS assignment expected"
    assert ast.literal_eval(found[0]) == get_variant(sub["variant"]).defaults_as_strings(track)
