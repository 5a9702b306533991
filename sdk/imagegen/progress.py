"""The CLI's progress display: a job's events as a bar on a terminal, as plain lines elsewhere.

On a TTY one line is redrawn in place: the overall percent, the step and the variant being
denoised, how many variants are stored, the server's ETA and the job's stage. Anywhere else (a
log, a pipe) each change of status or stage is a line, and progress is a line per variant
finished or per tenth of the job done.
"""

from __future__ import annotations

import time
from typing import TextIO

from imagegen.types import Artifact, Error, Event, Final, Progress, Status

BAR_WIDTH = 24


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressView:
    def __init__(self, out: TextIO, variants: int, enabled: bool = True) -> None:
        self._out = out
        self._variants = max(1, variants)
        self._enabled = enabled
        self._tty = enabled and out.isatty()
        self._started = time.monotonic()
        self._stage = ""
        self._bar = ""
        self._drawn = False
        self._printed_percent = -100.0
        self._stored: set[int] = set()
        self._fill, self._empty = ("█", "░") if _unicode(out) else ("#", "-")

    def __call__(self, event: Event) -> None:
        if not self._enabled:
            return
        if isinstance(event, Status):
            stage = event.status.value + (f" ({event.stage})" if event.stage else "")
            if stage != self._stage:
                self._stage = stage
                if self._tty:
                    self._redraw()
                else:
                    self._line(f"status: {stage}")
        elif isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, Artifact):
            self._stored.add(event.variant.index)
            if self._tty:
                self._redraw()
            else:
                self._line(f"variant {event.variant.index + 1}/{self._variants} stored")
        elif isinstance(event, Error):
            self._line(f"error: {event.message}" + (" (retrying)" if event.retrying else ""))
        elif isinstance(event, Final):
            self.finish(event.job.status.value)

    def _progress(self, event: Progress) -> None:
        variant, step = event.variant, event.step
        if variant in self._stored and len(self._stored) < self._variants and event.total > 0:
            # Variants rendered one after another: the server's event names the furthest-along
            # variant, a stored one, not the one being denoised; the job's percent says where
            # that one is.
            overall = round(event.percent / 100 * self._variants * event.total)
            variant = min(set(range(self._variants)) - self._stored)
            step = max(0, min(event.total, overall - len(self._stored) * event.total))
        filled = round(BAR_WIDTH * min(100.0, event.percent) / 100)
        bar = self._fill * filled + self._empty * (BAR_WIDTH - filled)
        eta = f"  ETA {duration(event.eta_ms / 1000)}" if event.eta_ms > 0 else ""
        self._bar = (
            f"[{bar}] {event.percent:5.1f}%  step {step}/{event.total}"
            f"  variant {variant + 1}/{self._variants}"
        )
        if self._tty:
            self._bar += f" ({len(self._stored)} stored){eta}"
            self._redraw()
            return
        if step >= event.total > 0 or event.percent - self._printed_percent >= 10:
            self._printed_percent = event.percent
            self._line(self._bar + eta)

    def _redraw(self) -> None:
        """The one line of a TTY: the bar with the stage, or the stage alone before a step."""
        text = f"{self._bar}  {self._stage}" if self._bar else f"status: {self._stage}"
        self._out.write("\r" + text + "\x1b[K")
        self._out.flush()
        self._drawn = True

    def _line(self, text: str) -> None:
        """A line of its own; on a TTY above the bar, which is drawn again under it."""
        if self._drawn:
            self._out.write("\r\x1b[K")
        self._out.write(text + "\n")
        if self._drawn:
            self._redraw()
        self._out.flush()

    def finish(self, status: str) -> None:
        if not self._enabled:
            return
        if self._drawn:
            self._out.write("\n")
            self._drawn = False
        elapsed = duration(time.monotonic() - self._started)
        self._out.write(f"{status} in {elapsed}\n")
        self._out.flush()
        self._enabled = False


def _unicode(out: TextIO) -> bool:
    encoding = (getattr(out, "encoding", "") or "").lower()
    return encoding.replace("-", "") in ("utf8", "utf16", "utf32")
