"""Every SSM variant's tiny model compiles with torch.compile(fullgraph=True) on the CPU, its scans as opaque
ssm_golf ops (no graph break), gives the eager loss and gradients, and trains a step compiled.

Compiled through AOTAutograd with no-op compilers (what backend="aot_eager" does: forward and backward traced, no
C++ build, seconds per model on two cores); Inductor itself around the ops is covered in tests/scan."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from .conftest import build_model, fixed_batch, use_recipe, wake_zero_weights  # noqa: TID252

TINY = {
    "kill-mamba2": dict(
        VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, NUM_LAYERS=2, NUM_LOOPS=2, MLP_MULT=2,
        SSM_HEAD_DIM=16, SSM_STATE=8,
    ),
    "ttsm": dict(
        VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=3, SSM_STATE=8, BIGRAM_BUCKETS=31, TRIGRAM_BUCKETS=64, BIGRAM_DIM=4,
        TRIGRAM_DIM=4,
    ),
    "lru": dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=2),
    "hybrid-3to1": dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, NUM_LAYERS=4, S6_DT_RANK=4),
    "mamba3-hybrid": dict(
        VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, MAMBA3_HEADDIM=16, MAMBA3_D_STATE=16,
        MAMBA3_CHUNK_SIZE=8, NUM_LAYERS=3, ORTHO_INIT=0,
    ),
}  # fmt: skip
# the op each variant's graphs must hold (off CUDA the Mamba-3 scan is its PyTorch reference, traced whole)
SCAN_OP = {"kill-mamba2": "lti_toeplitz", "ttsm": "sel_scan", "lru": "fo_cscan", "hybrid-3to1": "sel_scan"}


@pytest.mark.parametrize("variant", list(TINY))
def test_tiny_model_compiles_fullgraph_and_trains(variant, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    use_recipe(monkeypatch, variant, **TINY[variant])
    torch._dynamo.reset()
    model = build_model()
    wake_zero_weights(model, 0.02)
    model.train()
    x, y = fixed_batch(64, 2, 24)
    graphs: dict[str, list[str]] = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, _example_inputs):
            graphs[kind].append(gm.code)
            return make_boxed_func(gm.forward)

        return compiler

    compiled = torch.compile(
        model, fullgraph=True, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    )
    params = [p for p in model.parameters() if p.requires_grad]
    loss_e = model(x, y)
    grads_e = torch.autograd.grad(loss_e, params, allow_unused=True)
    loss_c = compiled(x, y)
    grads_c = torch.autograd.grad(loss_c, params, allow_unused=True)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_c, grads_e):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1, "one graph each way: no graph break"
    if variant in SCAN_OP:
        assert f"ssm_golf.{SCAN_OP[variant]}.default" in graphs["fw"][0]
        assert f"ssm_golf.{SCAN_OP[variant]}_bwd.default" in graphs["bw"][0]
    # equal is not enough (zero equals zero): the compiled backward reaches every mixer parameter through the scan
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    dead = [n for n, g in zip(names, grads_c) if ".mixers." in n and (g is None or not g.abs().sum())]
    assert not dead, f"no gradient through the compiled scan for {dead}"
    # one optimiser step through the compiled model lowers the loss on the same batch
    opt = torch.optim.Adam(params, lr=1e-2)
    compiled(x, y).backward()
    opt.step()
    with torch.no_grad():
        after = compiled(x, y)
    assert torch.isfinite(after) and after.item() < loss_e.item()
