#!/usr/bin/env python3
"""What limits each scan kernel, from Nsight Compute: one forward+backward of each of our ops (the table's shapes and
the variants' shapes), profiled between cudaProfilerStart/Stop after a warm-up call has compiled and tuned them.

  ncu --profile-from-start off --csv --metrics METRICS python3 bench/scan_ncu.py > ncu.csv
  python3 bench/scan_ncu.py --summarise ncu.csv          the per-kernel table (Markdown)

METRICS is printed by `python3 bench/scan_ncu.py --metrics`: duration, compute (SM) and memory throughput as a
share of peak, achieved occupancy, registers per thread and the occupancy limit from registers. A kernel near the
memory peak is bandwidth-bound; one low on both with low occupancy is latency-bound (too few warps to hide it).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = {
    "gpu__time_duration.sum": "us",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "memory %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
    "launch__registers_per_thread": "registers",
    "launch__occupancy_limit_registers": "blocks/SM (registers)",
    "launch__grid_size": "programs",
}

TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}  # ncu's duration units


def our_cases(device) -> list[dict]:
    """Our ops only (no references, no anchors): bench/scan.py's table rows and its variant-shape rows."""
    from bench import scan

    cases = scan.our_cases(device, compiled=False) + scan.recurrence_rows(device, {}, refs=False)
    cases += scan.variant_cases(device)
    return [c for c in cases if c["name"].startswith("ours") and not c.get("anchor")]


def profile(device) -> None:
    import torch

    cases = our_cases(device)
    for case in cases:  # compile and tune outside the profiled range
        case["fwd_bwd"]()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for case in cases:
        torch.cuda.nvtx.range_push(case["name"])
        case["fwd_bwd"]()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled: " + "; ".join(c["name"] for c in cases), file=sys.stderr)


def summarise(text: str) -> str:
    """ncu's --csv rows (one per kernel launch and metric) as one Markdown row per kernel launch."""
    start = text.find('"ID"')
    rows = list(csv.DictReader(io.StringIO(text[start:]))) if start >= 0 else []
    launches: dict[str, dict] = {}
    for row in rows:
        key = row["ID"]
        entry = launches.setdefault(key, {"kernel": row.get("Kernel Name", "?")})
        name = row.get("Metric Name")
        if name in METRICS:
            value = row.get("Metric Value", "").replace(",", "")
            scale = TO_US.get(row.get("Metric Unit", "")) if name == "gpu__time_duration.sum" else None
            entry[METRICS[name]] = f"{float(value) * scale:.1f}" if scale and value else value
    header = ["kernel"] + list(METRICS.values())
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for entry in launches.values():
        lines.append("| " + " | ".join([f"`{entry['kernel'][:60]}`"] + [entry.get(h, "-") for h in header[1:]]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", action="store_true", help="print the metric list for ncu --metrics")
    parser.add_argument("--summarise", type=Path, help="an ncu --csv output to turn into a table")
    args = parser.parse_args(argv)
    if args.metrics:
        print(",".join(METRICS))
        return 0
    if args.summarise:
        print(summarise(args.summarise.read_text(errors="replace")))
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/scan_ncu.py: needs a CUDA GPU (run it under ncu on the GPU machine)")
    profile(torch.device("cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
