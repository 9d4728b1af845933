"""Banned eval-time tricks switched on in the run's own hyperparameter echo (reachable, not dead code).

A flag that is echoed as enabled is live in the run that produced the score; the same code behind a flag echoed
as off is the source audit's business (a note there). Lines the run printed about such tricks are listed too.
"""

from __future__ import annotations

import re

from validator.checks.context import Context
from validator.findings import Finding, error, note, warning

# (code, pattern on the lower-cased key, what the rulings say)
BANNED = (
    ("SLOT_ENABLED", re.compile(r"(^|_)slot(_|$)"), "SLOT deltas optimised on scored targets (#1240)"),
    ("PREQUANT_TTT_ENABLED", re.compile(r"pre_?quant.*ttt|ttt.*pre_?quant"), "train-then-score TTT on val (#1376)"),
    ("ETLB_ENABLED", re.compile(r"(^|_)etlb(_|$)"), "eval-time logit bias fitted on val (#1399)"),
    ("NGRAM_CACHE_ENABLED", re.compile(r"(ngram|n_gram)(?!_tilt)"), "hashed n-gram cache at eval (#779)"),
    ("TWO_PASS_ENABLED", re.compile(r"two_pass|rescor"), "two-pass re-scoring (#869)"),
    (
        "BYTE_MIXTURE_ENABLED",
        re.compile(r"(^|_)ppm|byte_mix"),
        "byte-level mixture, not normalised over tokens (#1872)",
    ),
    ("VAL_CALIBRATION_ENABLED", re.compile(r"(gptq|awq|calib).*val|val.*calib"), "calibration on val tokens (#593)"),
)
SWITCH_KEY = re.compile(r"(^|_)(enabled?|on|use)$|^use_|^enable_")
ON = {"true", "1", "yes", "on"}


def _enabled(key: str, value: str) -> bool:
    v = value.strip().lower()
    return v in ON and (SWITCH_KEY.search(key) is not None or value.strip().lower() in {"true", "false"})


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    for run in ctx.scored_runs:
        config = run.log.config
        for code, pattern, why in BANNED:
            family = {k: v for k, v in config.items() if pattern.search(k.lower())}
            # the family's own switch (`prequant_ttt_enabled`) decides; its other settings
            # (`prequant_ttt_compile: True`) only count where the log echoes no switch for it
            switches = {k: v for k, v in family.items() if SWITCH_KEY.search(k.lower())}
            deciding = switches or family
            live = [(k, v) for k, v in deciding.items() if _enabled(k.lower(), v)]
            if live and (code, run.rel) not in seen:
                seen.add((code, run.rel))
                key, value = live[0]
                out.append(error(code, f"{key}={value} in the run's echo: {why}", run.rel))
        for key, value in config.items():
            k = key.lower()
            if "ngram_tilt" in k and _enabled(k, value) and ("NGRAM_TILT_ENABLED", run.rel) not in seen:
                seen.add(("NGRAM_TILT_ENABLED", run.rel))
                out.append(
                    warning(
                        "NGRAM_TILT_ENABLED",
                        f"{key}={value}: an n-gram tilt is legal only with experts gated on the prefix, never the "
                        "target (#1514 accepted; #1420/#1967 flagged): confirm with the source audit",
                        run.rel,
                    )
                )
        tricks = [(n, text) for n, text in run.log.notable if "optimal_t" in text.lower()]
        for n, text in tricks[:1]:
            out.append(warning("TEMPERATURE_FIT_ON_VAL", f"temperature chosen at eval: {text[:100]}", run.rel, n))
        others = [(n, t) for n, t in run.log.notable if (n, t) not in tricks]
        if others and not any(rel == run.rel for _, rel in seen):
            n, text = others[0]
            out.append(
                note("TRICK_MENTIONED", f"{len(others)} log line(s) name eval tricks, e.g. {text[:80]!r}", run.rel, n)
            )
    return out
