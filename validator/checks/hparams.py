"""The hyperparameter echo is identical across seed logs (mixed configurations are not one submission)."""

from __future__ import annotations

from validator.checks.context import Context, SeedRun
from validator.findings import Finding, error, note, warning

MAX_LISTED = 8


def _listed(items: list[str]) -> str:
    return "; ".join(i[:80] for i in items[:MAX_LISTED]) + (" ..." if len(items) > MAX_LISTED else "")


def _comparable(run: SeedRun, blocks_only: bool) -> dict[str, str]:
    """The settings to compare: the Hyperparameters block when every log has one, paths by their last component
    (per-run output and data roots differ by design; the file or dataset named must not)."""
    cfg = run.log.config
    if blocks_only:
        cfg = {k: v for k, v in cfg.items() if k in run.log.hparams}
    return {k: v.rstrip("/").rsplit("/", 1)[-1] if "/" in v else v for k, v in cfg.items()}


def _same_data(a: SeedRun, b: SeedRun) -> bool:
    fa = (a.log.val_tokens, a.log.train_shards)
    return None not in fa and fa == (b.log.val_tokens, b.log.train_shards)


def check(ctx: Context) -> list[Finding]:
    candidates = list(ctx.seed_runs().values()) or ctx.scored_runs
    runs = [r for r in candidates if r.log.config]
    silent = [r.rel for r in candidates if not r.log.config]
    out: list[Finding] = []
    if silent and runs:
        out.append(note("HPARAMS_NOT_ECHOED", f"no hyperparameter echo in {', '.join(silent)}"))
    if len(runs) < 2:
        return out
    blocks_only = all(r.log.hparams for r in runs)
    ref = runs[0]
    for other in runs[1:]:
        a, b = (_comparable(r, blocks_only) for r in (ref, other))
        changed = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
        paths = [k for k in changed if "/" in ref.log.config.get(k, "") or "/" in other.log.config.get(k, "")]
        if paths and _same_data(ref, other):
            # where each person keeps the data is not a setting; the fingerprints say it is the same data
            changed = [k for k in changed if k not in paths]
            listed = _listed([f"{k}: {ref.log.config[k]} vs {other.log.config[k]}" for k in paths])
            out.append(
                note(
                    "HPARAMS_PATHS_DIFFER",
                    f"{other.rel} and {ref.rel} read data from other paths ({listed}); their data fingerprints "
                    "(val_tokens, train_shards) agree",
                    other.rel,
                )
            )
        one_sided = sorted(set(a) ^ set(b))
        if changed:
            listed = _listed([f"{k}: {a[k]} vs {b[k]}" for k in changed])
            sev = error if ctx.is_record else warning
            out.append(sev("HPARAMS_DIFFER", f"{other.rel} ran other settings than {ref.rel}: {listed}", other.rel))
        if one_sided:
            listed = _listed([f"{k}: {a.get(k, '(absent)')} vs {b.get(k, '(absent)')}" for k in one_sided])
            out.append(
                warning(
                    "HPARAMS_KEYS_DIFFER",
                    f"{other.rel} and {ref.rel} echo different settings (different script versions?): {listed}",
                    other.rel,
                )
            )
    return out
