"""Log grammar: reads the lines of a Parameter Golf training log that reviewers and checks rely on.

Covers every score-line tag seen in the challenge's history (with a priority order for "the" score), size lines
(raw and quantized model, code raw/compressed, totals in every compressor variant), time lines (train stop, GPTQ
reserve and Hessian seconds, serialize and eval timers), seeds, the hyperparameter echo (block and inline forms),
data fingerprints, ssm-golf's `result_json`, optional timestamp prefixes, and source code embedded at the top of
baseline-style logs. Nothing here raises on a malformed, partial or truncated log: missing facts stay None.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_NUM = r"([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|nan|inf)"

# An optional epoch-timestamp, counter or rank prefix that some logs put before every line.
_PREFIX_RE = re.compile(r"^(?:\d{9,10}\.\d+ |\d{9,10} |\[\d{1,4}\] |\[rank\d+\]:? |\d{1,7}: (?=[A-Za-z]))")

SCORE_RE = re.compile(
    r"^(?P<tag>[A-Za-z][\w:.\- ]*?)\s+val_loss[:=]\s?" + _NUM + r"\s+(?:\w+\s)?val_bpb[:=]\s?" + _NUM + r"(?P<rest>.*)$"
)
STEP_RE = re.compile(r"^step:(\d+)/(\d+) train_loss:" + _NUM + r" train_time:" + _NUM + r"ms")
STEP_NEW_RE = re.compile(r"^(\d+)/(\d+) train_loss:\s?" + _NUM + r" train_time:\s?" + _NUM + r"(ms|m|s)\b")
VAL_STEP_RE = re.compile(r"^(?:step:)?(\d+)/(\d+) val_loss:\s?" + _NUM + r" val_bpb:\s?" + _NUM + r"(?P<rest>.*)$")
TRAIN_TIME_MS_RE = re.compile(r"train_time:\s?" + _NUM + r"ms")
STOP_RE = re.compile(r"^stopping_early: wallclock_cap train_time: ?" + _NUM + r"ms(?: step: ?(\d+)/(\d+))?")
CODE_RE = re.compile(r"^Code size: (\d+) bytes")
CODE_RAW_RE = re.compile(r"^(?:Code size \(uncompressed\)|\[modal\] Script size): (\d+) bytes")
CODE_PACKED_RE = re.compile(r"^Code size \(compressed\): (\d+) bytes")
MODEL_RAW_RE = re.compile(r"^Serialized model: (\d+) bytes")
MODEL_RE = re.compile(r"^Serialized model (?P<fmt>\S+): (\d+) bytes")
ARTIFACT_MB_RE = re.compile(r"^artifact:\s?(\d+(?:\.\d+)?)\s?MB\b")  # `artifact:15.92MB ternary:... code:N`
TOTAL_RAW_RE = re.compile(r"^Total submission size: (\d+) bytes")
TOTAL_RE = re.compile(r"^Total submission size (?P<fmt>\S+): (\d+) bytes")
SEED_RE = re.compile(r"^\s*seed: ?(\d+)\s*$")
EVAL_TIME_RE = re.compile(r"eval_time:\s?" + _NUM + r"ms")
TIME_MS_RE = re.compile(r"\btime:\s?" + _NUM + r"ms")
ELAPSED_RE = re.compile(r"elapsed=" + _NUM + r"s")
TOTAL_EVAL_RE = re.compile(r"^total_eval_time:\s?" + _NUM + r"s")
GPTQ_RESERVE_RE = re.compile(r"^gptq:reserving " + _NUM + r"s, effective=" + _NUM + r"ms", re.IGNORECASE)
HESSIAN_RE = re.compile(r"^gptq:collected (?:\d+ hessians|hessians for \d+ layers) in " + _NUM + r"s", re.IGNORECASE)
GPTQ_AR_RE = re.compile(r"^gptq:generat", re.IGNORECASE)
TTT_DONE_RE = re.compile(r"^ttt:completed .*time:\s?" + _NUM + r"s")
GPTQ_TOTAL_RE = re.compile(r"^gptq:quantization complete in " + _NUM + r"s", re.IGNORECASE)
SERIALIZE_WALL_RE = re.compile(r"^serialize_wallclock:\s?" + _NUM + r"s")
ARTIFACT_WALL_RE = re.compile(r"^artifact_production_wallclock:\s?" + _NUM + r"s")
COMPILE_WARMUP_RE = re.compile(r"compile warmup done \(" + _NUM + r"s\)")
COMPILE_WARMUP_SRC_RE = re.compile(r"warming up compile \((?P<src>[^)]*)\)")
TRAIN_SHARDS_RE = re.compile(r"train_shards:\s?(\d+)")
VAL_TOKENS_RE = re.compile(r"(?:^val_tokens:\s?|^val_loader:.*\btokens:)(\d+)")
TOKENIZER_RE = re.compile(r"tokenizer_path[=:]\s?(\S+)")
RUNNING_RE = re.compile(r"^Running (Python|PyTorch) (\S+)")
PEAK_MEM_RE = re.compile(r"^peak memory allocated: (\d+) MiB")
HPARAM_BLOCK_START = re.compile(r"^Hyperparameters:\s*$")
HPARAM_BLOCK_LINE = re.compile(r"^\s{2,}([A-Za-z_][\w.]*):\s?(.*)$")
INLINE_TOKEN = re.compile(r"^\(?([A-Za-z_][\w.]*)[:=](.*?)\)?,?$")
NOTABLE_RE = re.compile(r"optimal_T|(?<![a-z])slot(?![a-z])|prequant|pre_quant_ttt|ngram|two_pass|rescor|etlb", re.I)
PROGRESS_PREFIXES = (
    "tttg:",
    "ttp:",
    "ttpp:",
    "ttpr:",
    "  ttt_chunk",
    "ttt_progress",
    "warmup_step:",
    "loop_warmup_step",
)
NOTABLE_WORDS = ("optimal_t", "slot", "prequant", "pre_quant", "ngram", "two_pass", "rescor", "etlb")
PROGRESS_RE = re.compile(r"(?:^|[\s_])loss[:=\s]|^step|^\d+/\d+|\bstep:\s?\d")
EVAL_ONLY_RE = re.compile(r"eval_only\s*[=:]\s*(?:1|true)\b|skipping training")
SOURCE_FIRST = ('"""', "'''", "import ", "from ", "#!", "# ")
SOURCE_RULE_RE = re.compile(r"^={20,}\s*$")
RESULT_JSON_PREFIX = "result_json "

