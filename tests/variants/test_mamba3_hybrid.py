"""mamba3-hybrid: the full-size count on the meta device, the tiny CPU path, the mixer's carried state."""

from __future__ import annotations

import torch

from templates.layers import LinearMaker
from templates.mixers.mamba3 import Mamba3Mixer

from .conftest import meta_parameter_count, stateful_matches_whole, train_export_score, use_recipe  # noqa: TID252

TINY = dict(
    VOCAB_SIZE=64, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, MAMBA3_HEADDIM=16, MAMBA3_D_STATE=16,
    MAMBA3_CHUNK_SIZE=8, TRAIN_SEQ_LEN=24, NUM_LAYERS=3, KEEP_FLOAT_MAX_NUMEL=256, ORTHO_INIT=0,
)  # fmt: skip


def test_full_size_parameter_count_is_the_origins(monkeypatch):
    spec = use_recipe(monkeypatch, "mamba3-hybrid", ORTHO_INIT=0)
    count = meta_parameter_count()
    assert abs(count - 25_159_984) <= 0.005 * 25_159_984
    assert count == 25_159_984
    assert spec.origin == "openai/parameter-golf#1890"


def test_attention_sits_at_depths_2_and_5(monkeypatch):
    use_recipe(monkeypatch, "mamba3-hybrid")
    from templates.config import model_config_from_env

    names = [spec.mixers[0] for spec in model_config_from_env().layers]
    assert [i for i, n in enumerate(names) if n == "attention"] == [2, 5] and len(names) == 7


def test_in_proj_rows_and_dynamics_rows_at_full_size():
    with torch.device("meta"):
        mixer = Mamba3Mixer(512, LinearMaker())
    assert tuple(mixer.in_proj.weight.shape) == (2240, 512)
    assert mixer.in_proj.wide_rows == (2176, 2208)  # dd_dt then dd_A: 2 x 16 heads
    assert mixer.heads == 16 and mixer.angles == 16


def test_dynamics_rows_drive_dt(monkeypatch):
    """Changing only the wide rows changes the output; they are the dt / A rows the export keeps finer."""
    torch.manual_seed(0)
    mixer = Mamba3Mixer(32, LinearMaker(), d_state=16, head_dim=16, chunk_size=8)
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        before = mixer(x)
        start, stop = mixer.in_proj.wide_rows
        mixer.in_proj.weight[start:stop] += 0.5
        after = mixer(x)
    assert (after - before).abs().max() > 1e-4


def test_tiny_model_trains_exports_and_scores(monkeypatch, tmp_path):
    use_recipe(monkeypatch, "mamba3-hybrid", **TINY)
    r = train_export_score(tmp_path)
    assert r["last"] < r["first"] - 0.3
    assert torch.isfinite(torch.tensor(r["scored"])) and abs(r["scored"] - r["trained"]) < 0.25
    assert (tmp_path / "final_model.int6.ptz").read_bytes().startswith(b"SSMG1 lzma\n")


def test_state_carried_across_windows_equals_one_pass():
    torch.manual_seed(1)
    mixer = Mamba3Mixer(32, LinearMaker(), d_state=16, head_dim=16, chunk_size=8)
    assert stateful_matches_whole(mixer, 32) < 1e-4
