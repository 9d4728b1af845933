"""How the scan benchmarks time one case: the same row for bench/scan.py and bench/scan_recurrence.py.

A case is a dict: "name", "fwd" and "fwd_bwd" (closures, either may be absent), optional "slow" (a sequential
reference, timed once by the wall clock), "scale" (a factor for references run on a slice), "bytes_min" and
"bytes_min_fwd_bwd" (the fewest bytes the op must move, for GB/s), "ref_for", "anchor".

Two timings per closure:
- eager: the median over repeated calls with CUDA events around each call and the L2 cache flushed before it
  (triton's do_bench). What a caller running the op eagerly pays, host time included: when the host issues the
  launches and autograd's work more slowly than the GPU runs them, the events see the host.
- graphed (on request): the same calls captured into a CUDA graph and replayed (triton's do_bench_cudagraph), so
  only device time remains, back to back without the flush. What a model pays under CUDA graphs or while its host
  runs ahead of the GPU. An op that cannot be captured gets None and a printed reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

REP_MS = int(os.environ.get("BENCH_REP_MS", "200"))


def eager_ms(fn: Callable[[], object], rep_ms: int = REP_MS) -> float:
    """Median ms of fn per call (CUDA events around each call, L2 flushed, after warm-up)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def graphed_ms(fn: Callable[[], object], rep_ms: int = REP_MS) -> float:
    """Median ms of fn per call, replayed from a CUDA graph of back-to-back calls (device time only)."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def wall_ms(fn: Callable[[], object]) -> float:
    """One call by the wall clock after one warm-up call: for the slow sequential references."""
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(
    case: dict,
    graphs: bool = False,
    eager: Callable[[Callable], float] = eager_ms,
    graphed: Callable[[Callable], float] = graphed_ms,
    wall: Callable[[Callable], float] = wall_ms,
) -> dict:
    """One table row: fwd_ms and fwd_bwd_ms (eager), with graphs also fwd_graph_ms and fwd_bwd_graph_ms, and GB/s.

    A closure that fails leaves None and a printed line: one failing case must not hide the others."""
    row = {"name": case["name"], "anchor": bool(case.get("anchor")), "ref_for": case.get("ref_for")}
    scale = case.get("scale", 1)
    for key in ("fwd", "fwd_bwd"):
        fn = case.get(key)
        row[key + "_ms"] = None
        if fn is None:
            continue
        try:
            row[key + "_ms"] = (wall(fn) if case.get("slow") else eager(fn)) * scale
        except Exception as exc:
            print(f"{case['name']} {key}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if graphs and not case.get("slow"):
            row[key + "_graph_ms"] = None
            try:
                row[key + "_graph_ms"] = graphed(fn) * scale
            except Exception as exc:
                print(f"{case['name']} {key}: no CUDA graph ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
    for key, ms_key in (("bytes_min", "fwd_ms"), ("bytes_min_fwd_bwd", "fwd_bwd_ms")):
        if case.get(key) and row[ms_key]:
            row[ms_key.replace("_ms", "_GBps")] = case[key] / row[ms_key] / 1e6
    return row


def measured_line(row: dict, graphs: bool = False) -> str:
    """The progress line both benchmarks print per case (runners grep for its "measured" prefix)."""
    graphed = f", graphed {row.get('fwd_graph_ms')} / {row.get('fwd_bwd_graph_ms')}" if graphs else ""
    return f"measured {row['name']}: {row['fwd_ms']} / {row['fwd_bwd_ms']} ms{graphed}"
