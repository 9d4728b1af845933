"""Data fingerprints in the logs: tokenizer, val token count, train shards, val files kept out of training."""

from __future__ import annotations

import re

from validator.checks.context import Context, SeedRun
from validator.findings import Finding, error, note, warning

# Logged validation token counts of the canonical FineWeb val split (first 50k documents), per tokenizer;
# counts are trimmed to a multiple of the eval sequence length, hence several values and a small tolerance.
CANONICAL = {
    "sp1024": {"val_tokens": (62_021_632, 62_013_440, 61_997_056), "val_bytes": 151_080_891},
    "sp4096": {"val_tokens": (45_508_608, 45_514_752), "val_bytes": 151_080_891},
    "sp8192": {"val_tokens": (40_540_160,), "val_bytes": 151_080_891},
    "sp8192_caseops": {"val_tokens": (47_851_520,), "val_bytes": 151_074_309},
    "byte260": {"val_tokens": (151_130_112, 151_076_864), "val_bytes": 151_080_891},
}
VAL_TOKENS_REL_TOL = 1e-3


def tokenizer_of(run: SeedRun) -> str | None:
    """Which canonical tokenizer a run used, from its tokenizer path and echoed settings."""
    cfg = {k.lower(): v for k, v in run.log.config.items()}
    path = (run.log.tokenizer_path or cfg.get("tokenizer_path") or "").lower()
    vocab = cfg.get("vocab_size", "")
    if "caseops" in path or cfg.get("caseops_enabled", "").lower() == "true":
        return "sp8192_caseops"
    for name, size in (("sp8192", "8192"), ("sp4096", "4096"), ("sp1024", "1024")):
        if re.search(rf"(?<!\d){size}(?!\d)", path) or vocab == size:
            return name
    if "byte260" in path or vocab == "260":
        return "byte260"
    return None


def check(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    record = ctx.is_record
    for run in ctx.scored_runs:
        out.extend(_one(run, record))
    for attr, label in (("train_shards", "train_shards"), ("val_tokens", "val_tokens")):
        values = {getattr(r.log, attr) for r in ctx.scored_runs if getattr(r.log, attr) is not None}
        if len(values) > 1:
            out.append(warning("FINGERPRINT_DIFFERS", f"{label} differs across seed logs: {sorted(values)}"))
    return out


def _one(run: SeedRun, record: bool) -> list[Finding]:
    out: list[Finding] = []
    log, rel = run.log, run.rel
    cfg = {k.lower(): v for k, v in log.config.items()}
    train_paths = " ".join(v for k, v in cfg.items() if k.startswith("train_") and ("file" in k or "path" in k))
    if "fineweb_val" in train_paths:
        out.append(error("VAL_IN_TRAINING", f"training files include validation shards: {train_paths[:120]}", rel))
    if any("datasets/datasets" in v for v in cfg.values()):
        out.append(note("DATA_PATH_DOUBLED", "a data path holds 'datasets/datasets' (HF CaseOps layout)", rel))
    frac = cfg.get("val_doc_fraction")
    try:
        partial = frac is not None and float(frac) < 1.0
    except ValueError:
        partial = False
    if partial:
        sev = error if record else warning
        out.append(sev("VAL_SUBSET", f"val_doc_fraction {frac}: the score must cover the full val split", rel))
    tok = tokenizer_of(run)
    if tok == "sp8192_caseops":
        if log.train_shards is not None and log.train_shards != 80:
            out.append(
                warning("TRAIN_SHARDS_UNCANONICAL", f"CaseOps run with train_shards {log.train_shards} (80)", rel)
            )
        if not any("bytes" in k for k in cfg) and "byte_sidecar" not in " ".join(cfg):
            out.append(warning("BYTE_SIDECAR_MISSING", "CaseOps tokenizer without a val byte sidecar in the echo", rel))
    if tok is not None and log.val_tokens is not None:
        canon = CANONICAL[tok]["val_tokens"]
        nearest = min(canon, key=lambda c: abs(c - log.val_tokens))
        if abs(log.val_tokens - nearest) / nearest > VAL_TOKENS_REL_TOL:
            out.append(
                warning(
                    "VAL_TOKENS_UNCANONICAL",
                    f"val_tokens {log.val_tokens:,} for {tok}; canonical {nearest:,} (train/val overlap or subset?)",
                    rel,
                )
            )
    elif tok is None and log.score is not None:
        out.append(note("TOKENIZER_UNKNOWN", "tokenizer not recognised; data fingerprints not compared", rel))
    return out
