"""The artifact: a quantiser per tensor, the encoded tensors saved with torch.save, the blob compressed, behind a
plain header naming format and compressor; the score is always computed on the model read back from the file.

Which quantiser a tensor gets (first rule that applies):
  QUANT_OVERRIDES "name_substring=quantiser"      e.g. "tok_emb=int8"
  weights of ternary linears                      QUANT_TERNARY (ternary2 or ternary5)
  small tensors (<= KEEP_FLOAT_MAX_NUMEL)         float32 if a control tensor, else float16
  everything else                                 QUANT (int8 or int6)
"""

import io
import lzma
import os
import zlib

import torch
from torch import Tensor, nn

from templates.layers import TernaryLinear
from templates.quant import Quantiser
from templates.registry import COMPRESSORS, QUANTISERS, lookup, register

FORMAT = "ssm-golf-artifact/1"
MAGIC = b"SSMG1 "  # then the compressor's name, a newline, the compressed torch.save blob

register(COMPRESSORS, "zlib")((lambda raw: zlib.compress(raw, 9), zlib.decompress))
register(COMPRESSORS, "lzma")((lambda raw: lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME), lzma.decompress))


class ArtifactError(ValueError):
    """An artifact that cannot be written or read back; the message names the file."""


def choose_quantisers(
    model: nn.Module,
    quant: str,
    quant_ternary: str,
    overrides: tuple[str, ...],
    control_patterns: tuple[str, ...],
    keep_float_max_numel: int,
    ternary_lstsq: bool = False,
) -> dict[str, tuple[str, dict]]:
    """{tensor name: (quantiser, options)} for every floating tensor of the model's state dict."""
    ternary = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}
    rules = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"QUANT_OVERRIDES item {item!r} is not name_substring=quantiser")
        rules.append((key, value))
    plan = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        chosen = next((q for key, q in rules if key in name), None)
        if chosen is None and name in ternary:
            chosen = quant_ternary
        if chosen is None and t.numel() <= keep_float_max_numel:
            chosen = "float32" if any(p in name for p in control_patterns) else "float16"
        chosen = chosen or quant
        lookup(QUANTISERS, "quantiser", chosen)
        options = {}
        if chosen.startswith("ternary"):
            if name not in ternary:
                raise ValueError(f"{name}: {chosen} is only for the weights of ternary linears (LINEAR_KIND=ternary)")
            options = {"per_row": ternary[name].per_row, "lstsq": ternary_lstsq}
        plan[name] = (chosen, options)
    return plan


def encode_state(state: dict[str, Tensor], plan: dict[str, tuple[str, dict]]) -> dict:
    """The serialisable container: format tag and, per tensor, its quantiser, dtype and encoded fields."""
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if name not in plan:
            tensors[name] = {"quantiser": "raw", "dtype": str(t.dtype), "fields": {"w": t.clone()}}
            continue
        quantiser, options = plan[name]
        q: Quantiser = lookup(QUANTISERS, "quantiser", quantiser)
        tensors[name] = {"quantiser": quantiser, "dtype": str(t.dtype), "fields": q.encode(t, options)}
    return {"format": FORMAT, "tensors": tensors}


def decode_state(container: dict) -> dict[str, Tensor]:
    if not isinstance(container, dict) or container.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} container")
    out = {}
    for name, entry in container["tensors"].items():
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        if entry["quantiser"] == "raw":
            out[name] = entry["fields"]["w"]
            continue
        q: Quantiser = lookup(QUANTISERS, "quantiser", entry["quantiser"])
        out[name] = q.decode(entry["fields"]).to(dtype)
    return out


def payload_bytes(container: dict) -> int:
    """Bytes of the encoded tensors themselves, before torch.save and compression."""
    fields = (f for entry in container["tensors"].values() for f in entry["fields"].values())
    return sum(t.numel() * t.element_size() for t in fields)


def write_artifact(path: str, container: dict, compressor: str) -> tuple[int, int]:
    """Write the artifact (temporary name, then rename); (bytes of the file, bytes of the torch.save blob)."""
    compress, _ = lookup(COMPRESSORS, "compressor", compressor)
    buf = io.BytesIO()
    torch.save(container, buf)
    raw = buf.getvalue()
    blob = MAGIC + compressor.encode() + b"\n" + compress(raw)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return len(blob), len(raw)


def read_artifact(path: str) -> dict[str, Tensor]:
    """The state dict stored in an artifact file; ArtifactError (one line, naming the file) if it cannot be read."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the artifact ({exc.strerror}); pass the file the run wrote") from exc
    header, newline, body = blob.partition(b"\n")
    if not header.startswith(MAGIC) or not newline:
        raise ArtifactError(f"{path}: not an ssm-golf artifact (no {MAGIC.decode().strip()} header); re-export it")
    compressor = header[len(MAGIC) :].decode("ascii", errors="replace")
    if compressor not in COMPRESSORS:
        raise ArtifactError(f"{path}: compressed with {compressor!r}, which this script cannot read")
    _, decompress = COMPRESSORS[compressor]
    try:
        container = torch.load(io.BytesIO(decompress(body)), map_location="cpu", weights_only=True)
        return decode_state(container)
    except Exception as exc:  # any decoding failure means a damaged file
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: damaged or truncated artifact ({reason}); re-export it") from exc
