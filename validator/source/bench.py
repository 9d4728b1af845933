"""Time the static source audit and the code-bytes figures over many records folders (a CPU benchmark).

`python -m validator.source.bench DIR`: every folder under DIR (two levels deep, as in upstream `records/<track>/`)
that holds a training script is timed once with `audit_source` and once with `code_bytes`; one summary line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from validator.source.audit import audit_source
from validator.source.codebytes import code_bytes
from validator.source.reading import UnsafePath


def training_script(folder: Path) -> Path | None:
    scripts = sorted(folder.glob("train_gpt*.py")) or sorted(p for p in folder.glob("*.py") if "train" in p.name)
    return scripts[0] if scripts else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validator.source.bench", description=__doc__)
    parser.add_argument("root", type=Path, help="a records/ folder (or any folder of submission folders)")
    args = parser.parse_args(argv)
    folders = sorted({p.parent for p in args.root.glob("*/*.py")} | {p.parent for p in args.root.glob("*/*/*.py")})
    rows = []
    started = time.perf_counter()
    for folder in folders:
        script = training_script(folder)
        if script is None:
            continue
        t0 = time.perf_counter()
        audit_source(folder, script)
        t1 = time.perf_counter()
        try:
            code_bytes(folder, script)
        except UnsafePath:
            pass
        rows.append((t1 - t0, time.perf_counter() - t1))
    if not rows:
        print(f"no training scripts under {args.root}", file=sys.stderr)
        return 2
    total = time.perf_counter() - started
    per_folder = [a + c for a, c in rows]
    print(
        f"scripts={len(rows)} total={total:.1f}s audit_sum={sum(a for a, _ in rows):.1f}s "
        f"codebytes_sum={sum(c for _, c in rows):.1f}s slowest={max(per_folder):.2f}s "
        f"median={statistics.median(per_folder):.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
