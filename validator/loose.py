"""Loose reader of submission.json as found upstream: every shape in practice, each deviation a finding, never a crash.

Upstream files spell code bytes two ways (bytes_code / code_bytes), give seeds as a list or a dict, per-seed results
under seed_results, the track in four spellings (or not at all), and the date as YYYY-MM-DD or an ISO timestamp.
`read_submission` normalises all of that into `LooseSubmission` and reports what it had to bend.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field

from validator.findings import Finding, error, note, warning

# spelling seen upstream -> (canonical track, unlimited compute)
TRACK_SPELLINGS = {
    "10min_16mb": ("10min_16mb", False),
    "track_10min_16mb": ("10min_16mb", False),
    "non_record_16mb": ("non_record_16mb", False),
    "track_non_record_16mb": ("non_record_16mb", False),
    "non-record-16mb": ("non_record_16mb", False),
    "non-record-unlimited-compute-16mb": ("non_record_16mb", True),
}
REQUIRED_TEXT = ("author", "github_id", "name", "date")


class _JsonFloat(float):
    """A float that remembers how it was written, so that rounding in submission.json can be told from a mismatch."""

    text: str = ""


def _json_float(text: str) -> float:
    value = _JsonFloat(text)
    value.text = text
    return value


def decimals(value: float | None) -> int | None:
    """Digits after the point as written in the JSON (None when unknown or in exponent form)."""
    text = getattr(value, "text", None) or (repr(value) if isinstance(value, float) else None)
    if not text or "e" in text.lower() or "." not in text:
        return 0 if text and text.lstrip("-").isdigit() else None
    return len(text.split(".", 1)[1])


# Other spellings of the headline figures seen upstream; read (with a note) only when the canonical key is absent.
CLAIM_ALIASES = {
    "val_bpb": ("mean_val_bpb", "val_bpb_mean", "mean_bpb"),
    "val_loss": ("mean_val_loss", "val_loss_mean"),
}


@dataclass
class SeedClaim:
    """What submission.json claims for one seed."""

    seed: int
    val_bpb: float | None = None
    val_loss: float | None = None
    artifact_bytes: int | None = None
    bytes_model: int | None = None
    steps: int | None = None
    train_time_ms: float | None = None
    eval_time_ms: float | None = None


@dataclass
class LooseSubmission:
    """submission.json normalised; None where the file does not say."""

    file: str
    raw: dict
    author: str | None = None
    github_id: str | None = None
    name: str | None = None
    blurb: str | None = None
    date: str | None = None  # YYYY-MM-DD
    track: str | None = None  # canonical: 10min_16mb | non_record_16mb
    track_raw: str | None = None
    unlimited_compute: bool = False
    val_bpb: float | None = None
    val_loss: float | None = None
    bytes_total: int | None = None
    bytes_code: int | None = None
    seeds: list[int] = field(default_factory=list)
    seed_results: dict[int, SeedClaim] = field(default_factory=dict)
    hardware: str | None = None
    pytorch_version: str | None = None
    attribution: dict[str, str] = field(default_factory=dict)

    @property
    def strict(self) -> bool:
        """Whether the JSON satisfies ssm-golf's strict model (pydantic, imported only when asked)."""
        from validator.schema import strict_problems

        return not strict_problems(self.raw)


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None  # keeps the written form of a _JsonFloat


