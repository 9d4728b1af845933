"""bench/profile_step.py without a GPU: kernels are sorted into the right kinds, and the assembled script it imports
holds every name the profiler builds its step from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _profiler():
    path = Path(__file__).resolve().parents[2] / "bench" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("bench_profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        ("flash_fwd_kernel", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "matrix products"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", "matrix products"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "other triton"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "nccl"),
        ("void at::native::vectorized_elementwise_kernel<4>", "rest"),
    ],
)
def test_kernels_are_sorted_by_kind(kernel, kind):
    assert _profiler().kind_of(kernel) == kind


def test_the_scan_cores_kernels_are_found_by_name():
    profiler = _profiler()
    scan = profiler.scan_kernels()
    for prefix in ("_ssd_", "_sel_", "_fo_", "_m3r_"):  # each kernel family of the scan core is found
        assert any(name.startswith(prefix) and "kernel" in name for name in scan), prefix
    assert "_sel_scan_impl" not in scan and "selective_scan" not in scan  # Python wrappers, not kernels
    assert profiler.kind_of(sorted(scan)[0], scan) == "scan core"
    assert profiler.kind_of("triton_poi_fused_add_0", scan) == "other triton"


def test_the_assembled_script_gives_the_profiler_its_parts(tmp_path, monkeypatch):
    profiler = _profiler()
    monkeypatch.setattr(profiler.os, "environ", dict(profiler.os.environ))
    script = profiler.load_script("ttsm", tmp_path, {"MODEL_DIM": "64", "NUM_LAYERS": "2"})
    hp, cfg = script.Hyperparameters(), script.model_config_from_env()
    model = script.LanguageModel(cfg)
    groups = script.split_parameters(model, hp.control_patterns)
    assert cfg.dim == 64 and len(cfg.layers) == 2 and groups["muon"] and script.Muon
    assert (tmp_path / "train_gpt.py").is_file()


def test_markdown_names_a_failed_variant():
    text = _profiler().markdown([{"variant": "lru", "error": "exit 1: CUDA error"}])
    assert "lru: failed" in text and "CUDA error" in text


@pytest.mark.parametrize("graph_grads", [False, True])
def test_a_step_under_cuda_graphs_clones_the_first_micro_steps_gradients(graph_grads):
    """Under a CUDA-graph compile mode the first micro-step's .grad is a graph output that the next replay
    overwrites: the profiler's step clones it before the second micro-step adds to it, as the script's loop does
    (without that, ttsm's reduce-overhead step failed under the profiler). The summed gradient is the same."""
    import torch

    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3)
    model = lambda x, y: torch.nn.functional.mse_loss(base(x).float(), y)  # noqa: E731
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    first_ptr = []
    base.weight.register_post_accumulate_grad_hook(lambda p: first_ptr.append(p.grad.data_ptr()))
    seen = {}

    class Record(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self):
            seen["ptr"] = base.weight.grad.data_ptr()
            seen["grad"] = base.weight.grad.clone()

    _profiler().train_step(model, base, [Record(base.parameters())], x, y, 2, graph_grads)
    assert len(first_ptr) == 2 and (seen["ptr"] != first_ptr[0]) == graph_grads
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.autograd.grad(model(x, y), base.weight)[0]
    assert torch.allclose(seen["grad"], expected, atol=1e-6)
