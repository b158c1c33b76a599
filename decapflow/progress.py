"""Progress lines at a steady rhythm, for long work watched from elsewhere (a Prefect run's logs, a terminal).

A :class:`Pulse` turns a loop's ticks into a line every ``every_s`` seconds (or every ``every_steps`` steps),
plus the lines its owner says right away (a validation, a committed chunk). Each line goes to ``emit(line,
fraction)``, where ``fraction`` is the share of the work done (0-1) or None when it is unknown. The library only
calls a Pulse; where the lines go (a run logger and a progress artifact, ``flows/report.py``) is the caller's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Emit = Callable[[str, "float | None"], None]


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class Pulse:
    """Calls ``emit`` when a tick is due: ``every_s`` seconds since the last line, or ``every_steps`` steps."""

    emit: Emit
    every_s: float = 30.0
    every_steps: int | None = None
    started: float = field(default_factory=time.monotonic)
    _last_time: float = field(default=-math.inf, init=False)
    _last_step: int = field(default=0, init=False)

    def due(self, step: int) -> bool:
        """Whether a tick at ``step`` would emit (cheap: call it before computing what the line needs)."""
        if self.every_steps is not None and step - self._last_step >= self.every_steps:
            return True
        return time.monotonic() - self._last_time >= self.every_s

    def say(self, line: str, fraction: float | None = None) -> None:
        """Emit ``line`` now (and restart the rhythm)."""
        self._last_time = time.monotonic()
        self.emit(line, None if fraction is None else min(max(fraction, 0.0), 1.0))

    def step(self, step: int, total: int, details: str, *, since: float | None = None, done_since: int = 0) -> None:
        """``step N/total (P%) · details · ETA``; the ETA extrapolates the steps done since ``since`` (a monotonic
        time, default the pulse's start) at ``done_since`` steps."""
        self._last_step = step
        elapsed = time.monotonic() - (self.started if since is None else since)
        rate = (step - done_since) / elapsed if elapsed > 0 else 0.0
        eta = duration((total - step) / rate) if rate > 0 else "?"
        self.say(f"step {step:,}/{total:,} ({step / max(total, 1):.0%}) · {details} · ETA {eta}", step / max(total, 1))