# Which final line is "the score", best first: the last evaluation of the artifact through the submitted eval path.
# TTT beats sliding-window beats plain round-trip; `_exact` (8 dp) beats its 4-dp twin.
SCORE_PRIORITY = (
    "quantized_ttt_phased",
    "quantized_ttt_lora",
    "quantized_ttt",
    "legal_ttt_exact",
    "legal_ttt",
    "ttt_sliding:done",
    "final_int8_ttt_lora",
    "final_ttt_lora",
    "final_int6_ttt",
    "quantized_sliding_window",
    "final_int6_sliding_window_exact",
    "final_int6_sliding_window_s64_exact",
    "final_int6_sliding_window",
    "final_int6_sliding_window_s64",
    "final_sliding_window_exact",
    "final_sliding_window_eval_exact",
    "final_sliding_window",
    "final_sliding_window_eval",
    "final_sliding",
    "final_int8_zlib_roundtrip sliding_exact",
    "final_int8_zlib_roundtrip_exact sliding",
    "final_int8_zlib_roundtrip sliding",
    "final_int8_zlib_roundtrip_exact",
    "final_int6_roundtrip_exact",
    "final_ternary_roundtrip_exact",
    "final_binary_roundtrip_exact",
    "final_xnor_roundtrip_exact",
    "final_INT7_zlib_roundtrip_exact",
    "final_roundtrip_exact",
    "final_int8_zlib_roundtrip",
    "final_int6_roundtrip",
    "final_ternary_roundtrip",
    "final_binary_roundtrip",
    "final_xnor_roundtrip",
    "final_INT7_zlib_roundtrip",
    "final_roundtrip",
    "final_temped",
    "quantized",
)
# A word between a score tag and `val_loss` that qualifies the pass (`stride:64`, `T=0.90`), not part of the tag.
QUALIFIER_RE = re.compile(r"^[A-Za-z_]\w*[:=][-+]?[0-9][\w.]*,?$")
_PRIORITY_INDEX = {tag: i for i, tag in enumerate(SCORE_PRIORITY)}
DIAGNOSTIC_PREFIXES = ("diagnostic", "pre-quantization", "pre_quant", "prequant", "post_ema", "ema ")

