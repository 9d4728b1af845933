"""The scan modules survive inlining into one script: assembled by builder.assembler, imported from a file, run
under TRITON_INTERPRET=1 on the CPU (or on CUDA), they match the repository's references."""

import importlib.util

import pytest
import torch

from builder.assembler import assemble_source

from .conftest import interpret_triton_stdlib  # noqa: TID252

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def load_assembled(repo_root, tmp_path, monkeypatch, entry: str):
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interpret_triton_stdlib(monkeypatch)
    source = assemble_source(repo_root, entry, {}, "assembled scan test")
    path = tmp_path / f"{entry.rsplit('.', 1)[-1]}_assembled.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all()
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def test_first_order_assembled(repo_root, tmp_path, monkeypatch):
    mod = load_assembled(repo_root, tmp_path, monkeypatch, "templates.scan.first_order")
    torch.manual_seed(0)
    a = torch.rand(2, 21, 16, device=DEV, requires_grad=True)
    b = torch.randn(2, 21, 16, device=DEV, requires_grad=True)
    h = mod.first_order_scan(a, b)
    h.square().sum().backward()
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    ref = mod.first_order_scan_ref(a64, b64)
    ref.square().sum().backward()
    assert rel_err(h, ref) < 1e-5
    assert rel_err(a.grad, a64.grad) < 1e-4 and rel_err(b.grad, b64.grad) < 1e-4
    log_a = -torch.rand(2, device=DEV)
    lti = mod.lti_scan(b.detach(), log_a, config={"method": "toeplitz"})
    assert rel_err(lti, mod.lti_scan_ref(b.detach().double(), log_a.double())) < 1e-5


def test_selective_assembled(repo_root, tmp_path, monkeypatch):
    mod = load_assembled(repo_root, tmp_path, monkeypatch, "templates.scan.selective")
    torch.manual_seed(0)
    u, delta = torch.randn(1, 9, 4, device=DEV), torch.randn(1, 9, 4, device=DEV) - 1
    A = -torch.rand(4, 3, device=DEV)
    B, C = torch.randn(1, 9, 3, device=DEV), torch.randn(1, 9, 3, device=DEV)
    y = mod.selective_scan(u, delta, A, B, C)
    ref = mod.selective_scan_ref(u.double(), delta.double(), A.double(), B.double(), C.double())
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("entry", ["templates.scan.first_order", "templates.scan.selective"])
def test_assembled_imports_nothing_local(repo_root, entry):
    source = assemble_source(repo_root, entry, {}, "assembled scan test")
    assert "from templates" not in source and "import templates" not in source
