"""Self-extracting wrappers: built, found and decoded without executing, nested, raw-lzma, undecodable; the audit
finds a rule hidden inside a wrapper."""

from __future__ import annotations

import ast
import base64
import bz2
import lzma
import zlib

from source_audit_scripts import NGRAM_CACHE, codes, script

from validator.source.audit import audit_source
from validator.source.wrappers import build_wrapper, find_wrappers

SOURCE = "x = 41\nprint(x + 1)\n"


def decoded(text: str) -> list:
    return find_wrappers(ast.parse(text))


def test_convention_wrapper_round_trip():
    wrapper = build_wrapper(SOURCE.encode())
    assert wrapper.startswith(b"import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(")
    found = decoded(wrapper.decode())
    assert len(found) == 1 and found[0].source == SOURCE
    assert found[0].steps == ("base64.b85decode", "lzma.decompress")


def test_other_codecs_and_aliases():
    payloads = {
        "import zlib, base64\nexec(zlib.decompress(base64.b64decode({lit!r})))": base64.b64encode(
            zlib.compress(SOURCE.encode())
        ),
        "from bz2 import decompress as D\nfrom base64 import a85decode as A\nexec(D(A({lit!r})).decode())": (
            base64.a85encode(bz2.compress(SOURCE.encode()))
        ),
        "import gzip, codecs\nexec(gzip.decompress(codecs.decode({lit!r}, 'hex')))": None,
    }
    import gzip

    payloads[list(payloads)[2]] = gzip.compress(SOURCE.encode(), mtime=0).hex().encode()
    for template, literal in payloads.items():
        found = decoded(template.format(lit=literal))
        assert found and found[0].source == SOURCE, template


def test_raw_lzma_with_filters_and_payload_in_a_variable():
    filters = [{"id": lzma.FILTER_LZMA2}]
    raw = lzma.compress(SOURCE.encode(), format=lzma.FORMAT_RAW, filters=filters)
    text = (
        "import lzma as L, base64 as B\n"
        f"PAYLOAD = {base64.b85encode(raw)!r}\n"
        'exec(L.decompress(B.b85decode(PAYLOAD), format=L.FORMAT_RAW, filters=[{"id": L.FILTER_LZMA2}]))\n'
    )
    found = decoded(text)
    assert found and found[0].source == SOURCE


def test_corrupt_payload_is_reported_not_raised():
    text = "import lzma, base64\nexec(lzma.decompress(base64.b85decode(b'0000000000')))\n"
    found = decoded(text)
    assert found and found[0].source is None and found[0].error


def test_payload_from_a_file_is_not_a_wrapper_literal():
    text = "import lzma\nexec(lzma.decompress(open('blob.xz', 'rb').read()))\n"
    found = decoded(text)
    assert found and found[0].source is None


def test_decompression_bomb_is_refused():
    bomb = lzma.compress(b"#" * 30_000_000)
    text = f"import lzma, base64\nexec(lzma.decompress(base64.b85decode({base64.b85encode(bomb)!r})))\n"
    found = decoded(text)
    assert found and found[0].source is None and "exceeds" in found[0].error


def test_audit_finds_rule_inside_wrapper(make_folder):
    inner = script(NGRAM_CACHE, extra="    ngram_eval(args, model, val_tokens)\n")
    folder = make_folder({"train_gpt.py": build_wrapper(inner.encode()).decode()})
    findings = audit_source(folder, folder / "train_gpt.py")
    assert "OBFUSCATED_WRAPPER" in codes(findings, "note")
    hits = [f for f in findings if f.code == "NGRAM_HASH_KEYED_ON_TARGET"]
    assert hits and hits[0].severity.value == "error" and "decoded line" in hits[0].message
    assert hits[0].file == "train_gpt.py" and hits[0].line == 2


def test_nested_wrappers_are_followed(make_folder):
    inner = script(NGRAM_CACHE, extra="    ngram_eval(args, model, val_tokens)\n")
    twice = build_wrapper(build_wrapper(inner.encode()))
    folder = make_folder({"train_gpt.py": twice.decode()})
    findings = audit_source(folder, folder / "train_gpt.py")
    assert [f.code for f in findings].count("OBFUSCATED_WRAPPER") == 2
    assert "NGRAM_HASH_KEYED_ON_TARGET" in codes(findings, "error")


def test_undecodable_wrapper_is_a_warning(make_folder):
    folder = make_folder({"train_gpt.py": "import lzma, sys\nexec(lzma.decompress(sys.stdin.buffer.read()))\n"})
    findings = audit_source(folder, folder / "train_gpt.py")
    assert "WRAPPER_UNDECODABLE" in codes(findings, "warning")
