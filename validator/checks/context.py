"""What every check reads: the folder, its submission.json (loose), its logs (parsed), its script and README."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import validator.folder as vfolder
from validator.findings import Finding, Severity, error, note, warning
from validator.folder import SubmissionFolder, open_folder
from validator.logs import ParsedLog, parse_log
from validator.loose import LooseSubmission, read_submission
from validator.numbers import fmean

# Every candidate log is read; these bounds only stop a folder built to exhaust the validator, and hitting one is
# itself a finding (an error for a record claim), so padding a folder cannot push a real log out unseen.
LOG_READ_BUDGET_BYTES = 256 * 1024 * 1024  # all logs together
LOG_READ_BUDGET_SECONDS = 120.0
# What the folder reader could not list or read: for a record claim, what cannot be read cannot be accepted.
UNREAD_CODES = frozenset({"TOO_MANY_FILES", "TREE_TOO_DEEP", "UNREADABLE_DIR", "NAME_NOT_UTF8"})
JSON_CAP_BYTES = 4 * 1024 * 1024
SEED_IN_NAME = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)
TRACK_DIR_NAMES = {"track_10min_16mb": "10min_16mb", "track_non_record_16mb": "non_record_16mb"}


@dataclass
class CheckOptions:
    """Choices the caller makes; the defaults are ssm-golf's policy."""

    allow_missing_code: bool = False  # fixtures that ship logs and metadata only
    previous: str | None = None  # frontier row to compare with (PR number or folder name)
    record: bool | None = None  # force a record claim on/off; None: a record when the track is 10min_16mb
    frontier_file: Path | None = None  # replaces the bundled validator/data/frontier.json
    track: str | None = None  # when the folder is not under records/<track>/
    skip_source: bool = False  # logs and metadata only: no static analysis of the script (fast)


@dataclass
class SeedRun:
    """One log of the folder and the seed it belongs to."""

    rel: str
    log: ParsedLog
    seed: int | None
    seed_from_name: int | None


@dataclass
class Context:
    folder: SubmissionFolder
    options: CheckOptions = field(default_factory=CheckOptions)
    track_dir: str | None = None
    submission: LooseSubmission | None = None
    json_file: str | None = None
    runs: list[SeedRun] = field(default_factory=list)
    script: str | None = None
    script_bytes: bytes | None = None
    readme: str | None = None
    load_findings: list[Finding] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # checks add what the report shows
    claimed_rels: set[str] | None = None  # the experiment whose logs back the claim, where the folder holds several

    @property
    def track(self) -> str | None:
        """The canonical track: from the parent folder, else the option, else submission.json."""
        if self.track_dir in TRACK_DIR_NAMES:
            return TRACK_DIR_NAMES[self.track_dir]
        if self.options.track:
            return self.options.track
        return self.submission.track if self.submission else None

    @property
    def is_record(self) -> bool:
        if self.options.record is not None:
            return self.options.record
        return self.track == "10min_16mb"

    @property
    def scored_runs(self) -> list[SeedRun]:
        """Logs with a score; the top-level ones when there are any (logs in subfolders are supplementary)."""
        scored = [r for r in self.runs if r.log.score is not None]
        if self.claimed_rels is not None:
            scored = [r for r in scored if r.rel in self.claimed_rels]
        top = [r for r in scored if "/" not in r.rel]
        return top or scored

    def seed_runs(self) -> dict[int, SeedRun]:
        """One scored log per seed; with two logs for a seed, the one named for it, else the last."""
        chosen: dict[int, SeedRun] = {}
        for r in self.scored_runs:
            if r.seed is None:
                continue
            if r.seed not in chosen or r.seed_from_name == r.seed or chosen[r.seed].seed_from_name != r.seed:
                chosen[r.seed] = r
        return chosen

    def seed_scores(self) -> dict[int, float]:
        """Per seed, the score of record."""
        return {s: r.log.score.val_bpb for s, r in self.seed_runs().items() if r.log.score is not None}

    def mean_score(self) -> float | None:
        """Mean score over seeds (over all scored logs when no seed is known)."""
        by_seed = self.seed_scores()
        if by_seed:
            return fmean(by_seed.values())
        scores = [r.log.score.val_bpb for r in self.scored_runs if r.log.score is not None]
        return fmean(scores) if scores else None


def _is_log_name(rel: str) -> bool:
    """Every `.log` and every `.txt` but requirements files: whether it is a log is decided by its content."""
    name = rel.rsplit("/", 1)[-1].lower()
    if name.endswith(".log"):
        return True
    return name.endswith(".txt") and not name.startswith("requirements")