def _int(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _seed_int(key: object) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and re.fullmatch(r"\s*(?:seed[_ ]?)?(\d{1,12})\s*", key):
        return int(re.sub(r"\D", "", key))
    return None


def _parse_date(value: str) -> tuple[str | None, bool]:
    """(YYYY-MM-DD, was a timestamp) or (None, False) when unreadable."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        try:
            return dt.date.fromisoformat(value).isoformat(), False
        except ValueError:
            return None, False
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).date().isoformat(), True
    except ValueError:
        return None, False


def _seed_claim(seed: int, data: dict, file: str, out: list[Finding]) -> SeedClaim:
    claim = SeedClaim(seed=seed)
    claim.val_bpb = _num(data.get("val_bpb"))
    claim.val_loss = _num(data.get("val_loss"))
    claim.artifact_bytes = _int(data.get("artifact_bytes", data.get("bytes_total")))
    claim.bytes_model = _int(data.get("bytes_model"))
    claim.steps = _int(data.get("steps"))
    for key, scale, attr in (
        ("train_time_ms", 1.0, "train_time_ms"),
        ("train_time_s", 1000.0, "train_time_ms"),
        ("eval_time_ms", 1.0, "eval_time_ms"),
        ("eval_time_s", 1000.0, "eval_time_ms"),
    ):
        if (v := _num(data.get(key))) is not None and getattr(claim, attr) is None:
            setattr(claim, attr, v * scale)
    if "val_bpb" in data and claim.val_bpb is None:
        out.append(warning("JSON_FIELD_TYPE", f"seed_results[{seed}].val_bpb is not a finite number", file))
    return claim


def read_submission(text: str, file: str = "submission.json") -> tuple[LooseSubmission | None, list[Finding]]:
    """Parse loosely. Returns (None, findings) when the text is not a JSON object at all."""
    out: list[Finding] = []
    try:
        data = json.loads(text, parse_float=_json_float)
    except (ValueError, RecursionError) as exc:
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return None, [error("JSON_INVALID", f"not valid JSON ({msg}); fix the syntax", file)]
    if not isinstance(data, dict):
        return None, [error("JSON_NOT_OBJECT", f"top level is {type(data).__name__}, expected an object", file)]
    sub = LooseSubmission(file=file, raw=data)
    if "variant" in data:  # an ssm-golf folder (builder writes 'variant'): held to the strict model
        from validator.schema import strict_problems

        problems = strict_problems(data)
    else:
        problems = []
    if problems:
        listed = "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else "")
        out.append(warning("JSON_STRICT_SCHEMA", f"ssm-golf's strict schema: {listed}", file))
    for key in REQUIRED_TEXT + ("blurb", "hardware", "pytorch_version"):
        v = data.get(key)
        if isinstance(v, str):
            setattr(sub, key, v)
        elif v is None and key in REQUIRED_TEXT:
            out.append(warning("JSON_FIELD_MISSING", f"no '{key}'", file))
        elif v is not None:
            out.append(warning("JSON_FIELD_TYPE", f"'{key}' is {type(v).__name__}, expected a string", file))
    if sub.date is not None:
        iso, stamp = _parse_date(sub.date)
        if iso is None:
            out.append(warning("JSON_DATE_INVALID", f"date {sub.date!r} is neither YYYY-MM-DD nor ISO 8601", file))
        elif stamp:
            out.append(note("JSON_DATE_TIMESTAMP", f"date is a timestamp ({sub.date}); YYYY-MM-DD expected", file))
        sub.date = iso
    # track
    track = data.get("track")
    if isinstance(track, str):
        sub.track_raw = track
        canon = TRACK_SPELLINGS.get(track.strip().lower())
        if canon is None:
            out.append(warning("JSON_TRACK_UNKNOWN", f"track {track!r} is none of {sorted(TRACK_SPELLINGS)}", file))
        else:
            sub.track, sub.unlimited_compute = canon
            if track != canon[0]:
                out.append(note("JSON_TRACK_SPELLING", f"track {track!r} read as {canon[0]!r}", file))
    elif track is None:
        out.append(note("JSON_TRACK_MISSING", "no 'track'; taken from the parent folder", file))
    else:
        out.append(warning("JSON_FIELD_TYPE", f"'track' is {type(track).__name__}, expected a string", file))
    # figures
    for key in ("val_bpb", "val_loss"):
        v = data.get(key)
        setattr(sub, key, _num(v))
        if key in data and v is not None and _num(v) is None:
            out.append(warning("JSON_FIELD_TYPE", f"'{key}' is not a finite number: {str(v)[:40]!r}", file))
    for key in ("val_bpb", "val_loss"):  # the mean under another spelling (`mean_val_bpb`, `val_bpb_mean`)
        if getattr(sub, key) is None and data.get(key) is None:
            for alias in CLAIM_ALIASES[key]:
                if _num(data.get(alias)) is not None:
                    setattr(sub, key, _num(data.get(alias)))
                    out.append(note("JSON_CLAIM_SPELLING", f"'{alias}' read as the claimed '{key}'", file))
                    break
    if sub.val_bpb is None:
        out.append(error("JSON_NO_VAL_BPB", "no usable 'val_bpb' (the claimed score); add the mean over seeds", file))
    sub.bytes_total = _int(data.get("bytes_total"))
    if "bytes_total" in data and data["bytes_total"] is not None and sub.bytes_total is None:
        out.append(warning("JSON_FIELD_TYPE", "'bytes_total' is not an integer", file))
    code = data.get("bytes_code")
    if code is None and "code_bytes" in data:
        code = data.get("code_bytes")
        out.append(note("JSON_CODE_BYTES_SPELLING", "'code_bytes' used instead of 'bytes_code'", file))
    sub.bytes_code = _int(code)
    for key in ("val_loss", "bytes_code", "bytes_total"):
        if key in data and data[key] is None:
            out.append(note("JSON_NULL_FIELD", f"'{key}' is null", file))
    # seeds and per-seed results
    seeds = data.get("seeds")
    if isinstance(seeds, list):
        ints = [_seed_int(s) for s in seeds]
        if any(i is None for i in ints):
            out.append(warning("JSON_FIELD_TYPE", "'seeds' holds entries that are not integers", file))
        sub.seeds = [i for i in ints if i is not None]
    elif isinstance(seeds, dict):
        out.append(note("JSON_SEEDS_DICT", "'seeds' is an object, not a list; its keys read as seeds", file))
        for k, v in seeds.items():
            s = _seed_int(k)
            if s is None:
                continue
            sub.seeds.append(s)
            if isinstance(v, dict):
                sub.seed_results.setdefault(s, _seed_claim(s, v, file, out))
            elif _num(v) is not None:
                sub.seed_results.setdefault(s, SeedClaim(seed=s, val_bpb=_num(v)))
    elif seeds is not None:
        out.append(warning("JSON_FIELD_TYPE", f"'seeds' is {type(seeds).__name__}, expected a list", file))
    if isinstance(data.get("seed"), int) and not sub.seeds:
        sub.seeds = [data["seed"]]
    results = data.get("seed_results")
    if isinstance(results, dict):
        for k, v in results.items():
            s = _seed_int(k)
            if s is None or not isinstance(v, dict):
                out.append(
                    warning("JSON_FIELD_TYPE", f"seed_results entry {str(k)[:30]!r} is not seed -> object", file)
                )
                continue
            sub.seed_results[s] = _seed_claim(s, v, file, out)
        if sub.seed_results and not sub.seeds:
            sub.seeds = sorted(sub.seed_results)
            out.append(note("JSON_SEEDS_FROM_RESULTS", "no 'seeds' list; seeds taken from seed_results", file))
        elif sub.seed_results and sorted(sub.seed_results) != sorted(set(sub.seeds)):
            out.append(
                warning(
                    "JSON_SEEDS_RESULTS_DIFFER",
                    f"'seeds' {sorted(set(sub.seeds))} != seed_results keys {sorted(sub.seed_results)}",
                    file,
                )
            )
    elif results is not None:
        out.append(warning("JSON_FIELD_TYPE", f"'seed_results' is {type(results).__name__}, expected an object", file))
    attribution = data.get("attribution")
    if isinstance(attribution, dict):
        sub.attribution = {str(k): str(v) for k, v in attribution.items() if isinstance(v, (str, int, float))}
    return sub, out
