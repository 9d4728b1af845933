"""Static checks of a submission folder: one small module per family, each `check(ctx) -> list[Finding]`."""

from __future__ import annotations

import traceback
from collections.abc import Callable

from validator.checks import (
    attribution,
    bpb_ratio,
    files,
    fingerprints,
    hparams,
    json_log,
    legal_flags,
    provenance,
    seeds,
    significance,
    size,
    source,
    timing,
)
from validator.checks.context import Context
from validator.findings import Finding, error

CHECKS: tuple[Callable[[Context], list[Finding]], ...] = (
    files.check,
    json_log.check,
    seeds.check,
    size.check,
    timing.check,
    hparams.check,
    fingerprints.check,
    bpb_ratio.check,
    legal_flags.check,
    provenance.check,
    attribution.check,
    source.check,
    significance.check,
)

INTERNAL_ERROR = "VALIDATOR_INTERNAL_ERROR"


def run_checks(ctx: Context) -> list[Finding]:
    """Every check in order; a check that raises becomes one VALIDATOR_INTERNAL_ERROR finding (exit status 2)."""
    findings = list(ctx.load_findings)
    for check in CHECKS:
        try:
            findings.extend(check(ctx))
        except Exception as exc:  # noqa: BLE001 - a bug in one check must not hide the others
            where = traceback.extract_tb(exc.__traceback__)[-1]
            findings.append(
                error(INTERNAL_ERROR, f"{check.__module__} raised {type(exc).__name__}: {exc} (at line {where.lineno})")
            )
    return findings
