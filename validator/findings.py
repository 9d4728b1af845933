"""Findings: what every check returns. A stable code, a severity, a message, and where it was seen."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"  # breaks a rule: the submission fails
    WARNING = "warning"  # likely a problem, or a claim that cannot be confirmed
    NOTE = "note"  # worth a reviewer's eye; not a problem by itself


@dataclass(frozen=True)
class Finding:
    code: str  # stable, UPPER_SNAKE, e.g. SIZE_OVER_CAP
    severity: Severity
    message: str
    file: str | None = None  # path relative to the checked folder
    line: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d


def error(code: str, message: str, file: str | None = None, line: int | None = None) -> Finding:
    return Finding(code, Severity.ERROR, message, file, line)


def warning(code: str, message: str, file: str | None = None, line: int | None = None) -> Finding:
    return Finding(code, Severity.WARNING, message, file, line)


def note(code: str, message: str, file: str | None = None, line: int | None = None) -> Finding:
    return Finding(code, Severity.NOTE, message, file, line)
