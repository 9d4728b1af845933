"""Reports of a check: JSON (machine), Markdown (a pull-request comment: verdict, findings by severity, figures),
terminal output (rich or plain), and a loss-curve PNG per seed.

`Report.sections` and `Report.extra` are open: other parts of the validator (the sandboxed re-run) append their own
sections, which render after the static figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from validator.checks import INTERNAL_ERROR
from validator.checks.context import Context
from validator.findings import Finding, Severity

SEVERITY_ORDER = (Severity.ERROR, Severity.WARNING, Severity.NOTE)
VERDICT_EXIT = {"pass": 0, "fail": 1, "could not run": 2}


@dataclass
class Section:
    """A block of the report added by any part of the validator: a title, Markdown, and data for the JSON."""

    title: str
    markdown: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Report:
    target: str
    findings: list[Finding] = field(default_factory=list)
    seeds: list[dict] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def verdict(self) -> str:
        if any(f.code == INTERNAL_ERROR for f in self.findings):
            return "could not run"
        return "fail" if self.count(Severity.ERROR) else "pass"

    @property
    def exit_code(self) -> int:
        return VERDICT_EXIT[self.verdict]

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "counts": {s.value: self.count(s) for s in SEVERITY_ORDER},
            "findings": [f.to_dict() for f in sorted(self.findings, key=_finding_key)],
            "seeds": self.seeds,
            "figures": self.figures,
            "sections": [{"title": s.title, "markdown": s.markdown, "data": s.data} for s in self.sections],
            "plots": self.plots,
            "extra": self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default, allow_nan=False)

    def headline(self) -> str:
        mark = {"pass": "PASS", "fail": "FAIL", "could not run": "COULD NOT RUN"}[self.verdict]
        counts = ", ".join(f"{self.count(s)} {s.value}{'s' if self.count(s) != 1 else ''}" for s in SEVERITY_ORDER)
        return f"{mark}: {self.target} ({counts})"

    def to_markdown(self, level: int = 2) -> str:
        h = "#" * level
        icon = {"pass": "✅", "fail": "❌", "could not run": "⚠️"}[self.verdict]
        lines = [f"{h} {icon} {self.headline()}", ""]
        for sev in SEVERITY_ORDER:
            group = sorted((f for f in self.findings if f.severity == sev), key=_finding_key)
            if not group:
                continue
            title = {"error": "Errors", "warning": "Warnings", "note": "Notes"}[sev.value]
            body = [f"- `{f.code}` {_md(f.message)}{_where(f)}" for f in group]
            if sev == Severity.NOTE:
                lines += [f"<details><summary>{title} ({len(group)})</summary>", "", *body, "", "</details>", ""]
            else:
                lines += [f"{h}# {title} ({len(group)})", "", *body, ""]
        lines += self._figures_markdown(h)
        for section in self.sections:
            lines += [f"{h}# {section.title}", "", section.markdown, ""]
        return "\n".join(lines).rstrip() + "\n"

    def _figures_markdown(self, h: str) -> list[str]:
        lines: list[str] = []
        if self.seeds:
            cols = (
                "seed",
                "log",
                "tag",
                "val_bpb",
                "val_loss",
                "train_s",
                "hessian_s",
                "eval_s",
                "model_bytes",
                "total_bytes",
            )
            lines += [f"{h}# Figures", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for row in self.seeds:
                lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
            lines.append("")
        sig = self.figures.get("significance")
        if sig:
            lines.append(
                f"Significance vs {sig['previous']}: delta {_num(sig['delta_bpb'], '+.5f')} bpb "
                f"over {sig['n_new']} seeds; "
                f"{sig['test']} p = {_cell(sig['p_practice'])} (practice: < 0.25 → "
                f"{'yes' if sig['passes_practice'] else 'no'}); "
                f"README rule (≥ {_num(sig['margin_bpb'], '.5f')} bpb at p < 0.01) "
                f"p = {_cell(sig['p_readme'])} → {'yes' if sig['passes_readme'] else 'no'}."
            )
            lines.append("")
        size = self.figures.get("size")
        if size:
            lines += [
                "| seed | model | code raw | code wrapped | code + modules | total raw | total wrapped |",
                "|---|---|---|---|---|---|---|",
            ]
            for label, row in size.items():
                code, totals = row["code"], row["totals"]
                lines.append(
                    f"| {label} | {_cell(row['model'])} | {_cell(code.get('raw'))} | {_cell(code.get('wrapped'))} | "
                    f"{_cell(code.get('with_modules'))} | {_cell(totals.get('raw'))} | {_cell(totals.get('wrapped'))} |"
                )
            lines.append("")
        return lines


def _finding_key(f: Finding) -> tuple:
    return (SEVERITY_ORDER.index(f.severity), f.code, f.file or "", f.line or 0)


def _where(f: Finding) -> str:
    if not f.file:
        return ""
    return f" (`{f.file}{':' + str(f.line) if f.line else ''}`)"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _num(v: float | None, spec: str) -> str:
    """A figure in `spec`; "—" where the report's JSON cleaning turned a non-finite value into None."""
    return "—" if v is None else format(v, spec)