# Inline echo keys that change from run to run by design (not configuration).
VOLATILE_KEYS = frozenset(
    {
        "seed",
        "run_id",
        "logfile",
        "rank",
        "local_rank",
        "is_main_process",
        "warmup_step",
        "loop_warmup_step",
        "step",
        "artifact_dir",
    }
)


@dataclass
class ScoreLine:
    tag: str
    val_loss: float
    val_bpb: float
    eval_time_ms: float | None
    line: int
    rest: str = ""

    @property
    def diagnostic(self) -> bool:
        return self.tag.lower().startswith(DIAGNOSTIC_PREFIXES)


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
    # --- the full grammar ---
    seed_line: int | None = None
    val_points: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val_loss, val_bpb)
    total_steps: int | None = None  # M of step:N/M
    stop_step: int | None = None
    val_train_time_ms: float | None = None  # train_time on the last in-training val line
    stop_line: int | None = None
    code_bytes_raw: int | None = None  # "Code size:" or "Code size (uncompressed):"
    code_bytes_compressed: int | None = None  # "Code size (compressed):" (virtual wrapper)
    code_line: int | None = None
    bytes_model_raw: int | None = None  # "Serialized model: N" (unquantized, not the artifact)
    model_format: str | None = None
    total_format: str | None = None
    bytes_total_raw: int | None = None
    bytes_total_approx: float | None = None  # a total stated only in rounded MB (`artifact:15.92MB`)
    total_line: int | None = None
    gptq_reserve_s: float | None = None
    gptq_effective_ms: float | None = None
    hessian_s: float | None = None
    hessian_line: int | None = None
    gptq_self_generated: bool = False  # autoregressive calibration (no training data read)
    gptq_total_s: float | None = None
    serialize_wallclock_s: float | None = None
    artifact_wallclock_s: float | None = None
    total_eval_time_s: float | None = None
    compile_warmup_s: float | None = None
    ttt_time_s: float | None = None
    compile_warmup_source: str | None = None
    train_shards: int | None = None
    val_tokens: int | None = None
    tokenizer_path: str | None = None
    python_version: str | None = None
    torch_version: str | None = None
    peak_memory_mib: int | None = None
    hparams: dict[str, str] = field(default_factory=dict)  # "Hyperparameters:" block
    echo: dict[str, str] = field(default_factory=dict)  # inline key:value preamble lines
    notable: list[tuple[int, str]] = field(default_factory=list)  # lines naming eval tricks (SLOT, n-gram, ...)
    embedded_source: str | None = None
    embedded_source_lines: int = 0
    n_lines: int = 0
    eval_only: bool = False  # the run says it skipped training and scored a saved artifact
    claimed: ScoreLine | None = None  # set by the checks: the final line submission.json claims, when not `score`

    @property
    def priority_score(self) -> ScoreLine | None:
        """By tag priority, the last line of the best tag present."""
        best: ScoreLine | None = None
        best_rank = len(SCORE_PRIORITY)
        for s in self.scores:
            rank = _PRIORITY_INDEX.get(s.tag)
            if rank is not None and rank <= best_rank:
                best, best_rank = s, rank
        if best is not None:
            return best
        exact = [s for s in self.scores if s.tag.endswith("_exact") and not s.diagnostic]
        if exact:
            return exact[-1]
        final = [s for s in self.scores if s.tag.startswith("final") and not s.diagnostic]
        return final[-1] if final else None

    @property
    def score(self) -> ScoreLine | None:
        """The score of record: the final line the submission claims where the log holds it (a failed later pass
        does not outrank it), else the line chosen by tag priority."""
        return self.claimed if self.claimed is not None else self.priority_score

    @property
    def eval_time_ms(self) -> float | None:
        """Eval time of the scored pass: the score line's timer, else the log's total_eval_time."""
        s = self.score
        if s is not None and s.eval_time_ms is not None:
            return s.eval_time_ms
        if s is not None and s.tag.endswith("_exact"):  # the 4-dp twin carries the timer
            twins = [t for t in self.scores if t.tag == s.tag[: -len("_exact")] and t.eval_time_ms is not None]
            if twins:
                return twins[-1].eval_time_ms
        return self.total_eval_time_s * 1000.0 if self.total_eval_time_s is not None else None

    @property
    def config(self) -> dict[str, str]:
        """The run's configuration as echoed, minus keys that change from run to run by design."""
        merged = {**self.echo, **self.hparams}
        seed = str(self.seed) if self.seed is not None else None
        return {
            k: v
            for k, v in merged.items()
            if k.lower() not in VOLATILE_KEYS and not (v == seed and (len(k) <= 2 or "seed" in k.lower()))
        }

    @property
    def complete(self) -> bool:
        """A log that reached its final score and its size line (a truncated log has not)."""
        return self.score is not None and (self.bytes_total is not None or self.result_json is not None)


