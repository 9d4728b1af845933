"""Collects a child's output lines with their arrival times and watches the phase limits (shared by backends)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable

from validator.sandbox.phases import overrun, phase_spans
from validator.sandbox.request import Limits


class LineCapture:
    """Reads lines in a thread; arrival time (seconds since `start`) is the outside clock of the phases."""

    def __init__(self, source: Iterable[bytes], start: float, echo: bool = False) -> None:
        self.start = start
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.echo = echo
        self.thread = threading.Thread(target=self._read, args=(source,), daemon=True)
        self.thread.start()

    def _read(self, source: Iterable[bytes]) -> None:
        pending = b""
        for chunk in source:
            pending += chunk
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                self._add(raw)
        if pending:
            self._add(pending)

    def _add(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        with self.lock:
            self.lines.append((time.monotonic() - self.start, text))
        if self.echo:
            print(text, file=sys.stderr, flush=True)

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.lines)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


def watch(
    capture: LineCapture, finished: Callable[[], bool], limits: Limits, tick: Callable[[], None] | None = None
) -> str | None:
    """Poll until `finished()`; return the reason to kill as soon as a limit is passed, else None."""
    while not finished():
        spans = phase_spans(capture.snapshot(), limits.pause_budget_s)
        reason = overrun(spans, time.monotonic() - capture.start, limits)
        if reason:
            return reason
        if tick is not None:
            tick()
        time.sleep(0.1)
    return None
