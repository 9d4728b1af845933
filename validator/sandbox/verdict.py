"""Findings about how a sandboxed run went: exit status, the hard kill, and phase times measured from outside."""

from __future__ import annotations

from validator.findings import Finding, error, warning
from validator.sandbox.request import Limits, SandboxResult


def run_findings(result: SandboxResult, limits: Limits, phases_expected: tuple[str, ...], where: str) -> list[Finding]:
    """`phases_expected`: the phases whose markers the script must print (train and eval, or eval only)."""
    findings: list[Finding] = []
    if result.killed:
        findings.append(error("RERUN_KILLED_AT_LIMIT", f"the sandbox killed the run: {result.killed}", where))
    elif result.returncode != 0:
        tail = " | ".join(line for _, line in result.lines[-3:])[-300:]
        msg = f"the script exited with status {result.returncode}: {tail}"
        findings.append(error("RERUN_EXIT_NONZERO", msg, where))
    for phase in phases_expected:
        span = result.phases.get(phase)
        limit = limits.phase_limit(phase)
        code = f"RERUN_{phase.upper()}_TIME_OVER_LIMIT"
        if span is None or span.begin is None:
            if not result.killed and result.returncode == 0:
                msg = f"no `phase:{phase} begin` line: {phase} time not measured"
                findings.append(warning("RERUN_NO_PHASE_MARKERS", msg, where))
            continue
        seconds = span.seconds if span.seconds is not None else span.elapsed(result.wall_s)
        paused_s = span.paused_at(result.wall_s) if span.end is None else span.paused_s
        left_out = min(paused_s, span.pause_budget_s)
        if paused_s > span.pause_budget_s:
            msg = (
                f"{paused_s:.1f} s of `phase:val` inside the {phase} phase: more than the {span.pause_budget_s:.0f} s "
                f"of validation its clock may leave out (half the train limit); the {paused_s - left_out:.1f} s "
                f"beyond it count as {phase} time. Validate less often while training (VAL_LOSS_EVERY)"
            )
            findings.append(warning("RERUN_VALIDATION_PAUSE_OVER_BUDGET", msg, where))
        if limit is None or seconds <= limit:
            continue
        paused = f" (validation inside it left out: {left_out:.1f} s)" if left_out else ""
        msg = f"{phase} took {seconds:.1f} s measured outside the script{paused}; the limit is {limit:.0f} s"
        if seconds > limit + limits.grace_s or span.end is None:
            findings.append(error(code, msg, where))
        else:
            msg += f" (within the {limits.grace_s:.0f} s grace for the step in flight)"
            findings.append(warning(code, msg, where))
    return findings
