"""Time limits: training (every step that reads training data, GPTQ calibration included) and the scored eval.

The stop check runs after the step that crosses the cap, so an overshoot of at most one step is a note (early
records, 600,028-600,137 ms, were accepted); beyond that, or training data read after the cap (GPTQ Hessians,
ruling in issue #677), is an error in the record track and a note elsewhere. Overrides of the budget
(MAX_WALLCLOCK_SECONDS above 600, FORCE_STOP_STEP) are flagged from the hyperparameter echo.
"""

from __future__ import annotations

from validator.checks.context import Context, SeedRun
from validator.findings import Finding, error, note, warning

TRAIN_LIMIT_MS = 600_000.0  # = validator.schema's (imported lazily elsewhere: pydantic is slow to import)
EVAL_LIMIT_MS = 600_000.0

OFF_VALUES = {"", "0", "none", "false", "-1", "null"}
# Upstream accepted stop-check overshoots up to 600,137 ms; #1908's 601,153 ms (FORCE_STOP_STEP) was called out.
OVERSHOOT_TOLERANCE_MS = 300.0


def _step_avg_ms(run: SeedRun) -> float | None:
    log = run.log
    if log.train_time_ms and log.stop_step:
        return log.train_time_ms / log.stop_step
    if len(log.steps) >= 2:
        (s0, _, t0), (s1, _, t1) = log.steps[-2], log.steps[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None
    return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    record = ctx.is_record
    over = error if record else note
    for run in ctx.scored_runs:
        out.extend(_train(run, record, over))
        out.extend(_eval(run, record))
    return out


def _train(run: SeedRun, record: bool, over) -> list[Finding]:
    out: list[Finding] = []
    log, rel = run.log, run.rel
    cfg = {k.lower(): v for k, v in log.config.items()}
    wall = _float(cfg.get("max_wallclock_seconds"))
    if wall is not None and wall * 1000.0 > TRAIN_LIMIT_MS:
        out.append(over("WALLCLOCK_OVERRIDE", f"max_wallclock_seconds is {wall:g} (> 600)", rel))
    force = cfg.get("force_stop_step")
    if force is not None and force.strip().lower() not in OFF_VALUES:
        out.append(warning("FORCE_STOP_STEP", f"FORCE_STOP_STEP={force} overrides the wall-clock stop", rel))
    t = log.train_time_ms
    if t is None:
        out.append(warning("TRAIN_TIME_MISSING", "no train_time in the log", rel))
        return out
    step = max(_step_avg_ms(run) or 0.0, OVERSHOOT_TOLERANCE_MS)
    if t > TRAIN_LIMIT_MS:
        if log.stopped_early and t - TRAIN_LIMIT_MS <= step:
            out.append(
                note(
                    "TRAIN_TIME_STEP_OVERSHOOT",
                    f"train_time {t:,.0f} ms: the stop check's overshoot (<= {step:.0f} ms, accepted upstream)",
                    rel,
                    log.stop_line,
                )
            )
        else:
            out.append(
                over("TRAIN_TIME_OVER_LIMIT", f"train_time {t:,.0f} ms > {TRAIN_LIMIT_MS:,.0f} ms", rel, log.stop_line)
            )
    elif not log.stopped_early:
        out.append(note("NO_WALLCLOCK_STOP", f"run ended by its iteration count at {t:,.0f} ms", rel))
    if log.gptq_reserve_s is not None and log.gptq_total_s is not None and log.gptq_total_s > log.gptq_reserve_s:
        out.append(
            warning(
                "GPTQ_OVER_RESERVE",
                f"GPTQ took {log.gptq_total_s:g} s but the run kept {log.gptq_reserve_s:g} s of its cap for it: "
                f"training plus GPTQ ran {log.gptq_total_s - log.gptq_reserve_s:g} s past the cap; raise the reserve",
                rel,
            )
        )
    if log.hessian_s is not None and not log.gptq_self_generated:
        data_ms = t + log.hessian_s * 1000.0
        if data_ms > TRAIN_LIMIT_MS:
            reserve = f"; GPTQ reserve {log.gptq_reserve_s:g} s" if log.gptq_reserve_s is not None else ""
            if log.gptq_effective_ms is not None:
                reserve += f" (effective cap {log.gptq_effective_ms:,.0f} ms)"
            out.append(
                over(
                    "TRAIN_DATA_AFTER_CAP",
                    f"training data read until {data_ms / 1000:.2f} s: train {t / 1000:.2f} s + GPTQ Hessians on "
                    f"training data {log.hessian_s:g} s > 600 s{reserve}; raise the reserve",
                    rel,
                    log.hessian_line,
                )
            )
    elif log.gptq_self_generated and (log.gptq_total_s or log.hessian_s):
        secs = log.gptq_total_s or log.hessian_s
        out.append(
            note(
                "GPTQ_CALIBRATION_AFTER_CAP",
                f"GPTQ on self-generated data after the cap ({secs:g} s; no training data)",
                rel,
            )
        )
    return out


def _eval(run: SeedRun, record: bool) -> list[Finding]:
    out: list[Finding] = []
    log, rel = run.log, run.rel
    ms = log.eval_time_ms
    line = log.score.line if log.score else None
    if ms is None:
        out.append(
            warning("EVAL_TIME_MISSING", "the score line has no eval_time and there is no total_eval_time", rel, line)
        )
    elif ms == 0:
        extra = f"; TTT alone took {log.ttt_time_s:g} s" if log.ttt_time_s else ""
        out.append(warning("EVAL_TIME_ZERO", f"eval timer reads 0 ms: the scored pass is not timed{extra}", rel, line))
        ms = (log.ttt_time_s or 0) * 1000.0
    if ms and ms > EVAL_LIMIT_MS:
        sev = error if record else warning
        out.append(sev("EVAL_TIME_OVER_LIMIT", f"eval {ms / 1000:,.1f} s > {EVAL_LIMIT_MS / 1000:.0f} s", rel, line))
    src = (log.compile_warmup_source or "").lower()
    if log.compile_warmup_source is not None and "val" in src and "no val" not in src:
        out.append(
            warning(
                "COMPILE_WARMUP_ON_VAL", f"compile warm-up on {log.compile_warmup_source!r} (use synthetic tokens)", rel
            )
        )
    elif log.compile_warmup_s:
        out.append(
            note("EVAL_TIMER_EXCLUDES_WARMUP", f"eval timer excludes a {log.compile_warmup_s:g} s compile warm-up", rel)
        )
    return out
