"""Significance of a record claim against the previous frontier row, two ways.

README rule: beat the previous record by >= 0.005 nats (converted to bpb with the submission's own tokens per byte)
at p < 0.01. Maintainers' practice (PR #1902 onward): one-sided Welch t-test on per-seed val_bpb, no margin,
p < 0.25 against the previous frontier row. When the previous row has a single figure, a one-sample t-test against
it is used (as early records did). The previous row comes from an option or the bundled frontier table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from validator.numbers import fmean

NATS_MARGIN = 0.005
README_P = 0.01
PRACTICE_P = 0.25


@dataclass
class Significance:
    previous: str  # the row compared with
    n_new: int
    n_previous: int
    mean_new: float
    mean_previous: float
    delta_bpb: float  # previous - new (positive: better)
    margin_bpb: float  # 0.005 nats in bpb
    p_practice: float | None  # one-sided Welch (or one-sample), no margin
    p_readme: float | None  # one-sided, against previous - margin
    test: str

    @property
    def passes_practice(self) -> bool:
        return self.p_practice is not None and self.p_practice < PRACTICE_P

    @property
    def passes_readme(self) -> bool:
        return self.p_readme is not None and self.p_readme < README_P and self.delta_bpb >= self.margin_bpb

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(passes_practice=self.passes_practice, passes_readme=self.passes_readme)
        return d


def load_frontier(path: Path | None = None) -> list[dict]:
    """Rows of the frontier table, oldest first. Raises ValueError naming the file when it is malformed."""
    if path is None:
        text = resources.files("validator.data").joinpath("frontier.json").read_text(encoding="utf-8")
        name = "validator/data/frontier.json"
    else:
        text, name = Path(path).read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
        rows = data["rows"] if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "date" in r for r in rows):
            raise ValueError("expected a list of rows, each with at least 'date'")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{name}: not a frontier table ({exc}); see validator/data/frontier.json for the format"
        ) from exc
    return sorted(rows, key=lambda r: (str(r["date"]), r.get("order") or 0))


def row_label(row: dict) -> str:
    return f"PR #{row['pr']}" if row.get("pr") else str(row.get("folder", "?"))


def row_bpb(row: dict) -> list[float]:
    seeds = [float(x) for x in row.get("seed_bpb") or [] if isinstance(x, (int, float))]
    if seeds:
        return seeds
    return [float(row["val_bpb"])] if isinstance(row.get("val_bpb"), (int, float)) else []


def choose_previous(rows: list[dict], date: str | None, folder: str, wanted: str | None = None) -> dict | None:
    """The row named by `wanted` (PR number or folder), else the best row dated strictly before `date`."""
    if wanted:
        key = wanted.lstrip("#").removeprefix("PR").strip().lstrip("#")
        for row in rows:
            if str(row.get("pr")) == key or row.get("folder") == wanted:
                return row
        raise ValueError(
            f"--previous {wanted!r} is not in the frontier table; give a PR number or a folder listed there"
        )
    if not date:
        return None
    earlier = [r for r in rows if str(r["date"]) < date and r.get("folder") != folder and row_bpb(r)]
    return min(earlier, key=lambda r: fmean(row_bpb(r))) if earlier else None


def margin_bpb(val_loss: float | None = None, val_bpb: float | None = None, tokenizer: str | None = None) -> float:
    """0.005 nats/token in bpb: from the submission's own loss/bpb ratio, else from the tokenizer's canonical ratio."""
    if val_loss and val_bpb and val_loss > 0 and math.isfinite(val_bpb / val_loss):
        return NATS_MARGIN * val_bpb / val_loss
    from validator.checks.fingerprints import CANONICAL

    canon = CANONICAL.get(tokenizer or "sp1024", CANONICAL["sp1024"])
    return NATS_MARGIN / math.log(2) * canon["val_tokens"][0] / canon["val_bytes"]


def one_sided_p(new: list[float], previous: list[float], shift: float = 0.0) -> tuple[float | None, str]:
    """p for H1: mean(new) < mean(previous) - shift. Welch when both have 2+ values, one-sample when previous has 1."""
    if len(new) < 2:
        return None, "none (fewer than 2 seeds)"
    import numpy as np
    from scipy.special import stdtr  # Student's t CDF; scipy.special loads in a third of scipy.stats' time

    def mean_var(xs: list[float]) -> tuple[float, float, int]:
        m = sum(xs) / len(xs)
        # products, not ** 2: a float product overflows to inf (p is then None) where ** raises OverflowError
        return m, sum((x - m) * (x - m) for x in xs) / (len(xs) - 1), len(xs)

    m1, v1, n1 = mean_var(new)
    with np.errstate(divide="ignore", invalid="ignore"):
        if len(previous) >= 2:
            m2, v2, n2 = mean_var([p - shift for p in previous])
            a, b = v1 / n1, v2 / n2
            se2 = a + b
            df = se2 * se2 / (a * a / (n1 - 1) + b * b / (n2 - 1)) if se2 > 0 else float("nan")
            t = np.float64(m1 - m2) / np.sqrt(np.float64(se2))
            test = "one-sided Welch t-test"
        elif len(previous) == 1:
            df = n1 - 1
            t = np.float64(m1 - (previous[0] - shift)) / np.sqrt(np.float64(v1 / n1))
            test = "one-sided one-sample t-test"
        else:
            return None, "none (previous row has no figures)"
        p = float(stdtr(df, t))
    return (p if math.isfinite(p) else None), test


def assess(new: list[float], previous: dict, margin: float) -> Significance:
    prev = row_bpb(previous)
    p_practice, test = one_sided_p(new, prev)
    p_readme, _ = one_sided_p(new, prev, shift=margin)
    mean_new, mean_prev = fmean(new), fmean(prev)
    return Significance(
        previous=row_label(previous),
        n_new=len(new),
        n_previous=len(prev),
        mean_new=mean_new,
        mean_previous=mean_prev,
        delta_bpb=mean_prev - mean_new,
        margin_bpb=margin,
        p_practice=p_practice,
        p_readme=p_readme,
        test=test,
    )
