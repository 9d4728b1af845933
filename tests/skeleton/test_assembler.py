"""Assembler properties: determinism, only reached modules, dependency order, collisions and bad imports refused."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.assemble import TEMPLATES_ROOT, build_files
from builder.assembler import AssemblyError, assemble_source, third_party_roots
from builder.variants import get_variant


def _package(tmp_path: Path, modules: dict[str, str]) -> Path:
    pkg = tmp_path / "templates"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""t"""\n')
    for name, src in modules.items():
        path = pkg / Path(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent != pkg and not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text('"""sub"""\n')
        path.write_text(textwrap.dedent(src))
    return tmp_path


def test_baseline_is_deterministic_and_self_contained():
    spec = get_variant("baseline")
    a = build_files(spec, "2026-11-23", "a", "b")
    b = build_files(spec, "2026-11-23", "a", "b")
    assert a == b
    script = a["train_gpt.py"]
    compile(script, "train_gpt.py", "exec")
    assert "from templates" not in script and "import templates" not in script
    assert third_party_roots(script) == {"numpy", "sentencepiece", "torch"}
    assert a["requirements.txt"] == "numpy>=1.26\nsentencepiece>=0.2\ntorch>=2.9\n"
    # one definition of each top-level name, and main() runs last
    tree = ast.parse(script)
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert len(names) == len(set(names))
    assert isinstance(tree.body[-1], ast.If) and "main()" in ast.unparse(tree.body[-1])


def test_only_reached_modules_in_dependency_order(tmp_path):
    root = _package(
        tmp_path,
        {
            "low": '"""low."""\nimport math\n\n\ndef low():\n    return math.pi\n',
            "sub.mid": '"""mid."""\nimport math\nfrom templates.low import low\n\n\ndef mid():\n    return low()\n',
            "unused": '"""never imported."""\n\n\ndef unused():\n    pass\n',
            "entry": (
                '"""entry."""\nfrom templates.sub.mid import mid\n\n\ndef main():\n    print(mid())\n\n\n'
                'if __name__ == "__main__":\n    main()\n'
            ),
        },
    )
    src = assemble_source(root, "templates.entry", {}, "header")
    assert src.count("import math") == 1
    assert "def unused" not in src
    assert src.index("def low") < src.index("def mid") < src.index("def main")
    assert "# mid." in src and "templates.sub" not in src  # banners are the modules' own words
    ns: dict = {}
    exec(compile(src, "x", "exec"), ns)  # noqa: S102 - our own generated test script
    assert ns["mid"]() == pytest.approx(3.14159, abs=1e-4)


@pytest.mark.parametrize(
    "modules, message",
    [
        (
            {"a": "def f():\n    pass\n", "entry": "from templates.a import f\n\n\ndef f():\n    pass\n"},
            "bound in both",
        ),
        ({"entry": "from .a import f\n"}, "relative import"),
        ({"entry": "import templates.a\n"}, "import templates.a"),
        (
            {"a": "from templates.entry import g\n\n\ndef f():\n    pass\n", "entry": "from templates.a import f\n"},
            "import cycle",
        ),
        ({"a": "import numpy as np\n", "entry": "from templates.a import np\n\nnp = 3\n"}, "binds 'np'"),
        ({"entry": "from templates.missing import x\n"}, "not found"),
        ({"a": 'if __name__ == "__main__":\n    pass\n', "entry": "from templates.a import x\n"}, "__main__"),
        ({"entry": "def f(:\n"}, "syntax error"),
    ],
)
def test_refusals(tmp_path, modules, message):
    root = _package(tmp_path, modules)
    with pytest.raises(AssemblyError, match=message):
        assemble_source(root, "templates.entry", {}, "h")


def test_variant_defaults_are_written_in(tmp_path):
    entries = ["templates.train", "templates.mixers.attention"]
    src = assemble_source(TEMPLATES_ROOT, entries, {"NUM_LAYERS": "3", "MODEL_DIM": "64"}, "h")
    assert '    "MODEL_DIM": "64",\n    "NUM_LAYERS": "3",\n}' in src
    ns: dict = {}
    exec(compile(src.replace('if __name__ == "__main__":', "if False:"), "x", "exec"), ns)  # noqa: S102
    assert ns["Hyperparameters"]().train_seq_len == 1024
    assert ns["model_config_from_env"]().dim == 64 and len(ns["model_config_from_env"]().layers) == 3
    root = _package(tmp_path, {"entry": "def main():\n    pass\n"})
    with pytest.raises(AssemblyError, match="VARIANT_DEFAULTS"):
        assemble_source(root, "templates.entry", {"X": "1"}, "h")


def test_baseline_reads_like_a_training_script(tmp_path):
    """Sections in reading order, banners in words, no unused helper, under 1,500 lines, ruff-clean as it is."""
    script = build_files(get_variant("baseline"), "2026-11-27", "a", "b")["train_gpt.py"]
    assert len(script.splitlines()) < 1500
    assert "templates." not in script  # no module names, no local imports
    order = [
        "Hyperparameters:",
        "The model's declaration",
        "Token shards",
        "Causal self-attention",
        "The stack,",
        "Optimisers and schedules",
        "The artifact:",
        "Scoring the validation split",
        "Training and scoring",
    ]
    positions = [script.index("# " + title) for title in order]
    assert positions == sorted(positions)
    assert "EVAL_ONLY=1 ARTIFACT=" in script and "TOKEN_LOSSES=" in script  # the usage notes are kept
    assert "def bits_per_byte" not in script and "def ternary_encode" not in script  # unused parts left out
    path = tmp_path / "train_gpt.py"
    path.write_text(script)
    for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        done = subprocess.run([sys.executable, "-m", "ruff", *args, str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_pack_commits_the_counted_form_with_the_readable_one_beside(tmp_path):
    from validator.source.wrappers import find_wrappers

    files = build_files(get_variant("baseline"), "2026-11-27", "a", "b", track="non-record", pack=True)
    packed, readable = files["train_gpt.py"], files["train_gpt_readable.py"]
    assert len(packed) < len(readable) / 2 and packed.count("\n") <= 2
    (wrapper,) = find_wrappers(ast.parse(packed))
    decoded = wrapper.source
    assert "def main" in decoded and "VARIANT_DEFAULTS" in decoded
    assert f"({len(packed.encode()):,} bytes" in files["README.md"] and "non-record" in files["README.md"]
    assert '"non_record_16mb"' in files["submission.json"]
