"""The stack from its declaration: the layer-pattern grammar, each kind of pattern (serial, parallel, looped) builds,
trains a step and exports; stateful scoring; the baseline's parameter count on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import templates.mixers.attention  # noqa: F401
import templates.quant_ternary  # noqa: F401
from templates.config import LayerSpec, model_config_from_env, parse_layer_pattern
from templates.evaluate import evaluate
from templates.export import choose_quantisers, encode_state, read_artifact, write_artifact
from templates.layers import LinearMaker
from templates.model import Block, LanguageModel
from templates.optim import Muon, split_parameters
from templates.registry import MIXERS, register_mixer

TINY = dict(VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1)


@register_mixer("test_ema")
class EmaMixer(nn.Module):
    """A test-only recurrent mixer: an exponential moving average over time that can carry its state."""

    OPTIONS = {"decay": ("TEST_EMA_DECAY", 0.9)}

    def __init__(self, dim: int, linear: LinearMaker, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay
        self.proj = linear(dim, dim)

    def forward_stateful(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.zeros_like(x[:, 0]) if state is None else state
        out = []
        for t in range(x.size(1)):
            h = self.decay * h + (1 - self.decay) * x[:, t]
            out.append(h)
        return self.proj(torch.stack(out, dim=1)), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stateful(x, None)[0]


def test_unknown_mixer_is_named(monkeypatch):
    monkeypatch.setenv("LAYER_PATTERN", "nope")
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        model_config_from_env()


def test_pattern_grammar():
    layers = parse_layer_pattern("s6,s6,s6,attention", 9, "relu2")
    assert [i for i, spec in enumerate(layers) if spec.mixers == ("attention",)] == [3, 7]
    assert parse_layer_pattern("attention|lti:swiglu", 2, "relu2")[1] == LayerSpec(("attention", "lti"), True, "swiglu")
    assert parse_layer_pattern("a+b:none", 1, "relu2")[0] == LayerSpec(("a", "b"), False, "none")
    for bad, message in [
        ("a,,b", "empty position"),
        ("a:gelu", "MLP kind"),
        ("a|b+c", "either"),
        ("a|", "empty mixer"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_layer_pattern(bad, 3, "relu2")


def test_baseline_parameter_count_on_meta():
    with torch.device("meta"):
        model = LanguageModel(model_config_from_env())
    assert sum(p.numel() for p in model.parameters()) == 17_059_912


@pytest.mark.parametrize(
    "env",
    [
        dict(LAYER_PATTERN="attention|test_ema:swiglu", NUM_LAYERS=2),  # parallel branches
        dict(LAYER_PATTERN="attention+test_ema:leaky_relu2", NUM_LAYERS=2),  # serial mixers
        dict(LAYER_PATTERN="test_ema:none,attention", NUM_LAYERS=3, NUM_LOOPS=2, LOOP_EMBEDDING=1),  # looped
        dict(LAYER_PATTERN="attention", NUM_LAYERS=2, LINEAR_KIND="ternary", TIE_EMBEDDINGS=0, ORTHO_INIT=1),
    ],
)
def test_each_kind_of_pattern_builds_trains_and_exports(monkeypatch, tmp_path, env):
    for k, v in {**TINY, **env}.items():
        monkeypatch.setenv(k, str(v))
    cfg = model_config_from_env()
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    loops = int(env.get("NUM_LOOPS", 1))
    assert len(model.blocks) == int(env["NUM_LAYERS"]) and model.cfg.loops == loops
    watched = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, Block) or name.rsplit(".", 2)[-2:-1] == ["mixers"]
    }
    assert sum(".mixers." in name for name in watched) >= len(model.blocks)
    calls = dict.fromkeys(watched, 0)
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in watched.items()
    ]
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8)))
    for hook in hooks:
        hook.remove()
    # every block and every mixer runs once per loop: parallel, serial and looped patterns alike
    assert set(calls.values()) == {loops}, calls
    groups = split_parameters(model, ("branch_scales", "mlp_scale", "resid_mix", "q_gain", "skip_weights"))
    muon = Muon(groups["muon"], lr=0.02, momentum=0.9, steps=5)
    adam = torch.optim.Adam(groups["embed"] + groups["scalar"] + groups["head"], lr=0.01)
    x = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(6):
        loss = model(x, x.roll(-1, dims=1))
        loss.backward()
        for opt in (muon, adam):
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)
    plan = choose_quantisers(model, "int8", "ternary2", (), ("resid_mix",), 64)
    path = tmp_path / "a.ptz"
    write_artifact(str(path), encode_state(model.state_dict(), plan), "zlib")
    reread = LanguageModel(cfg)
    reread.load_state_dict(read_artifact(str(path)), strict=True)
    with torch.no_grad():
        drift = (reread(x, x.roll(-1, dims=1)) - model(x, x.roll(-1, dims=1))).abs().item()
    assert drift < 0.05


def test_stateful_scoring_carries_recurrent_state(monkeypatch):
    for k, v in {**TINY, "LAYER_PATTERN": "test_ema:none", "NUM_LAYERS": 1, "X0_MIX": 0}.items():
        monkeypatch.setenv(k, str(v))
    torch.manual_seed(0)
    model = LanguageModel(model_config_from_env())
    tokens = torch.randint(0, 64, (4 * 8 + 1,), dtype=torch.int32)
    tables = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    cpu = torch.device("cpu")
    loss_windows, bpb_windows, _ = evaluate(model, tokens, tables, 8, 1, 0, 1, cpu, None)
    loss_stateful, _, kept = evaluate(model, tokens, tables, 8, 1, 0, 1, cpu, None, stateful=True, keep_losses=True)
    whole, _, _ = evaluate(model, tokens, tables, 32, 1, 0, 1, cpu, None)
    assert loss_stateful == pytest.approx(whole, rel=1e-5)  # one stream with carried state = one long window
    assert loss_stateful != pytest.approx(loss_windows, rel=1e-6)
    assert kept.numel() == 32 and bpb_windows == pytest.approx(loss_windows / math.log(2))
    assert "test_ema" in MIXERS


def test_blocks_compile_once_and_match_eager(monkeypatch):
    """COMPILE_SCOPE=blocks: every block runs one compiled graph (compiled once for the first block, once more for
    the aliasing of x and x0 there), and the model computes what it computes eagerly, stateful scoring included."""
    import templates.mixers.lti_mamba2  # noqa: F401

    env = {**TINY, "LAYER_PATTERN": "attention|lti_mamba2", "NUM_LAYERS": 3, "NUM_LOOPS": 2, "SSM_HEAD_DIM": 8}
    for k, v in {**env, "SSM_STATE": 4}.items():
        monkeypatch.setenv(k, str(v))
    torch.manual_seed(0)
    model = LanguageModel(model_config_from_env()).eval()
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        eager = model(ids, ids, reduction="none")
        state: dict = {}
        eager_windows = [model.logits(ids[:, :12], state), model.logits(ids[:, 12:], state)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for block in model.blocks:
        block.compile(dynamic=False, fullgraph=True)
    with torch.no_grad():
        compiled = model(ids, ids, reduction="none")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2  # six block calls (3 blocks x 2 loops), at most two graphs
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        state = {}
        windows = [model.logits(ids[:, :12], state), model.logits(ids[:, 12:], state)]
    for got, want in zip(windows, eager_windows):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_a_knob_outside_its_choices_is_one_clear_error(monkeypatch):
    from templates.hparams import Hyperparameters

    monkeypatch.setenv("COMPILE_SCOPE", "block")
    with pytest.raises(SystemExit, match=r"COMPILE_SCOPE='block': choose one of model, blocks"):
        Hyperparameters()


def test_compile_mode_is_a_knob_with_named_choices(monkeypatch):
    """COMPILE_MODE picks torch.compile's mode: reduce-overhead (CUDA graphs, for variants whose step waits on the
    host, as ttsm's does), max-autotune(-no-cudagraphs) (Triton matrix products that can take elementwise work into
    their epilogues, for kill-mamba2's elementwise-bound step); anything else is refused by name."""
    from templates.hparams import Hyperparameters

    assert Hyperparameters().compile_mode == "default"
    for mode in ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        monkeypatch.setenv("COMPILE_MODE", mode)
        assert Hyperparameters().compile_mode == mode
    monkeypatch.setenv("COMPILE_MODE", "fast")
    with pytest.raises(SystemExit, match=r"COMPILE_MODE='fast': choose one of default, reduce-overhead, max-autotune"):
        Hyperparameters()
