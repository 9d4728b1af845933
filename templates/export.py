"""The artifact: int8 per-row quantisation of the weights, zlib compression, and the exact read-back."""

import io
import zlib

import torch

INT8_CLIP_QUANTILE = 0.9999984
INT8_KEEP_FLOAT_MAX_NUMEL = 65_536
INT8_FORMAT = "int8_clean_per_row_v1"


def _quantize_rows_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 with a clip at a high quantile of |w|; fp16 scales."""
    w = t.float()
    if w.numel() == 0:
        return torch.zeros_like(w, dtype=torch.int8), torch.ones(w.shape[0], dtype=torch.float16)
    clip = torch.quantile(w.abs(), INT8_CLIP_QUANTILE, dim=1) if w.shape[1] > 1 else w.abs().amax(dim=1)
    scale = (clip / 127.0).clamp_min(1e-7).to(torch.float16)  # an all-zero row keeps a tiny, nonzero scale
    s = scale.float()[:, None]
    q = torch.clamp(torch.round(torch.clamp(w, -clip[:, None], clip[:, None]) / s), -127, 127).to(torch.int8)
    return q, scale


def _quantize_tensor_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = t.float()
    clip = torch.quantile(w.abs().flatten(), INT8_CLIP_QUANTILE) if w.numel() else torch.tensor(0.0)
    scale = (clip / 127.0).clamp_min(1e-12)
    q = torch.clamp(torch.round(torch.clamp(w, -clip, clip) / scale), -127, 127).to(torch.int8)
    return q, scale.reshape(1).to(torch.float32)


def quantize_state_dict_int8(state: dict[str, torch.Tensor], keep_fp32_patterns: tuple[str, ...]) -> dict:
    """Large float tensors -> int8 (+ scales); small ones pass through (fp32 if a control tensor, else fp16)."""
    quantized, scales, passthrough, dtypes = {}, {}, {}, {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        if not t.is_floating_point():
            passthrough[name] = t
            continue
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        if t.numel() <= INT8_KEEP_FLOAT_MAX_NUMEL:
            keep32 = any(p in name for p in keep_fp32_patterns)
            passthrough[name] = t.float() if keep32 else t.to(torch.float16)
            continue
        q, s = _quantize_rows_int8(t) if t.ndim == 2 else _quantize_tensor_int8(t)
        quantized[name], scales[name] = q, s
    return dict(format=INT8_FORMAT, quantized=quantized, scales=scales, passthrough=passthrough, dtypes=dtypes)


def dequantize_state_dict_int8(obj: dict) -> dict[str, torch.Tensor]:
    if obj.get("format") != INT8_FORMAT:
        raise ValueError(f"artifact format {obj.get('format')!r} is not {INT8_FORMAT!r}")
    out = {}
    for name, q in obj["quantized"].items():
        s = obj["scales"][name].float()
        w = q.float() * (s[:, None] if q.ndim == 2 else s)
        out[name] = w.to(getattr(torch, obj["dtypes"][name]))
    for name, t in obj["passthrough"].items():
        out[name] = t.to(getattr(torch, obj["dtypes"][name])) if name in obj["dtypes"] else t
    return out


def payload_bytes(obj: dict) -> int:
    parts = ("quantized", "scales", "passthrough")
    return sum(t.numel() * t.element_size() for part in parts for t in obj[part].values())


def serialize_artifact(obj: dict) -> tuple[bytes, int]:
    """(compressed blob, raw torch.save size)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    raw = buf.getvalue()
    return zlib.compress(raw, level=9), len(raw)


def read_artifact(path: str) -> dict[str, torch.Tensor]:
    """Read an artifact file back into a state dict of the training dtypes."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        raw = zlib.decompress(blob)
    except zlib.error as exc:
        raise ValueError(f"{path}: not a zlib-compressed artifact ({exc}); pass the file the run wrote") from exc
    obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return dequantize_state_dict_int8(obj)
