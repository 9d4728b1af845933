"""Code bytes three ways: raw file, the pinned minify + lzma + base85 wrapper, and with local modules."""

from __future__ import annotations

import importlib.metadata

import python_minifier
from source_audit_scripts import script

from validator.source.codebytes import MINIFY_OPTIONS, PINNED_MINIFIER, code_bytes, wrapped_size
from validator.source.wrappers import build_wrapper

MAIN = script().replace("import math\n", "import math\nfrom helpers import make_model\nimport kernels.scan as scan\n")
HELPERS = "def make_model():\n    return None\n"
SCAN = "def run():\n    return load(sources=['csrc/scan.cu'])\n"


def test_three_figures_on_a_folder_with_local_modules(make_folder):
    folder = make_folder(
        {
            "train_gpt.py": MAIN,
            "helpers.py": HELPERS,
            "kernels/scan.py": SCAN,
            "kernels/__init__.py": "",
            "csrc/scan.cu": "__global__ void k() {}\n",
            "README.md": "not code",
        }
    )
    result = code_bytes(folder, folder / "train_gpt.py")
    raw = len(MAIN.encode())
    assert result.raw == raw
    assert result.local_modules == ["csrc/scan.cu", "helpers.py", "kernels/__init__.py", "kernels/scan.py"]
    extra = len(HELPERS) + len(SCAN) + len("__global__ void k() {}\n")
    assert result.with_modules == raw + extra
    minified = python_minifier.minify(MAIN, **MINIFY_OPTIONS).encode()
    assert result.wrapped == len(build_wrapper(minified))
    assert 0 < result.wrapped < raw
    assert result.minifier_version == importlib.metadata.version("python-minifier") == PINNED_MINIFIER
    assert result.problems == []


def test_wrapped_size_is_deterministic_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SSM_GOLF_CACHE", str(tmp_path / "cache"))
    text = script() + "# cache test\n"
    wrapped_size.cache_clear()
    first = wrapped_size(text)
    stored = list((tmp_path / "cache" / "wrapped").iterdir())
    assert len(stored) == 1 and int(stored[0].read_text()) == first
    wrapped_size.cache_clear()
    assert wrapped_size(text) == first
    monkeypatch.setenv("SSM_GOLF_CACHE", "")
    wrapped_size.cache_clear()
    assert wrapped_size(text) == first  # cache off: computed again, same figure


def test_committed_wrapper_reports_its_decoded_size(make_folder):
    inner = script()
    wrapper = build_wrapper(inner.encode()).decode()
    folder = make_folder({"train_gpt.py": wrapper})
    result = code_bytes(folder, folder / "train_gpt.py")
    assert result.raw == len(wrapper.encode())
    assert result.decoded == len(inner.encode())
    assert result.wrapped == wrapped_size(inner)


def test_unparsable_script_still_gives_raw_bytes(make_folder):
    folder = make_folder({"train_gpt.py": "def broken(:\n"})
    result = code_bytes(folder, folder / "train_gpt.py")
    assert result.raw == len("def broken(:\n") and result.wrapped is None
    assert any("does not parse" in p for p in result.problems)


def test_import_fallback_of_a_local_module_is_warned(make_folder):
    from source_audit_scripts import codes

    from validator.source.audit import audit_source

    main = MAIN.replace(
        "from helpers import make_model\n",
        "try:\n    from helpers import make_model\nexcept ImportError:\n    make_model = None\n",
    )
    folder = make_folder({"train_gpt.py": main, "helpers.py": HELPERS, "kernels/scan.py": SCAN})
    findings = audit_source(folder, folder / "train_gpt.py")
    assert "LOCAL_IMPORT_FALLBACK" in codes(findings, "warning")
    assert "LOCAL_MODULES" in codes(findings, "note")


def test_local_modules_imported_inside_a_wrapper_are_counted(make_folder):
    wrapper = build_wrapper(b"import helpers\nprint(helpers.make_model())\n").decode()
    folder = make_folder({"train_gpt.py": wrapper, "helpers.py": HELPERS})
    result = code_bytes(folder, folder / "train_gpt.py")
    assert result.local_modules == ["helpers.py"]
    assert result.with_modules == len(wrapper.encode()) + len(HELPERS)