def _strip_prefix(line: str) -> str:
    return _PREFIX_RE.sub("", line, count=1)


def _looks_like_source(line: str) -> bool:
    return "{" in line or "log0(" in line or 'f"' in line or "print(" in line


def _split_embedded_source(lines: list[str]) -> int:
    """Index of the first run line when the log starts with the script's source and a '====' rule, else 0.

    A rule inside a triple-quoted string (a docstring underline) does not end the source: the rule that does is the
    first one with an even number of triple quotes before it."""
    quotes = 0
    for i, line in enumerate(lines[:20000]):
        if SOURCE_RULE_RE.match(line):
            head = lines[:i]
            if not any(h.startswith(("import ", "from ", '"""', "'''", "def ", "class ")) for h in head):
                return 0
            if quotes % 2 == 0:
                return i + 1
            continue
        if '"""' in line or "'''" in line:
            quotes += line.count('"""') + line.count("'''")
    return 0


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _parse_inline_echo(line: str, into: dict[str, str]) -> None:
    tokens = line.split()
    pairs = []
    for tok in tokens:
        m = INLINE_TOKEN.match(tok)
        if not m:
            return
        pairs.append((m.group(1), m.group(2)))
    for key, value in pairs:
        into.setdefault(key, value)


def _apply_result_json(out: ParsedLog) -> None:
    data = out.result_json or {}

    def _int(key: str) -> int | None:
        v = data.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    if out.seed is None and _int("seed") is not None:
        out.seed = _int("seed")
    if out.bytes_total is None:
        out.bytes_total = _int("bytes_total")
    if out.bytes_model is None:
        out.bytes_model = _int("bytes_model")
    if out.bytes_code is None:
        out.bytes_code = _int("bytes_code")
    t = data.get("train_time_ms")
    if out.train_time_ms is None and isinstance(t, (int, float)) and not isinstance(t, bool):
        out.train_time_ms = float(t)


