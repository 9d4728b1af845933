"""bench/scan_ncu.py without a GPU: Nsight Compute's CSV (one row per launch and metric) becomes one row per launch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HEADER = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
    '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
)


def _tool():
    path = Path(__file__).resolve().parents[2] / "bench" / "scan_ncu.py"
    spec = importlib.util.spec_from_file_location("bench_scan_ncu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(launch: int, kernel: str, metric: str, value: str, unit: str = "") -> str:
    cells = [launch, 1, "python3", "h", kernel, 1, 7, "(128, 1, 1)", "(64, 16, 1)", 0, "9.0", "", metric, unit, value]
    return ",".join(f'"{c}"' for c in cells)


def test_summary_has_one_row_per_launch_with_every_metric():
    tool = _tool()
    lines = ["==PROF== Connected to process 1", HEADER]
    for launch, kernel in ((0, "_sel_fwd_kernel"), (1, "_sel_bwd_kernel")):
        for i, metric in enumerate(tool.METRICS):
            lines.append(row(launch, kernel, metric, f"{1000 + i + launch},5" if i == 0 else str(10 * i + launch)))
    table = tool.summarise("\n".join(lines) + "\n")
    body = table.splitlines()[2:]
    assert len(body) == 2 and "`_sel_fwd_kernel`" in body[0] and "`_sel_bwd_kernel`" in body[1]
    assert "| 10005 |" in body[0] and body[1].count("|") == len(tool.METRICS) + 2
    assert "-" not in body[0].replace("`_sel_fwd_kernel`", "").replace("|", "").split()


def test_metric_list_is_what_ncu_takes(capsys):
    tool = _tool()
    assert tool.main(["--metrics"]) == 0
    assert capsys.readouterr().out.strip() == ",".join(tool.METRICS)


def test_durations_are_microseconds_whatever_unit_ncu_chose():
    # ncu writes the duration in the unit it picks per launch (ns for short kernels); the column is microseconds
    tool = _tool()
    lines = [HEADER, row(0, "_ssd_bwd_kernel", "gpu__time_duration.sum", "604,768", "ns")]
    lines += [row(1, "_sel_bwd_kernel", "gpu__time_duration.sum", "2.76", "ms")]
    lines += [row(2, "_fo_scan_kernel", "gpu__time_duration.sum", "202.1", "us")]
    body = tool.summarise("\n".join(lines) + "\n").splitlines()[2:]
    assert [line.split("|")[2].strip() for line in body] == ["604.8", "2760.0", "202.1"]