def _log_order(rel: str) -> tuple:
    """Read order: top-level first, then names that say train/seed/log, `.log` before `.txt`, then by name."""
    name = rel.rsplit("/", 1)[-1].lower()
    telling = any(k in name for k in ("train", "seed", "log"))
    return (rel.count("/"), not telling, not name.endswith(".log"), rel)


def _escalated(finding: Finding, record: bool) -> Finding:
    """A listing problem is an error for a record claim: the unread part could hold the evidence."""
    if not record or finding.code not in UNREAD_CODES or finding.severity is Severity.ERROR:
        return finding
    return error(
        finding.code, f"{finding.message} (a record claim cannot be accepted unread)", finding.file, finding.line
    )


def _looks_like_log(text: str) -> bool:
    return any(k in text for k in ("val_loss", "train_loss", "result_json", "val_bpb"))


def load_context(path: str | Path, options: CheckOptions | None = None) -> Context:
    """Read a folder once for all checks. Raises NotADirectoryError when `path` is not a folder."""
    options = options or CheckOptions()
    folder = open_folder(path)
    ctx = Context(folder=folder, options=options)
    parent = Path(path).resolve().parent.name
    ctx.track_dir = parent if parent.startswith("track_") else None
    top = folder.top_level()
    json_names = [f for f in top if f == "submission.json"] or [
        f for f in top if f.startswith("submission") and f.endswith(".json")
    ]
    if json_names:
        ctx.json_file = json_names[0]
        if ctx.json_file != "submission.json":
            ctx.load_findings.append(
                warning("JSON_FILE_NAME", f"metadata is in {ctx.json_file}; rename it submission.json", ctx.json_file)
            )
        if folder.files[ctx.json_file] > JSON_CAP_BYTES:
            ctx.load_findings.append(warning("JSON_TOO_LARGE", "over 4 MiB; not parsed", ctx.json_file))
        else:
            text = folder.read_text(ctx.json_file) or ""
            ctx.submission, found = read_submission(text, ctx.json_file)
            ctx.load_findings.extend(found)
    if "train_gpt.py" in folder.files:
        ctx.script = "train_gpt.py"
    else:
        alternatives = [f for f in top if f.endswith(".py") and f.startswith("train")]
        ctx.script = alternatives[0] if len(alternatives) == 1 else None
    if ctx.script:
        ctx.script_bytes = folder.read_bytes(ctx.script)
    readmes = [f for f in top if f.lower() == "readme.md"]
    if readmes:
        ctx.readme = folder.read_text(readmes[0], cap=1024 * 1024)
    ctx.load_findings[:0] = [_escalated(f, ctx.is_record) for f in folder.findings]
    _read_logs(ctx)
    if ctx.submission is not None:
        _claimed_lines(ctx)
        _claimed_experiment(ctx)
    return ctx


def _read_logs(ctx: Context) -> None:
    """Parse every candidate log, in `_log_order`; the bounds, when hit, are findings naming what was not read."""
    import time

    folder = ctx.folder
    names = sorted((f for f in folder.files if _is_log_name(f)), key=_log_order)
    used, start = 0, time.monotonic()
    unread: list[str] = []
    for rel in names:
        size = folder.files[rel]
        if unread or used + min(size, vfolder.READ_CAP_BYTES) > LOG_READ_BUDGET_BYTES:
            unread.append(rel)
            continue
        if time.monotonic() - start > LOG_READ_BUDGET_SECONDS:
            unread.append(rel)
            continue
        text = folder.read_text(rel)
        used += min(size, vfolder.READ_CAP_BYTES)
        if text is None or not _looks_like_log(text):
            continue
        if size > vfolder.READ_CAP_BYTES:
            ctx.load_findings.append(
                _severity_for(ctx)(
                    "LOG_PARTIALLY_READ",
                    f"{size:,} bytes, over the {vfolder.READ_CAP_BYTES:,}-byte read cap: only head and tail were read; "
                    "commit the training log itself, not a padded one",
                    rel,
                )
            )
        log = parse_log(text, path=rel)
        m = SEED_IN_NAME.search(rel.rsplit("/", 1)[-1])
        from_name = int(m.group(1)) if m else None
        ctx.runs.append(
            SeedRun(rel=rel, log=log, seed=log.seed if log.seed is not None else from_name, seed_from_name=from_name)
        )
    ctx.runs.sort(key=lambda r: r.rel)
    if unread:
        shown = ", ".join(unread[:5]) + (", ..." if len(unread) > 5 else "")
        ctx.load_findings.append(
            _severity_for(ctx)(
                "LOGS_NOT_READ",
                f"{len(unread)} of {len(names)} candidate logs not read (past {LOG_READ_BUDGET_BYTES:,} bytes or "
                f"{LOG_READ_BUDGET_SECONDS:.0f} s of logs): {shown}; remove the files that are not training logs",
            )
        )


