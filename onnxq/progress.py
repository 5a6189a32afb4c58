"""One progress display for the long loops (calibration, sensitivity, validation, localization, AdaRound).

On a terminal it is a rich progress bar. In a log (stderr is not a terminal: CI, nohup, a job scheduler) it
is a plain line once a loop has run for `LOG_AFTER_S` seconds, then one every `LOG_EVERY_S`, and a last one
when it ends, so a long quantization shows that it is alive without filling the log of a short one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

LOG_AFTER_S = 10.0
LOG_EVERY_S = 30.0


class progress:
    """A progress display when asked for, a no-op otherwise (tests, library use)."""

    def __init__(self, enabled: bool, label: str, total: int | None) -> None:
        self.enabled, self.label, self.total = enabled, label, total
        self._logging = enabled and not sys.stderr.isatty()

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda _n: None
        if self._logging:
            self._started = self._last = time.monotonic()
            self._done, self._printed = 0, False
            return self._log
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def _line(self, now: float) -> str:
        count = f"{self._done}/{self.total}" if self.total else str(self._done)
        return f"onnxq: {self.label}: {count} in {now - self._started:.0f} s"

    def _log(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._started >= LOG_AFTER_S and (not self._printed or now - self._last >= LOG_EVERY_S):
            print(self._line(now), file=sys.stderr, flush=True)
            self._last, self._printed = now, True

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        if self._logging:
            if self._printed:
                print(self._line(time.monotonic()) + " (done)", file=sys.stderr, flush=True)
            return
        self._bar.stop()
