"""Artifact bytes of the baseline's export against the int8 format as the facts describe upstream's (written here
from the description, not from upstream's code): the same weights through both must come within 1 %.

The facts (shared reference, section 1): tensors over 65,536 elements become int8, per row for matrices with the
row's |w| clipped at the 0.9999984 quantile and an fp16 scale max(clip / 127, 1 / 127), per tensor otherwise;
smaller tensors pass through, fp32 when their name matches a control pattern, else fp16; torch.save, then zlib 9.
"""

from __future__ import annotations

import io
import zlib

import torch

import templates.mixers.attention  # noqa: F401
from templates.config import model_config_from_env
from templates.export import choose_quantisers, encode_state, write_artifact
from templates.model import LanguageModel

CONTROL = ("branch_scales", "mlp_scale", "resid_mix", "q_gain", "skip_weights")


def reference_int8_zlib_bytes(state: dict[str, torch.Tensor]) -> int:
    ints, scales, kept = {}, {}, {}
    for name, t in state.items():
        w = t.float()
        if w.numel() <= 65_536:
            kept[name] = w if any(c in name for c in CONTROL) else w.half()
        elif w.ndim == 2:
            clip = torch.quantile(w.abs(), 0.9999984, dim=1)
            scale = torch.maximum(clip / 127, torch.full_like(clip, 1 / 127)).half()
            ints[name] = (w.clamp(-clip[:, None], clip[:, None]) / scale.float()[:, None]).round().to(torch.int8)
            scales[name] = scale
        else:
            clip = torch.quantile(w.abs().flatten(), 0.9999984)
            ints[name] = (w.clamp(-clip, clip) / (clip / 127)).round().to(torch.int8)
            scales[name] = (clip / 127).reshape(1)
    buf = io.BytesIO()
    torch.save({"int8": ints, "scales": scales, "passthrough": kept}, buf)
    return len(zlib.compress(buf.getvalue(), 9))


def test_same_weights_through_both_exports_within_one_percent(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(model_config_from_env())  # full size, 17,059,912 parameters
    with torch.no_grad():  # weights of a trained model's scale: rows well under 1, where the floor matters
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.03)
    plan = choose_quantisers(model, "int8", "ternary2", (), CONTROL, 65_536)
    ours, _ = write_artifact(str(tmp_path / "a.ptz"), encode_state(model.state_dict(), plan), "zlib")
    reference = reference_int8_zlib_bytes(model.state_dict())
    assert abs(ours - reference) / reference < 0.01, (ours, reference)