def _cell(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.8f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return _md(str(v))


def _json_default(o: object) -> object:
    if isinstance(o, float):
        return None
    return str(o)


def _clean(value: object) -> object:
    """Replace non-finite floats (not valid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def seed_rows(ctx: Context) -> list[dict]:
    rows = []
    for run in ctx.runs:
        log, s = run.log, run.log.score
        rows.append(
            {
                "seed": run.seed,
                "log": run.rel,
                "tag": s.tag if s else None,
                "val_bpb": s.val_bpb if s else None,
                "val_loss": s.val_loss if s else None,
                "train_s": log.train_time_ms / 1000 if log.train_time_ms is not None else None,
                "hessian_s": log.hessian_s,
                "eval_s": log.eval_time_ms / 1000 if log.eval_time_ms is not None else None,
                "model_bytes": log.bytes_model,
                "code_bytes": log.bytes_code,
                "total_bytes": log.bytes_total,
                "steps": log.stop_step or (log.steps[-1][0] if log.steps else None),
                "train_shards": log.train_shards,
                "val_tokens": log.val_tokens,
            }
        )
    return _clean(rows)  # type: ignore[return-value]


def build_report(ctx: Context, findings: list[Finding], target: str | None = None) -> Report:
    return Report(
        target=target or ctx.folder.name,
        findings=findings,
        seeds=seed_rows(ctx),
        figures=_clean(ctx.figures),  # type: ignore[arg-type]
    )


def write_loss_plots(ctx: Context, outdir: Path) -> list[Path]:
    """One PNG per seed log that has step lines: train loss, and val bpb on a second axis where logged."""
    runs = [r for r in ctx.runs if len(r.log.steps) >= 2]
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        steps = [s for s, loss, _ in run.log.steps if math.isfinite(loss)]
        losses = [loss for _, loss, _ in run.log.steps if math.isfinite(loss)]
        ax.plot(steps, losses, lw=1.2, label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)")
        if losses:
            ax.set_ylim(min(losses) * 0.95, min(max(losses), min(losses) * 3))
        if run.log.val_points:
            ax2 = ax.twinx()
            ax2.plot([p[0] for p in run.log.val_points], [p[2] for p in run.log.val_points], "o-", color="C1", ms=3)
            ax2.set_ylabel("val bpb", color="C1")
        score = run.log.score
        title = f"{ctx.folder.name[:60]} — seed {run.seed}"
        if score:
            title += f" — {score.tag} {score.val_bpb:.5f}"
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"loss_seed{run.seed}.png" if run.seed is not None else f"loss_{Path(run.rel).stem}.png"
        path = outdir / name
        tmp = path.with_suffix(".png.tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def print_terminal(report: Report, plain: bool = False) -> None:
    """Findings by severity, then the headline; rich colours when available and wanted."""
    if not plain:
        try:
            from rich.console import Console
            from rich.markup import escape
            from rich.table import Table
        except ImportError:
            plain = True
    if plain:
        for f in sorted(report.findings, key=_finding_key):
            print(f"{f.severity.value:7} {f.code:28} {f.message}{_where(f).replace('`', '')}")
        print(report.headline())
        return
    console = Console(highlight=False)
    table = Table(show_header=True, header_style="bold", expand=False)
    for col in ("severity", "code", "message", "where"):
        table.add_column(col, overflow="fold")
    style = {"error": "red", "warning": "yellow", "note": "dim"}
    for f in sorted(report.findings, key=_finding_key):
        table.add_row(
            f"[{style[f.severity.value]}]{f.severity.value}[/]",
            escape(f.code),
            escape(f.message),
            escape(_where(f).strip(" ()`")),
        )
    console.print(table)
    colour = {"pass": "green", "fail": "red", "could not run": "yellow"}[report.verdict]
    console.print(f"[bold {colour}]{escape(report.headline())}[/]")
