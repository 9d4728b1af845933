#!/usr/bin/env python3
"""Where one training step of a variant spends its GPU time: the assembled script's own model and optimisers,
run at the record recipe's micro-batch under the PyTorch profiler, its kernels summed by kind.

  python bench/profile_step.py --variants kill-mamba2,ttsm [--steps 3] [--env KEY=VALUE ...]

Per variant: the step time outside the profiler (CUDA events, after the compile warm-up), the kernels' summed time
against it (where they sum to much less than the step, the step waits on the host: launches, Python, syncs), and
the time by kind: scan-core kernels, matrix products, attention, other Triton (Inductor's fused elementwise and
norms), NCCL, the rest; then the top kernels by total time. Results go to $OUT (or --out) as profile.md and
profile.json. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.variants import record_accum, write_script  # noqa: E402
from builder.variants import get_variant  # noqa: E402

# Kernel names -> kind; the first pattern that matches wins. Our scan kernels are known by name (scan_kernels()).
KINDS = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("matrix products", re.compile(r"gemm|cutlass|nvjet|xmma|wgmma|cublas|matmul|_mm_", re.I)),
    ("nccl", re.compile(r"nccl", re.I)),
    ("other triton", re.compile(r"^triton_", re.I)),
]


def scan_kernels() -> frozenset[str]:
    """The names of the scan core's Triton kernels: every function under @triton.jit in templates/scan."""
    names = set()
    for path in (REPO / "templates" / "scan").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return frozenset(names)


def kind_of(kernel: str, scan: frozenset[str] = frozenset()) -> str:
    if kernel in scan:
        return "scan core"
    for kind, pattern in KINDS:
        if pattern.search(kernel):
            return kind
    return "rest"


