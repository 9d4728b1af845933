"""GPTQ against a plain reference of its math (explicit inverse Hessian, one column at a time), its gain over
rounding, the per-row ranges of Mamba-3's dynamics rows, the exact round trip through the artifact, and pruning."""

from __future__ import annotations

import pytest
import torch

from templates.config import model_config_from_env
from templates.export import choose_quantisers, decode_state, encode_state, read_artifact, write_artifact
from templates.gptq import (
    collect_hessians,
    compressed_size,
    generate_calibration,
    gptq_hessian_loss,
    gptq_plain_round,
    gptq_quantize,
    gptq_refine_plan,
    gptq_row_scales,
    selective_prune,
    wide_rows_plan,
)
from templates.hparams import Hyperparameters
from templates.model import LanguageModel
from validator.logs import parse_log

from .conftest import use_recipe  # noqa: TID252


def reference_gptq(w, h, qmax, scale, damp=0.01):
    """Optimal Brain Quantisation column by column in float64: quantise column j, spread its error with the inverse
    Hessian of the columns still free, then remove column j from that inverse."""
    w, h = w.double().clone(), h.double().clone()
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(h.size(0), dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    s, q_max = scale.double().view(-1), qmax.double().view(-1)
    codes = torch.zeros_like(w)
    for j in range(w.size(1)):
        q = torch.clamp(torch.round(w[:, j] / s), -q_max, q_max)
        codes[:, j] = q
        err = (w[:, j] - q * s) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes[:, torch.argsort(order)]


def _problem(rows=16, cols=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) * 0.5 + torch.eye(cols)
    x = torch.randn(400, cols, generator=gen) @ mix  # correlated inputs: where GPTQ helps
    w = torch.randn(rows, cols, generator=gen) * 0.05
    return w, x.T @ x / x.size(0)


def test_gptq_matches_the_reference_and_blocking_is_exact():
    w, h = _problem()
    qmax = torch.full((16,), 31)
    qmax[4:8] = 127
    scale = gptq_row_scales(w, qmax)
    codes, s = gptq_quantize(w, h, qmax, block_size=5, scale=scale)
    ref = reference_gptq(w, h, qmax, scale)
    assert (codes.double() == ref).float().mean() > 0.99
    whole, _ = gptq_quantize(w, h, qmax, block_size=128, scale=scale)
    assert (whole == codes).float().mean() > 0.99
    assert torch.equal(s, scale)
    assert codes[:4].abs().max() <= 31 and codes[8:].abs().max() <= 31


def test_gptq_beats_rounding_on_the_hessian_loss():
    w, h = _problem(seed=1)
    qmax = torch.full((16,), 7)  # a coarse grid makes the difference plain
    scale = gptq_row_scales(w, qmax)
    codes, _ = gptq_quantize(w, h, qmax, scale=scale)
    gptq_loss = gptq_hessian_loss(w, codes.float() * scale.view(-1, 1), h)
    plain_loss = gptq_hessian_loss(w, gptq_plain_round(w, qmax, scale), h)
    assert gptq_loss < 0.8 * plain_loss


TINY = dict(
    VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, NUM_LAYERS=3, MAMBA3_HEADDIM=16, MAMBA3_D_STATE=16,
    MAMBA3_CHUNK_SIZE=8, KEEP_FLOAT_MAX_NUMEL=256, ORTHO_INIT=0,
)  # fmt: skip


def test_model_gptq_dynamics_rows_int8_and_exact_round_trip(monkeypatch, tmp_path):
    use_recipe(monkeypatch, "mamba3-hybrid", **TINY)
    torch.manual_seed(0)
    hp, model = Hyperparameters(), LanguageModel(model_config_from_env())
    calibration = generate_calibration(model, n_seqs=2, seq_len=16, seed=3)
    assert calibration.shape == (2, 16) and calibration.max() < 64
    hessians = collect_hessians(model, calibration)
    in_proj = "blocks.0.mixers.0.in_proj.weight"
    assert in_proj in hessians and "tok_emb.weight" in hessians and hessians[in_proj].shape == (32, 32)
    plan = choose_quantisers(model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, 256)
    plan = gptq_refine_plan(model, hessians, plan)
    quantiser, options = plan[in_proj]
    start, stop = model.blocks[0].mixers[0].in_proj.wide_rows
    assert quantiser == "rows_int" and set(options["qmax"][start:stop]) == {127}
    assert set(options["qmax"][:start]) == {31} and plan["tok_emb.weight"][1]["qmax"][0] == 127
    container = encode_state(model.state_dict(), plan)
    assert container["tensors"][in_proj]["fields"]["q"][:start].abs().max() <= 31
    decoded = decode_state(container)
    assert torch.allclose(decoded[in_proj], model.state_dict()[in_proj], atol=1e-6)  # codes reproduced exactly
    path = tmp_path / "m.ptz"
    write_artifact(str(path), container, "lzma")
    LanguageModel(model_config_from_env()).load_state_dict(read_artifact(str(path)), strict=True)


def test_wide_rows_plan_without_gptq(monkeypatch):
    use_recipe(monkeypatch, "mamba3-hybrid", **TINY)
    hp, model = Hyperparameters(), LanguageModel(model_config_from_env())
    plan = choose_quantisers(model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, 256)
    plan = wide_rows_plan(model, plan)
    key = "blocks.0.mixers.0.in_proj.weight"
    start, stop = model.blocks[0].mixers[0].in_proj.wide_rows
    fields = encode_state(model.state_dict(), plan)["tensors"][key]["fields"]
    assert plan[key][0] == "rows_int" and plan[key][1]["qmax"][start] == 127 and fields["q"][:start].abs().max() <= 31


def test_selective_prune_fits_the_target_touching_only_unit_codes():
    torch.manual_seed(0)
    state = {"a": torch.randn(64, 256) * 0.05, "b": torch.randn(64, 256) * 0.02}
    plan = {"a": ("int6", {}), "b": ("int6", {})}
    container = encode_state(state, plan)
    before = {k: v["fields"]["q"].clone() for k, v in container["tensors"].items()}
    size = compressed_size(container, "lzma")
    target = int(size * 0.9)
    _, zeroed, candidates = selective_prune(container, target, "lzma")
    assert 0 < zeroed <= candidates and compressed_size(container, "lzma") <= target
    for key, old in before.items():
        new = container["tensors"][key]["fields"]["q"]
        changed = new != old
        assert (old[changed].abs() == 1).all() and (new[changed] == 0).all()


def test_late_qat_puts_the_forward_on_the_export_grid_and_passes_gradients():
    from templates.gptq import enable_late_qat, fake_quant_rows
    from templates.layers import LinearMaker
    from templates.mixers.mamba3 import Mamba3Mixer

    torch.manual_seed(0)
    layer = torch.nn.ModuleDict({"mixer": Mamba3Mixer(32, LinearMaker(), d_state=16, head_dim=16, chunk_size=8)})
    in_proj = layer["mixer"].in_proj
    x = torch.randn(4, 32)
    plain = in_proj(x)
    assert enable_late_qat(layer, bits=6, wide_bits=8, min_numel=256) == 2  # in_proj and out_proj
    out = in_proj(x)
    qmax = in_proj.qat_qmax
    start, stop = in_proj.wide_rows
    assert set(qmax[start:stop].view(-1).tolist()) == {127.0} and qmax[0].item() == 31.0
    grid = fake_quant_rows(in_proj.weight.detach(), qmax)
    assert torch.allclose(out, x @ grid.T, atol=1e-5) and not torch.allclose(out, plain)
    scale = torch.maximum(in_proj.weight.abs().amax(1, keepdim=True) / qmax, 1 / qmax)
    codes = grid / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes[:start].abs().max() <= 31
    out.sum().backward()
    assert torch.allclose(in_proj.weight.grad, x.sum(0).expand_as(in_proj.weight))  # straight through
    assert "qat_qmax" not in in_proj.state_dict() and set(in_proj.state_dict()) == {"weight"}


def test_export_stage_runs_gptq_and_prunes_to_the_target(monkeypatch):
    from templates.registry import STAGES

    use_recipe(monkeypatch, "mamba3-hybrid", **TINY)
    monkeypatch.setenv("USE_GPTQ", "1")
    monkeypatch.setenv("GPTQ_CALIB_SEQS", "2")
    monkeypatch.setenv("GPTQ_CALIB_LEN", "8")
    monkeypatch.setenv("GPTQ_RESERVE_SECONDS", "30")
    torch.manual_seed(0)
    hp, model = Hyperparameters(), LanguageModel(model_config_from_env())
    plan = choose_quantisers(model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, 256)
    lines: list[str] = []
    plain = compressed_size(encode_state(model.state_dict(), plan), "lzma")
    monkeypatch.setenv("PRUNE_TARGET_BYTES", str(plain - 300 + 1000))  # artifact + 1,000 bytes of "code"
    container = STAGES["export"](model, plan, 1000, hp, None, lines.append)
    assert STAGES["reserve_s"]() == 30.0
    assert container["tensors"]["blocks.0.mixers.0.in_proj.weight"]["quantiser"] == "rows_int"
    assert any("selective_prune" in line for line in lines)
    assert compressed_size(container, "lzma") <= plain - 300 - len(b"SSMG1 lzma\n")
    # the lines the validator reads: the reserve, self-generated calibration, the total; within the reserve here
    log = parse_log("\n".join(lines))
    assert log.gptq_reserve_s == 30.0 and log.gptq_effective_ms == 1000 * (hp.max_wallclock_seconds - 30)
    assert log.gptq_self_generated and 0 <= log.gptq_total_s < 30 and log.hessian_s is not None
    assert not any("over_reserve" in line for line in lines)


def test_export_stage_says_when_gptq_overran_its_reserve(monkeypatch):
    from templates.registry import STAGES

    use_recipe(monkeypatch, "mamba3-hybrid", **TINY)
    for key, value in dict(USE_GPTQ="1", GPTQ_CALIB_SEQS="2", GPTQ_CALIB_LEN="8", GPTQ_RESERVE_SECONDS="0").items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    hp, model = Hyperparameters(), LanguageModel(model_config_from_env())
    plan = choose_quantisers(model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, 256)
    lines: list[str] = []
    STAGES["export"](model, plan, 1000, hp, None, lines.append)
    assert any(line.startswith("gptq:over_reserve ") and line.endswith("> 0s: training + GPTQ passed the cap; "
               "raise the reserve") for line in lines)  # fmt: skip
    assert parse_log("\n".join(lines)).gptq_reserve_s == 0.0


def test_generation_stops_at_its_share_of_the_reserve(monkeypatch):
    """With a cap, self-generation may take GPTQ_GENERATION_SHARE of GPTQ_RESERVE_SECONDS: a reserve too small for
    the asked length gets shorter sequences (said in the log) and GPTQ still quantises, inside the reserve."""
    from templates.registry import STAGES

    use_recipe(monkeypatch, "mamba3-hybrid", **TINY)
    knobs = dict(USE_GPTQ="1", GPTQ_CALIB_SEQS="2", GPTQ_CALIB_LEN="4000", GPTQ_RESERVE_SECONDS="3")
    for key, value in knobs.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(0)
    hp, model = Hyperparameters(), LanguageModel(model_config_from_env())
    plan = choose_quantisers(model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, 256)
    lines: list[str] = []
    container = STAGES["export"](model, plan, 1000, hp, None, lines.append)
    (generated,) = [line for line in lines if line.startswith("gptq:generated ")]
    assert generated.endswith("(cut from 4000 at the reserve's generation share)"), generated
    assert 2 <= int(generated.split()[4]) < 4000
    assert container["tensors"]["blocks.0.mixers.0.in_proj.weight"]["quantiser"] == "rows_int"
    with torch.no_grad():  # a deadline already passed still leaves two tokens a sequence
        assert generate_calibration(model, 2, 50, deadline=0.0).shape == (2, 2)


def reference_calibration(model, n_seqs, seq_len, temperature=0.8, seed=42):
    """Self-generated calibration as plainly as it can be written: the prefix grows one token a step."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros((n_seqs, seq_len), dtype=torch.long)
    ids[:, 0] = torch.randint(0, model.cfg.vocab_size, (n_seqs,), generator=gen)
    model.eval()
    for t in range(seq_len - 1):
        probs = torch.softmax(model.logits(ids[:, : t + 1])[:, t].float() / temperature, dim=-1)
        ids[:, t + 1] = torch.multinomial(probs, 1, generator=gen)[:, 0]
    return ids


@pytest.mark.parametrize("seq_len", [5, 70])
def test_calibration_over_padded_prefixes_samples_what_the_growing_prefix_samples(monkeypatch, seq_len):
    """The generator runs padded power-of-two prefixes (64, then 70 here); causality keeps the padding out of the
    logits it reads, so it samples the same tokens as the one-token-a-step form from the same seed."""
    use_recipe(monkeypatch, "mamba3-hybrid", **TINY)
    torch.manual_seed(0)
    model = LanguageModel(model_config_from_env())
    got = generate_calibration(model, n_seqs=3, seq_len=seq_len, seed=5)
    assert model.training  # its mode is given back
    assert torch.equal(got, reference_calibration(model, 3, seq_len, seed=5))


def test_gptq_keeps_every_operand_on_the_weights_device():
    """The row ranges are made on the host; on a GPU they must follow the weights. The meta device stands in for
    CUDA here: a host tensor mixed into its arithmetic fails as it does on the GPU."""
    w, h = torch.randn(8, 16, device="meta"), torch.eye(16, device="meta")
    qmax = torch.tensor([31] * 6 + [127] * 2, dtype=torch.int32)  # the host tensor gptq_row_ranges makes
    assert gptq_row_scales(w, qmax).device.type == "meta"
    codes, scale = gptq_quantize(w, h, qmax, 8, 0.01)
    assert codes.shape == (8, 16) and codes.device.type == scale.device.type == "meta"
    assert gptq_plain_round(w, qmax, torch.ones(8, device="meta")).device.type == "meta"


def test_a_hessian_that_is_not_positive_definite_gets_more_damping():
    """What sums in low precision (TF32 on the GPU) make of X^T X: symmetric, with negative eigenvalues larger than
    the usual damping. The first GPU export of mamba3-hybrid failed in the Cholesky factorisation on such a matrix."""
    torch.manual_seed(0)
    cols = 256
    x = torch.randn(128, cols)
    x[:, :4] *= 100.0
    h = x.T @ x / 128
    noise = torch.randn(cols, cols) * 1e-3 * h.diag().max()
    h = h + (noise + noise.T) / 2
    assert torch.linalg.eigvalsh(h.double()).min() < -0.01 * h.diag().mean()  # beyond the first damping
    w, qmax = torch.randn(8, cols) * 0.02, torch.full((8,), 31)
    codes, scale = gptq_quantize(w, h, qmax)
    assert codes.abs().max() <= 31 and torch.isfinite(scale).all()
    recon = codes.float() * scale.view(-1, 1)
    assert (recon - w).abs().max() <= 2 * scale.max()  # still a quantisation of w, not noise
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(cols), qmax)