def parse_log(text: str, path: str = "") -> ParsedLog:
    """Parse a log's text; robust to partial and truncated logs and to embedded source code."""
    out = ParsedLog(path=path)
    lines = text.splitlines()
    out.n_lines = len(lines)
    start = _split_embedded_source(lines)
    if start:
        # launcher or warning lines printed before the script's first line are not part of it
        first = 0
        if not lines[0].startswith(("'", '"', "#", "import ", "from ")):
            first = next((i for i, h in enumerate(lines[: start - 1]) if h.startswith(SOURCE_FIRST)), 0)
        out.embedded_source = "\n".join(lines[first : start - 1])
        out.embedded_source_lines = start - 1 - first
    in_block = False
    seen_step = False
    for lineno in range(start + 1, len(lines) + 1):
        raw = lines[lineno - 1].rstrip()
        line = _strip_prefix(raw)
        if in_block:
            if m := HPARAM_BLOCK_LINE.match(line):
                out.hparams.setdefault(m.group(1), m.group(2).strip())
                if m.group(1) == "seed" and m.group(2).strip().isdigit() and out.seed is None:
                    out.seed, out.seed_line = int(m.group(2).strip()), lineno
                continue
            in_block = False
        if line.startswith(PROGRESS_PREFIXES):
            continue  # TTT / eval progress lines: many, and never a fact the checks use
        if line.startswith(RESULT_JSON_PREFIX):
            try:
                data = json.loads(line[len(RESULT_JSON_PREFIX) :])
            except (ValueError, RecursionError):
                continue
            if isinstance(data, dict):
                out.result_json = data
            continue
        if HPARAM_BLOCK_START.match(line):
            in_block = True
            continue
        if m := STEP_RE.match(line):
            seen_step = True
            out.steps.append((int(m.group(1)), _to_float(m.group(3)), _to_float(m.group(4))))
            out.total_steps = int(m.group(2))
            continue
        if m := STEP_NEW_RE.match(line):
            seen_step = True
            scale = {"ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(5)]
            out.steps.append((int(m.group(1)), _to_float(m.group(3)), _to_float(m.group(4)) * scale))
            out.total_steps = int(m.group(2))
            continue
        if m := VAL_STEP_RE.match(line):
            out.val_points.append((int(m.group(1)), _to_float(m.group(3)), _to_float(m.group(4))))
            out.total_steps = int(m.group(2))
            if tt := TRAIN_TIME_MS_RE.search(m.group("rest")):
                out.val_train_time_ms = _to_float(tt.group(1))
            continue
        if m := STOP_RE.match(line):
            out.stopped_early = True
            out.train_time_ms = _to_float(m.group(1))
            out.stop_line = lineno
            if m.group(2):
                out.stop_step, out.total_steps = int(m.group(2)), int(m.group(3))
            continue
        if m := SCORE_RE.match(line):
            words = m.group("tag").split()
            # `final_sliding_window_eval_exact stride:64 val_loss:...`: numeric key:value words are qualifiers
            qualifiers = [w for w in words if QUALIFIER_RE.match(w)]
            tag = " ".join(w for w in words if not QUALIFIER_RE.match(w))
            if not tag or tag.startswith("step") or "/" in tag:
                continue
            rest = " ".join([*qualifiers, m.group("rest")])
            et = EVAL_TIME_RE.search(rest)
            el = ELAPSED_RE.search(rest)
            tm = TIME_MS_RE.search(rest)
            eval_ms = _to_float(et.group(1)) if et else (_to_float(el.group(1)) * 1000.0 if el else None)
            if eval_ms is None and tm:
                eval_ms = _to_float(tm.group(1))
            out.scores.append(
                ScoreLine(tag, _to_float(m.group(2)), _to_float(m.group(3)), eval_ms, lineno, rest.strip())
            )
            continue
        if m := CODE_RE.match(line):
            out.code_bytes_raw, out.code_line = int(m.group(1)), lineno
        elif m := CODE_RAW_RE.match(line):
            out.code_bytes_raw, out.code_line = int(m.group(1)), lineno
        elif m := CODE_PACKED_RE.match(line):
            out.code_bytes_compressed = int(m.group(1))
        elif m := MODEL_RAW_RE.match(line):
            out.bytes_model_raw = int(m.group(1))
        elif m := MODEL_RE.match(line):
            out.bytes_model, out.model_format = int(m.group(2)), m.group("fmt")
        elif m := ARTIFACT_MB_RE.match(line):
            out.bytes_total_approx = _to_float(m.group(1)) * 1e6
        elif m := TOTAL_RAW_RE.match(line):
            out.bytes_total_raw = int(m.group(1))
            if out.total_format is None:
                out.total_line = lineno
        elif m := TOTAL_RE.match(line):
            out.bytes_total, out.total_format, out.total_line = int(m.group(2)), m.group("fmt"), lineno
        elif m := TOTAL_EVAL_RE.match(line):
            out.total_eval_time_s = _to_float(m.group(1))
        elif m := GPTQ_RESERVE_RE.match(line):
            out.gptq_reserve_s, out.gptq_effective_ms = _to_float(m.group(1)), _to_float(m.group(2))
        elif m := HESSIAN_RE.match(line):
            out.hessian_s, out.hessian_line = _to_float(m.group(1)), lineno
        elif GPTQ_AR_RE.match(line):
            out.gptq_self_generated = True
        elif m := GPTQ_TOTAL_RE.match(line):
            out.gptq_total_s = _to_float(m.group(1))
        elif m := TTT_DONE_RE.match(line):
            out.ttt_time_s = _to_float(m.group(1))
        elif m := SERIALIZE_WALL_RE.match(line):
            out.serialize_wallclock_s = _to_float(m.group(1))
        elif m := ARTIFACT_WALL_RE.match(line):
            out.artifact_wallclock_s = _to_float(m.group(1))
        elif m := RUNNING_RE.match(line):
            if m.group(1) == "Python":
                out.python_version = m.group(2)
            else:
                out.torch_version = m.group(2)
        elif m := PEAK_MEM_RE.match(line):
            out.peak_memory_mib = int(m.group(1))
        elif m := SEED_RE.match(line):
            if out.seed is None:
                out.seed, out.seed_line = int(m.group(1)), lineno
        elif line.startswith("seed:") and line[5:].strip().isdigit():
            if out.seed is None:
                out.seed, out.seed_line = int(line[5:].strip()), lineno
        else:
            if "compile" in line:
                if m := COMPILE_WARMUP_SRC_RE.search(line):
                    out.compile_warmup_source = m.group("src")
                if m := COMPILE_WARMUP_RE.search(line):
                    out.compile_warmup_s = _to_float(m.group(1))
            if PROGRESS_RE.search(line):
                seen_step = True  # progress lines of any format end the configuration preamble
            if not seen_step and not _looks_like_source(line):
                _parse_inline_echo(line, out.echo)
        low = line.lower()
        if "eval_only" in low or "skipping training" in low:
            out.eval_only = out.eval_only or bool(EVAL_ONLY_RE.search(low))
        if any(w in low for w in NOTABLE_WORDS) and NOTABLE_RE.search(line) and len(out.notable) < 50:
            if not _looks_like_source(line):
                out.notable.append((lineno, line[:200]))
        if "train_shards" in line and (m := TRAIN_SHARDS_RE.search(line)):
            out.train_shards = int(m.group(1))
        if "tokens" in line and (m := VAL_TOKENS_RE.search(line)):
            out.val_tokens = int(m.group(1))
        if "tokenizer_path" in line and (m := TOKENIZER_RE.search(line)):
            out.tokenizer_path = m.group(1)
    if out.tokenizer_path is None and "tokenizer_path" in out.hparams:
        out.tokenizer_path = out.hparams["tokenizer_path"]
    out.bytes_code = out.code_bytes_compressed if out.code_bytes_compressed is not None else out.code_bytes_raw
    if out.bytes_total is None and out.bytes_total_raw is not None and out.bytes_model is None:
        out.bytes_total = out.bytes_total_raw  # some scripts reuse the raw label for the artifact total
    if out.seed is None and (v := out.echo.get("seed", "")).isdigit():
        out.seed = int(v)
    if out.train_time_ms is None and out.steps:
        out.train_time_ms = max(out.steps[-1][2], out.val_train_time_ms or 0.0)
    _apply_result_json(out)
    return out


def parse_log_file(path: str | Path) -> ParsedLog:
    """Read a log as UTF-8 (undecodable bytes replaced) and parse it."""
    p = Path(path)
    return parse_log(p.read_bytes().decode("utf-8", errors="replace"), path=str(p))
