"""`builder data` errors: exit status 2 and exactly one line on stderr naming the file and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from builder.cli import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["text", "--input", "{tmp}/none/*.txt", "--out", "{tmp}/out"], "no files match"),
        (["fineweb", "--source", "{tmp}/missing", "--out", "{tmp}/out"], "{tmp}/missing: no such folder"),
        (["fineweb", "--source", "{tmp}", "--out", "{tmp}/out"], "{tmp}/manifest.json: missing"),
        (["sample", "--out", "{tmp}/out", "--docs", "5", "--val-docs", "5"], "--val-docs 5 leaves no train"),
    ],
)
def test_errors_exit_2_with_one_line(tmp_path, capsys, argv, expected):
    code = main(["data", *[arg.replace("{tmp}", str(tmp_path)) for arg in argv]])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("builder data: error: ")
    assert expected.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "out").exists()


def test_console_script_path(tmp_path):
    """The console script's entry point (builder.cli:main), end to end in a fresh interpreter."""
    entry = "import sys; from builder.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", entry, "data", "fineweb", "--source", str(tmp_path / "nowhere")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"builder data: error: {tmp_path / 'nowhere'}: no such folder; pass a local export folder or a Hugging "
        "Face dataset repo id such as willdepueoai/parameter-golf"
    ]
