"""`builder plan`: will a variant fit 16,000,000 bytes? Before any training.

Builds the model on the meta device (no memory) from the variant's declaration and the given overrides, asks the
export pipeline which quantiser each tensor gets, and turns parameters per group into estimated compressed bytes
with a table of bytes per parameter; adds the code bytes of the assembled script. `--measured FOLDER` scales the
estimate by what a run of that submission really wrote (its logs' model bytes over the estimate for the same
settings). Exit 0 when it fits, 1 when it does not (with the line saying by how much), 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.cli import UserError
from builder.variants import VariantSpec, get_variant

CAP_BYTES = 16_000_000
# compressed bytes per parameter, by quantiser, for zlib; where a run measured it, the source says so
BYTES_PER_PARAM = {
    "float32": (3.7, "assumed: fp32 mantissas barely compress"),
    "float16": (1.85, "assumed: fp16 mantissas barely compress"),
    "int8": (0.927, "measured: upstream baseline, 15,815,847 B for 17,059,912 parameters (int8 + zlib)"),
    "int6": (0.70, "assumed: 6-bit codes, entropy-coded"),
    "ternary2": (0.19, "measured: PR #1994, 11,969,746 B for 61.1 M ternary + 0.5 M int8 parameters (brotli)"),
    "ternary5": (0.20, "measured: PR #1999, 1.55 MB of its 12.04 MB artifact for 7.76 M trits (zlib)"),
}
UNLISTED = (4.0, "no table entry: 4 bytes assumed")  # a quantiser the table does not know
COMPRESSOR_FACTOR = {"zlib": 1.0, "brotli": 0.97, "lzma": 0.95}


@dataclass
class Group:
    quantiser: str
    tensors: int
    params: int
    estimate: float


@contextlib.contextmanager
def variant_environment(defaults: dict[str, str], overrides: dict[str, str]) -> Iterator[None]:
    """The templates read VARIANT_DEFAULTS and os.environ: set both for the duration, then restore them."""
    from templates import hparams

    saved_defaults = dict(hparams.VARIANT_DEFAULTS)
    saved_env = {k: os.environ.get(k) for k in overrides}
    hparams.VARIANT_DEFAULTS.clear()
    hparams.VARIANT_DEFAULTS.update(defaults)
    os.environ.update(overrides)
    try:
        yield
    finally:
        hparams.VARIANT_DEFAULTS.clear()
        hparams.VARIANT_DEFAULTS.update(saved_defaults)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plan_groups(spec: VariantSpec, defaults: dict[str, str], overrides: dict[str, str]) -> tuple[list[Group], int, str]:
    """(groups by quantiser, total parameters, compressor) of the variant's full model, built on the meta device."""
    import torch

    for module in spec.modules:
        importlib.import_module(module)
    from templates.config import model_config_from_env
    from templates.export import choose_quantisers
    from templates.hparams import Hyperparameters
    from templates.model import LanguageModel

    with variant_environment(defaults, overrides):
        try:
            cfg = model_config_from_env()
            hp = Hyperparameters()
            with torch.device("meta"):
                model = LanguageModel(cfg)
            plan = choose_quantisers(
                model, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, hp.keep_float_max_numel
            )
        except (ValueError, TypeError) as exc:
            raise UserError(f"variant {spec.name}: cannot build the model: {exc}") from exc
    factor = COMPRESSOR_FACTOR.get(hp.compressor, 1.0)
    groups: dict[str, Group] = {}
    state = model.state_dict()
    for name, (quantiser, _) in plan.items():
        n = state[name].numel()
        g = groups.setdefault(quantiser, Group(quantiser, 0, 0, 0.0))
        g.tensors += 1
        g.params += n
        g.estimate += n * BYTES_PER_PARAM.get(quantiser, UNLISTED)[0] * factor
    return sorted(groups.values(), key=lambda g: -g.estimate), sum(p.numel() for p in model.parameters()), hp.compressor


