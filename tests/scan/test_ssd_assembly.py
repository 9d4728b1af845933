"""The SSD and Mamba-3 scans survive inlining into one script: assembled by builder.assembler from the Mamba-3
entry (which pulls in the SSD module), loaded from a file, run interpreted on the CPU, they match the references."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from builder.assembler import assemble_source

from .conftest import interpret_triton_stdlib  # noqa: TID252


@pytest.fixture
def assembled(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton.language  # noqa: F401

    interpret_triton_stdlib(monkeypatch)
    source = assemble_source(repo_root, ["templates.scan.mamba3", "templates.scan.ssd"], {}, "assembled ssd test")
    assert "from templates" not in source and "import templates" not in source
    path = tmp_path / "mamba3_assembled.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def test_assembled_ssd_and_mamba3_match_references(assembled):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 21, 2, 16, generator=gen, requires_grad=True)
    dt = torch.randn(1, 21, 2, generator=gen)
    A = -torch.rand(2, generator=gen) - 0.5
    B, C = torch.randn(1, 21, 1, 16, generator=gen), torch.randn(1, 21, 1, 16, generator=gen)
    y = assembled.ssd_scan(x, dt, A, B, C, 16)
    y.square().sum().backward()
    assert _rel(y, assembled.ssd_scan_ref(x.detach().double(), dt.double(), A.double(), B.double(), C.double())) < 1e-5
    assert torch.isfinite(x.grad).all()
    soft = torch.nn.functional.softplus(dt)
    trap, angles = torch.randn(1, 21, 2, generator=gen), torch.randn(1, 21, 2, 4, generator=gen)
    args = (x.detach(), soft, -soft * 0.3, trap, B, C, angles)
    y3 = assembled.mamba3_siso_scan(*args, chunk_size=16)
    ref3 = assembled.mamba3_siso_scan_ref(*[a.double() for a in args], chunk_size=16)
    assert _rel(y3, ref3) < 1e-5
