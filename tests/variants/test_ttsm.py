"""ttsm: the full model's parameter count; stateful scoring of the selective mixer equals one pass; the hashed
n-gram buckets; a tiny model trains, exports (ternary5, least-squares scales, zlib), reads back and reproduces
its ternary forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from templates.config import model_config_from_env
from templates.export import choose_quantisers
from templates.features.ngram_hash import BigramHash, TrigramHash, bigram_buckets, trigram_buckets
from templates.hparams import Hyperparameters
from templates.layers import LinearMaker, TernaryLinear, ternarize, ternary_scale
from templates.mixers.selective import SelectiveSSM
from templates.model import LanguageModel

from .conftest import build_model, fixed_batch, round_trip, spec_defaults, train_steps  # noqa: TID252

TINY = {
    "VOCAB_SIZE": "64",
    "MODEL_DIM": "32",
    "NUM_LAYERS": "3",
    "SSM_STATE": "8",
    "BIGRAM_BUCKETS": "31",
    "TRIGRAM_BUCKETS": "64",
    "BIGRAM_DIM": "4",
    "TRIGRAM_DIM": "4",
    "KEEP_FLOAT_MAX_NUMEL": "200",
}


def _random_mixer(linear: LinearMaker) -> SelectiveSSM:
    torch.manual_seed(0)
    m = SelectiveSSM(16, linear, state=8)
    with torch.no_grad():
        m.out_proj.weight.normal_(0, 0.3)
        for name in ("dt", "B", "C"):
            getattr(m, f"{name}_conv_bias").normal_(0, 0.3)
    return m


def test_full_size_parameter_count(variant_env):
    variant_env("ttsm")
    with torch.device("meta"):
        model = LanguageModel(model_config_from_env())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 11_035_714) <= 0.005 * 11_035_714
    assert count == 11_035_714
    ternary = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert all(m.per_row for m in ternary)
    assert sum(m.weight.numel() for m in ternary) == 7_483_392  # in/out/B/C of 7 blocks: the origin's count
    assert not any(isinstance(m, TernaryLinear) for m in model.features.modules())


def test_stateful_windows_equal_one_pass():
    m = _random_mixer(LinearMaker("ternary", ternary_per_row=True)).eval()
    x = torch.randn(2, 29, 16)
    with torch.no_grad():
        whole = m(x)
        first, state = m.forward_stateful(x[:, :11], None)
        second, state = m.forward_stateful(x[:, 11:20], state)
        third, _ = m.forward_stateful(x[:, 20:], state)
    assert whole.abs().max() > 1e-2
    torch.testing.assert_close(torch.cat((first, second, third), dim=1), whole, rtol=1e-5, atol=1e-6)
    cold, _ = m.forward_stateful(x[:, 11:20], None)
    assert not torch.allclose(cold, second, atol=1e-4)  # the carried state matters


def test_stateful_model_logits_equal_one_pass(variant_env):
    variant_env("ttsm", **TINY)  # with the n-gram features: a window's first positions see the previous tokens
    model = build_model().eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mixers[0].out_proj.weight.normal_(0, 0.3)
        for feature in model.features:
            feature.proj.weight.normal_(0, 0.3)  # zero at init: make the features count
        ids = torch.randint(0, 64, (2, 40))
        whole = model.logits(ids)
        states: dict = {}
        parts = [model.logits(ids[:, :16], states), model.logits(ids[:, 16:], states)]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_ngram_buckets():
    ids = torch.tensor([[5, 7, 9, 1]])
    assert bigram_buckets(ids, 3072).tolist() == [[3071] + [(36313 * b ^ 27191 * a) % 3071 for a, b in
                                                            ((5, 7), (7, 9), (9, 1))]]  # fmt: skip
    pair, triple = trigram_buckets(ids, 8192)
    assert pair.tolist() == [[0] + [(36313 * b ^ 27191 * a) % 8192 for a, b in ((5, 7), (7, 9), (9, 1))]]
    assert triple.tolist() == [[0, 0] + [(36313 * c ^ 27191 * b ^ 12979 * a) % 8192 for a, b, c in
                                         ((5, 7, 9), (7, 9, 1))]]  # fmt: skip
    assert sum(p.numel() for p in BigramHash(1024, 576).parameters()) == 58_369
    assert sum(p.numel() for p in TrigramHash(1024, 576).parameters()) == 280_577


def test_spec_recipe(variant_env):
    d = spec_defaults("ttsm")
    assert d["EVAL_MODE"] == "stateful" and d["QUANT_TERNARY"] == "ternary5" and d["TERNARY_LSTSQ"] == "1"
    assert d["MATRIX_LR"] == "0.4" and d["TRAIN_BATCH_TOKENS"] == "32768" and d["MODEL_DIM"] == "576"
    # 4,096 tokens per GPU step leave the GPU waiting on launches: CUDA graphs (2.2x on an H200)
    assert d["COMPILE_MODE"] == "reduce-overhead"
    variant_env("ttsm")  # the whole recipe, as the script reads it
    assert Hyperparameters().compile_mode == "reduce-overhead"


def test_tiny_train_export_read_back(variant_env, tmp_path, monkeypatch):
    variant_env("ttsm", **TINY)
    model = build_model()
    x, y = fixed_batch(64, 4, 32)
    losses = train_steps(model, x, y, steps=8)
    assert losses[-1] < losses[0] - 0.1
    model.eval()
    plan = choose_quantisers(model, "int8", "ternary5", (), ("A_log",), 200, True)
    assert not any(q.startswith("ternary") for name, (q, _) in plan.items() if name.startswith("features."))
    with torch.no_grad():
        trained = model.logits(x)
        exact = round_trip(model, tmp_path / "exact.ptz", exact=True)
        torch.testing.assert_close(exact.logits(x), trained, rtol=1e-5, atol=1e-5)
        # the variant's plan: least-squares row scales at export, so the read-back ternary weights keep the
        # trained codes with the scale that best fits each float row
        full = round_trip(model, tmp_path / "full.ptz", exact=False)
        assert Hyperparameters().ternary_lstsq
        for ours, back in zip(model.modules(), full.modules()):
            if isinstance(ours, TernaryLinear):
                w = ours.weight.float()
                codes = ternarize(w, ternary_scale(w, per_row=True))
                lstsq = (w * codes).sum(1, keepdim=True) / (codes * codes).sum(1, keepdim=True).clamp_min(1.0)
                torch.testing.assert_close(back.effective_weight(), codes * lstsq, rtol=1e-5, atol=1e-6)
        assert full.features[1].tables[0].weight.unique().numel() <= 255  # int8 per row
        # with the training-time (absmean) scales the rest of the plan (int8 tables, fp16 embedding) costs little;
        # the least-squares scales are larger than absmean (the mean |w| of the nonzero codes only), which the
        # trained model never saw: here they cost far more (0.88 -> 1.14 nats on this tiny model)
        monkeypatch.setenv("TERNARY_LSTSQ", "0")
        absmean = round_trip(model, tmp_path / "absmean.ptz", exact=False)
        loss_trained = F.cross_entropy(trained.flatten(0, 1), y.flatten()).item()
        loss_absmean = F.cross_entropy(absmean.logits(x).flatten(0, 1), y.flatten()).item()
        loss_lstsq = F.cross_entropy(full.logits(x).flatten(0, 1), y.flatten()).item()
        assert abs(loss_absmean - loss_trained) < 0.01
        assert loss_lstsq > loss_absmean
