"""Hostile input: junk text, binary files, huge files, links leaving the folder, odd names. Never a crash, never a
read outside the folder, never execution of the analysed code."""

from __future__ import annotations

import ast
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from source_audit_scripts import codes, script

from validator.findings import Finding
from validator.source.audit import audit_source
from validator.source.codebytes import code_bytes
from validator.source.reachability import Reachability
from validator.source.reading import MAX_SOURCE_BYTES, UnsafePath
from validator.source.rules import ALL_RULES
from validator.source.rules.common import RuleContext
from validator.source.wrappers import find_wrappers

PYTHONISH = st.lists(
    st.sampled_from(
        [
            "import lzma, base64\n",
            "exec(lzma.decompress(base64.b85decode(b'",
            "'))\n",
            "def f(x, y):\n",
            "    return x ^ (y * 2654435761)\n",
            "if int(os.environ.get('A', '0')):\n",
            "    loss.backward()\n",
            "for i in range(3):\n",
            "    loss_sum += model(x, y)\n",
            "val_tokens = load('fineweb_val_*.bin')\n",
            "train_files = val_tokens\n",
            "x[:, :-1]\n",
            "torch.cat([a, x[:, :-1]], 1)\n",
            "piece = sp.id_to_piece(i)\n",
            "def build_sentencepiece_luts(sp):\n",
            "    base[i] = len(piece) + 1\n",
            "class H:\n    a = getattr(h, 'x', 0)\n",
            "lambda q: q\n",
            "(",
            "\x00",
            "\ud7ff",
        ]
    ),
    max_size=30,
)


def _audit_text(text: str) -> None:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    reach = Reachability(tree)
    ctx = RuleContext.build(tree, reach)
    for rule in ALL_RULES:
        rule(ctx)
    find_wrappers(tree)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_ast_walker_never_raises_on_junk_text(text):
    _audit_text(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PYTHONISH)
def test_ast_walker_never_raises_on_python_like_junk(pieces):
    _audit_text("".join(pieces))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000))
def test_audit_of_binary_junk_gives_findings_not_exceptions(make_folder, data):
    folder = make_folder({"train_gpt.py": data})
    findings = audit_source(folder, folder / "train_gpt.py")
    assert all(isinstance(f, Finding) for f in findings)


def test_non_utf8_script_is_a_warning(make_folder):
    folder = make_folder({"train_gpt.py": b"x = 1\n# \xff\xfe\n"})
    assert "SOURCE_NOT_UTF8" in codes(audit_source(folder, folder / "train_gpt.py"), "warning")


def test_syntax_error_is_a_warning(make_folder):
    folder = make_folder({"train_gpt.py": "def f(:\n    pass\n"})
    findings = audit_source(folder, folder / "train_gpt.py")
    assert codes(findings) == {"SOURCE_UNPARSED"} and findings[0].line == 1


def test_huge_script_is_not_read_whole(make_folder):
    folder = make_folder({"train_gpt.py": "x = 1\n" * (MAX_SOURCE_BYTES // 6 + 10)})
    assert "SOURCE_TOO_LARGE" in codes(audit_source(folder, folder / "train_gpt.py"), "warning")


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_links_leaving_the_folder_are_refused(make_folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("SECRET = 1\n", encoding="utf-8")
    folder = make_folder({"README.md": "x"})
    os.symlink(outside / "secret.py", folder / "train_gpt.py")
    findings = audit_source(folder, folder / "train_gpt.py")
    assert codes(findings, "error") == {"SOURCE_UNREADABLE"}
    assert "outside" in findings[0].message and str(tmp_path) not in findings[0].message
    with pytest.raises(UnsafePath):
        code_bytes(folder, folder / "train_gpt.py")
    # a local import that is a link out of the folder is refused and not counted
    (folder / "train_gpt.py").unlink()
    (folder / "train_gpt.py").write_text("import secret\n", encoding="utf-8")
    os.symlink(outside / "secret.py", folder / "secret.py")
    findings = audit_source(folder, folder / "train_gpt.py")
    assert "SOURCE_UNSAFE_PATH" in codes(findings, "error")
    result = code_bytes(folder, folder / "train_gpt.py")
    assert result.local_modules == [] and result.with_modules == result.raw
    assert any("outside" in p for p in result.problems)


def test_odd_file_names_are_handled(make_folder):
    name = "mod\u00e9_\u4e2d.py"
    folder = make_folder({"train_gpt.py": script().replace("import math\n", "import math\nimport mod\u00e9_\u4e2d\n")})
    (folder / name).write_text("VALUE = 1\n", encoding="utf-8")
    if os.name != "nt":
        (folder / os.fsdecode(b"junk\xff.py")).write_bytes(b"\x00\x01")
    findings = audit_source(folder, folder / "train_gpt.py")
    assert "LOCAL_MODULES" in codes(findings, "note")
    assert name in code_bytes(folder, folder / "train_gpt.py").local_modules


def test_analysed_code_is_never_executed(make_folder, tmp_path):
    marker = tmp_path / "executed"
    payload = f"open({str(marker)!r}, 'w').write('x')\n"
    import base64
    import lzma

    literal = base64.b85encode(lzma.compress(payload.encode()))
    wrapper = f"import lzma,base64\nexec(lzma.decompress(base64.b85decode({literal!r})))\n"
    folder = make_folder({"train_gpt.py": payload + wrapper, "helper.py": payload})
    audit_source(folder, folder / "train_gpt.py")
    code_bytes(folder, folder / "train_gpt.py")
    assert not marker.exists()
