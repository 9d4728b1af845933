"""Log grammar: reads the lines of a Parameter Golf training log that reviewers and checks rely on.

This is the starting core used by `builder collect`; the full grammar (every score tag of the challenge's
history, time and size variants, hyperparameter echo, embedded source) grows here behind the same API.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# An optional timestamp or counter prefix that some logs put before every line.
_PREFIX = r"^(?:[0-9.]+ )?"
_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

SCORE_RE = re.compile(_PREFIX + r"(?P<tag>[A-Za-z0-9_]+) val_loss:" + _NUM + r" val_bpb:" + _NUM + r"(?P<rest>.*)$")
STEP_RE = re.compile(_PREFIX + r"step:(\d+)/(\d+) train_loss:" + _NUM + r" train_time:" + _NUM + r"ms")
STOP_RE = re.compile(_PREFIX + r"stopping_early: wallclock_cap train_time: ?" + _NUM + r"ms")
CODE_RE = re.compile(_PREFIX + r"Code size: (\d+) bytes")
MODEL_RE = re.compile(_PREFIX + r"Serialized model (?P<fmt>\S+): (\d+) bytes")
TOTAL_RE = re.compile(_PREFIX + r"Total submission size (?P<fmt>\S+): (\d+) bytes")
SEED_RE = re.compile(_PREFIX + r"\s*seed: ?(\d+)\s*$")
EVAL_TIME_RE = re.compile(r"eval_time:" + _NUM + r"ms")
RESULT_JSON_PREFIX = "result_json "

# Which final line is "the score", best first: the last evaluation of the artifact through the submitted eval path.
SCORE_PRIORITY = (
    "quantized_ttt_phased",
    "quantized_ttt_lora",
    "quantized_ttt",
    "legal_ttt_exact",
    "final_int6_sliding_window_exact",
    "final_sliding_window_exact",
    "final_int8_zlib_roundtrip_exact",
    "final_int6_roundtrip_exact",
)


@dataclass
class ScoreLine:
    tag: str
    val_loss: float
    val_bpb: float
    eval_time_ms: float | None
    line: int


@dataclass
class ParsedLog:
    """What one log says. Missing facts stay None; nothing here raises on a malformed log."""

    path: str = ""
    seed: int | None = None
    scores: list[ScoreLine] = field(default_factory=list)
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train_loss, train_time_ms)
    train_time_ms: float | None = None
    stopped_early: bool = False
    bytes_code: int | None = None
    bytes_model: int | None = None
    bytes_total: int | None = None
    result_json: dict | None = None

    @property
    def score(self) -> ScoreLine | None:
        """The score of record: by tag priority, the last line of the best tag present."""
        for tag in SCORE_PRIORITY:
            hits = [s for s in self.scores if s.tag == tag]
            if hits:
                return hits[-1]
        exact = [s for s in self.scores if s.tag.endswith("_exact")]
        return exact[-1] if exact else None


def _looks_like_source(line: str) -> bool:
    return "{" in line or "log0(" in line or 'f"' in line


def parse_log(text: str, path: str = "") -> ParsedLog:
    """Parse a log's text; robust to partial and truncated logs and to embedded source code."""
    out = ParsedLog(path=path)
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if line.startswith(RESULT_JSON_PREFIX):
            try:
                data = json.loads(line[len(RESULT_JSON_PREFIX) :])
            except ValueError:
                continue
            if isinstance(data, dict):
                out.result_json = data
            continue
        if _looks_like_source(line):
            continue
        if m := SCORE_RE.match(line):
            if m.group("tag").startswith("step"):
                continue
            et = EVAL_TIME_RE.search(m.group("rest"))
            out.scores.append(
                ScoreLine(
                    m.group("tag"), float(m.group(2)), float(m.group(3)), float(et.group(1)) if et else None, lineno
                )
            )
        elif m := STEP_RE.match(line):
            out.steps.append((int(m.group(1)), float(m.group(3)), float(m.group(4))))
        elif m := STOP_RE.match(line):
            out.stopped_early = True
            out.train_time_ms = float(m.group(1))
        elif m := CODE_RE.match(line):
            out.bytes_code = int(m.group(1))
        elif m := MODEL_RE.match(line):
            out.bytes_model = int(m.group(2))
        elif m := TOTAL_RE.match(line):
            out.bytes_total = int(m.group(2))
        elif m := SEED_RE.match(line):
            out.seed = int(m.group(1))
    if out.train_time_ms is None and out.steps:
        out.train_time_ms = out.steps[-1][2]
    return out


def parse_log_file(path: str | Path) -> ParsedLog:
    """Read a log as UTF-8 (undecodable bytes replaced) and parse it."""
    p = Path(path)
    return parse_log(p.read_bytes().decode("utf-8", errors="replace"), path=str(p))