def _severity_for(ctx: Context):
    """error() for a record claim, warning() otherwise."""
    return error if ctx.is_record else warning


SEED_TOKEN = re.compile(r"(?:(?<=[_\-.])|^)(?:seed|s)[_-]?\d+(?=[_\-.]|$)", re.IGNORECASE)


def experiment_of(rel: str) -> str:
    """The experiment a log belongs to: its path with the seed token taken out (`x_seq32768_s42.txt` and
    `x_seq32768.txt` are one experiment, `x_seq16384_seed1341.txt` another)."""
    folder, _, name = rel.rpartition("/")
    stem, dot, ext = name.rpartition(".") if "." in name else (name, "", "")
    stem = re.sub(r"[_\-.]{2,}", "_", SEED_TOKEN.sub("", stem)).strip("_-.")
    return f"{folder}/{stem}{dot}{ext}" if folder else f"{stem}{dot}{ext}"


def _agrees(claim: float, value: float) -> bool:
    """`value` is the claimed figure, exactly (1e-6) or rounded as the claim is written."""
    from validator.loose import decimals

    d = decimals(claim)
    tol = max(1e-6, 0.5 * 10.0**-d + 1e-12) if d is not None and d < 8 else 1e-6
    return abs(claim - value) <= tol


def _claims(ctx: Context) -> list[float]:
    sub = ctx.submission
    assert sub is not None
    return [c.val_bpb for c in sub.seed_results.values() if c.val_bpb is not None]


def _claimed_lines(ctx: Context) -> None:
    """Where a seed's claim is a final line of its log other than the priority pick (a failed later pass, say),
    that line is the score of record, with a note naming the line passed over."""
    sub = ctx.submission
    assert sub is not None
    for run in ctx.runs:
        claim = sub.seed_results.get(run.seed) if run.seed is not None else None
        if claim is None or claim.val_bpb is None or run.log.priority_score is None:
            continue
        pick = run.log.priority_score
        if _agrees(claim.val_bpb, pick.val_bpb):
            continue
        matches = [s for s in run.log.scores if not s.diagnostic and _agrees(claim.val_bpb, s.val_bpb)]
        if not matches:
            continue
        run.log.claimed = matches[-1]
        ctx.load_findings.append(
            note(
                "SCORE_LINE_CLAIMED",
                f"seed {run.seed}: the claim {claim.val_bpb} is the {matches[-1].tag} line; the later "
                f"{pick.tag} pass ({pick.val_bpb:.8f}, line {pick.line}) is not claimed",
                run.rel,
                matches[-1].line,
            )
        )


def _claimed_experiment(ctx: Context) -> None:
    """A folder holding the logs of several experiments: the claim is checked against the experiment whose logs
    hold the claimed figures (per-seed claims, else the headline as their mean), never across experiments."""
    sub = ctx.submission
    assert sub is not None
    groups: dict[str, list[SeedRun]] = {}
    for run in ctx.runs:
        if run.log.score is not None:
            groups.setdefault(experiment_of(run.rel), []).append(run)
    if len(groups) < 2:
        return
    claims = _claims(ctx)

    def fit(runs: list[SeedRun]) -> int:
        values = [r.log.score.val_bpb for r in runs if r.log.score is not None]
        hits = sum(any(_agrees(c, v) for v in values) for c in claims)
        if sub.val_bpb is not None and values and _agrees(sub.val_bpb, fmean(values)):
            hits += 1
        return hits

    backing = {key: runs for key, runs in groups.items() if fit(runs) > 0}
    if not backing or len(backing) == len(groups):
        return
    ctx.claimed_rels = {r.rel for runs in backing.values() for r in runs}
    # eval-only logs (the run says it skipped training) are backed by the training logs of the same seeds: those stay in
    untrained = {r.seed for runs in backing.values() for r in runs if r.log.eval_only}
    ctx.claimed_rels |= {
        r.rel
        for r in ctx.runs
        if r.seed is not None and r.seed in untrained and (r.log.train_time_ms is not None or r.log.steps)
    }
    if len(ctx.claimed_rels) == sum(len(v) for v in groups.values()):
        ctx.claimed_rels = None
        return
    ctx.load_findings.append(
        note(
            "CLAIMED_EXPERIMENT",
            f"the claim is checked against the logs of {', '.join(sorted(backing))}, which hold the claimed "
            f"figures; the folder's {len(groups) - len(backing)} other experiment(s) are supplementary",
        )
    )