def measured_model_bytes(folder: Path) -> int:
    """The largest artifact a submission's seed logs report."""
    from validator.logs import parse_log_file

    sizes = [parse_log_file(p).bytes_model for p in sorted(folder.glob("train_seed*.log"))]
    sizes = [s for s in sizes if s]
    if not sizes:
        raise UserError(f"{folder}: no train_seed*.log with a model size line; run it first (`builder run`)")
    return max(sizes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", required=True, help="a name from `builder list`")
    parser.add_argument("--track", choices=("record", "non-record"), default="record")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="an override, as for builder run")
    parser.add_argument("--pack", action="store_true", help="count the code in its packed form")
    parser.add_argument("--measured", type=Path, help="a run submission folder whose logs refine the estimate")
    parser.add_argument(
        "--fit",
        metavar="KNOB=START:STOP:STEP",
        help="try each value of one knob (e.g. MODEL_DIM=256:1024:64) and report the largest that fits",
    )


def parse_fit(text: str) -> tuple[str, list[int]]:
    knob, sep, span = text.partition("=")
    parts = span.split(":")
    if not sep or not knob or len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise UserError(f"--fit {text!r} is not KNOB=START:STOP:STEP with whole numbers, e.g. MODEL_DIM=256:1024:64")
    start, stop, step = (int(p) for p in parts)
    if step <= 0 or stop < start:
        raise UserError(f"--fit {text!r}: STEP must be positive and STOP at least START")
    return knob, list(range(start, stop + 1, step))


def fit(spec: VariantSpec, defaults: dict[str, str], overrides: dict[str, str], code: int, text: str) -> int:
    """The largest value of one knob whose estimated model + code fits; one line per value tried."""
    knob, values = parse_fit(text)
    best = None
    print(f"{knob:>12} {'parameters':>13} {'est. total':>13} {'margin':>12}")
    for value in values:
        try:
            groups, params, _ = plan_groups(spec, defaults, {**overrides, knob: str(value)})
        except UserError as exc:
            print(f"{value:>12} cannot build: {exc}")
            continue
        total = sum(g.estimate for g in groups) + code
        print(f"{value:>12} {params:>13,} {total:>13,.0f} {CAP_BYTES - total:>12,.0f}")
        if total <= CAP_BYTES:
            best = value
    if best is None:
        print(f"no value of {knob} in {values[0]}..{values[-1]} fits")
        return 1
    print(f"largest {knob} that fits: {best} (--env {knob}={best})")
    return 0


def run(args: argparse.Namespace) -> int:
    from builder.assemble import build_files
    from builder.run import parse_env

    spec = get_variant(args.variant)
    overrides = parse_env(args.env)
    defaults = spec.defaults_as_strings(args.track)
    code = len(build_files(spec, "2000-01-01", "-", "-", args.track, args.pack)["train_gpt.py"].encode("utf-8"))
    if args.fit:
        return fit(spec, defaults, overrides, code, args.fit)
    groups, params, compressor = plan_groups(spec, defaults, overrides)
    model_bytes = sum(g.estimate for g in groups)
    note = "estimated"
    if args.measured:
        measured = measured_model_bytes(args.measured)
        scale = measured / model_bytes
        for g in groups:
            g.estimate *= scale
        model_bytes = measured
        note = f"refined by {args.measured}'s logs (x{scale:.3f})"
    print(f"{spec.name} ({args.track}): {params:,} parameters, compressor {compressor}")
    print(f"{'quantiser':<10} {'tensors':>7} {'parameters':>13} {'bits/param':>10} {'est. bytes':>13}  basis")
    for g in groups:
        bits = 8 * g.estimate / max(g.params, 1)
        basis = BYTES_PER_PARAM.get(g.quantiser, UNLISTED)[1]
        print(f"{g.quantiser:<10} {g.tensors:>7} {g.params:>13,} {bits:>10.2f} {g.estimate:>13,.0f}  {basis}")
    total = model_bytes + code
    margin = CAP_BYTES - total
    print(f"model {model_bytes:,.0f} ({note}) + code {code:,} = {total:,.0f} bytes; margin {margin:,.0f}")
    target = int(float({**defaults, **overrides}.get("PRUNE_TARGET_BYTES", 0) or 0))
    if margin < 0 and 0 < target <= CAP_BYTES:
        cut = 1 - (target - code) / model_bytes
        print(
            f"the export prunes +-1 codes until model + code <= {target:,} bytes (PRUNE_TARGET_BYTES): about "
            f"{100 * cut:.0f}% fewer bytes than this estimate; fits if the pruning reaches it (check a run's log)"
        )
        return 0
    if margin < 0:
        print(f"does not fit: {-margin:,.0f} bytes over the 16,000,000-byte cap; narrow the model or quantise harder")
        return 1
    return 0