def load_script(name: str, folder: Path, env: dict[str, str]):
    """Assemble the variant, set its record environment and import the script as a module (its main not run)."""
    spec = get_variant(name)
    path = write_script(spec, folder)
    os.environ.update(spec.defaults_as_strings("record"))
    os.environ.update(env)
    module_spec = importlib.util.spec_from_file_location(f"train_gpt_{name.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def train_step(model, base, optimizers: list, x, y, accum: int, graph_grads: bool) -> None:
    """One optimiser step of accum micro-steps, as the script's own loop takes it. graph_grads (a compile mode with
    CUDA graphs): the first micro-step's .grad is the backward graph's output, which the next replay overwrites, so
    it is cloned before the next micro-step adds to it."""
    import torch

    for micro in range(accum):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = model(x, y)
        (loss / accum).backward()
        if micro == 0 and graph_grads and accum > 1:
            for param in base.parameters():
                param.grad = None if param.grad is None else param.grad.clone()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


def profile_variant(name: str, args: argparse.Namespace) -> dict:
    import torch

    env = dict(kv.partition("=")[::2] for kv in args.env)
    script = load_script(name, args.out / name, env)
    hp, cfg = script.Hyperparameters(), script.model_config_from_env()
    device = torch.device("cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    base = script.LanguageModel(cfg).to(device)
    model = base  # compiled as the script compiles it (COMPILE, COMPILE_SCOPE, COMPILE_MODE)
    if hp.compile and hp.compile_scope == "blocks":
        for block in base.blocks:
            block.compile(dynamic=False, fullgraph=hp.compile_fullgraph, mode=hp.compile_mode)
    elif hp.compile:
        model = torch.compile(base, dynamic=False, fullgraph=hp.compile_fullgraph, mode=hp.compile_mode)
    groups = script.split_parameters(base, hp.control_patterns)
    muon = script.Muon(
        groups["muon"], hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_weight_decay, hp.muon_row_norm
    )
    if hp.compile:
        muon.orthogonalize = torch.compile(muon.orthogonalize)
    rest = [p for key in ("embed", "scalar", "head") for p in groups[key]]
    optimizers = [muon] + ([torch.optim.Adam(rest, lr=hp.scalar_lr, fused=True)] if rest else [])
    accum = record_accum(hp.grad_accum_steps, 1) or 8  # one GPU doing the record's whole step at its micro-batch
    micro_tokens = hp.train_batch_tokens // accum
    rows, seq = micro_tokens // hp.train_seq_len, hp.train_seq_len
    x = torch.randint(0, cfg.vocab_size, (rows, seq), device=device)
    y = torch.randint(0, cfg.vocab_size, (rows, seq), device=device)

    graph_grads = hp.compile and hp.compile_mode in ("reduce-overhead", "max-autotune")

    def step() -> None:
        train_step(model, base, optimizers, x, y, accum, graph_grads)

    started = time.perf_counter()
    for _ in range(3):  # compile and autotune
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    step_ms = begin.elapsed_time(end) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = kernels.get(event.key, 0.0) + device_us / 1000 / args.steps
    by_kind: dict[str, float] = {}
    scan = scan_kernels()
    for kernel, ms in kernels.items():
        by_kind[kind_of(kernel, scan)] = by_kind.get(kind_of(kernel, scan), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]
    return {
        "variant": name,
        "device": torch.cuda.get_device_name(),
        "tokens_per_step": micro_tokens * accum,
        "micro_batch": [rows, seq],
        "accum": accum,
        "warmup_s": round(warm_s, 1),
        "step_ms": round(step_ms, 2),
        "tokens_per_s": round(micro_tokens * accum / step_ms * 1000),
        "kernel_ms": round(sum(kernels.values()), 2),
        "peak_alloc_mib": torch.cuda.max_memory_allocated() // 2**20,
        "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [[k, round(v, 3)] for k, v in top],
    }


def markdown(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if "error" in r:
            lines += [f"### {r['variant']}: failed", "", f"`{r['error']}`", ""]
            continue
        share = 100 * r["kernel_ms"] / r["step_ms"]
        lines += [
            f"### {r['variant']} ({r['device']}; {r['tokens_per_step']:,} tokens per step as {r['accum']} x "
            f"{r['micro_batch'][0]} x {r['micro_batch'][1]})",
            "",
            f"step {r['step_ms']:.1f} ms ({r['tokens_per_s']:,} tokens/s), kernels {r['kernel_ms']:.1f} ms "
            f"({share:.0f}% of the step), peak {r['peak_alloc_mib']:,} MiB, compile and 3 warm-up steps "
            f"{r['warmup_s']:.0f} s",
            "",
            "| kind | ms per step | share of kernel time |",
            "|---|---:|---:|",
        ]
        for kind, ms in r["by_kind_ms"].items():
            lines.append(f"| {kind} | {ms:.2f} | {100 * ms / r['kernel_ms']:.0f}% |")
        lines += ["", "| top kernel | ms per step |", "|---|---:|"]
        lines += [f"| `{k[:90]}` | {ms:.3f} |" for k, ms in r["top_kernels_ms"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="comma-separated names")
    parser.add_argument("--steps", type=int, default=3, help="steps timed, and steps profiled")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="an override for every variant")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_profile_out")))
    parser.add_argument("--timeout", type=float, default=300.0, help="per variant, seconds")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:  # the child: one variant in a fresh process (its own environment, compile caches, memory)
        print("PROFILE " + json.dumps(profile_variant(args.one, args)), flush=True)
        return 0
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        child = [sys.executable, __file__, "--one", name, "--variants", name, "--steps", str(args.steps)]
        child += ["--top", str(args.top), "--out", str(args.out)] + [a for kv in args.env for a in ("--env", kv)]
        done = subprocess.run(child, capture_output=True, text=True, timeout=args.timeout)
        found = [line[8:] for line in done.stdout.splitlines() if line.startswith("PROFILE ")]
        if found:
            rows.append(json.loads(found[-1]))
        else:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"variant": name, "error": f"exit {done.returncode}: {tail[0][:300]}"})
            (args.out / name / "stderr.txt").write_text(done.stderr)
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "profile.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "profile.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
