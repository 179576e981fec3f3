"""Per-category rate limiting with one summary per suppressed window.

Fixed windows, not a sliding log: a window opens at the first alert of a category, lets
``count`` through and counts the rest. When it ends, the suppressed alerts become ONE
summary. A sliding log would reopen a slot every time an old alert aged out and so, under a
sustained flood, produce a summary every few seconds; fixed windows bound a flooding
category to ``count + 1`` messages per window. The price is that two bursts straddling a
window edge can send up to ``2 * count`` in a short span.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .alert import Severity


@dataclass(frozen=True)
class Suppressed:
    """What one window held back: enough to write the summary alert."""

    category: str
    count: int
    max_severity: Severity
    window_s: float
    first_title: str
    last_title: str


@dataclass
class _Window:
    start: float
    sent: int = 0
    suppressed: int = 0
    max_severity: Severity = Severity.DEBUG
    first_title: str = ""
    last_title: str = ""


class RateLimiter:
    """At most ``count`` alerts per category per ``window_s``; not thread-safe (one loop owns it)."""

    def __init__(self, count: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if count < 1 or window_s <= 0:
            raise ValueError("count must be >= 1 and window_s > 0")
        self.count = count
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._ready: list[Suppressed] = []  # closed windows whose summary is not yet taken

    def allow(self, category: str, severity: Severity, title: str = "") -> bool:
        """Count one alert; True if it may go out, False if it is suppressed."""
        now = self._clock()
        w = self._windows.get(category)
        if w is None or now >= w.start + self.window_s:
            if w is not None and w.suppressed:
                self._ready.append(self._summary(category, w))
            w = self._windows[category] = _Window(start=now)
        if w.sent < self.count:
            w.sent += 1
            return True
        w.suppressed += 1
        if w.suppressed == 1:
            w.first_title, w.max_severity = title, severity
        else:
            w.max_severity = max(w.max_severity, severity)
        w.last_title = title
        return False

    def due(self) -> list[Suppressed]:
        """Summaries of windows that have ended with something suppressed (each returned once)."""
        now = self._clock()
        out, self._ready = self._ready, []
        for category, w in list(self._windows.items()):
            if now >= w.start + self.window_s:
                del self._windows[category]  # forget idle categories: memory stays bounded
                if w.suppressed:
                    out.append(self._summary(category, w))
        return out

    def flush(self) -> list[Suppressed]:
        """Every pending summary now, windows open or not (used at shutdown)."""
        out, self._ready = self._ready, []
        for category, w in self._windows.items():
            if w.suppressed:
                out.append(self._summary(category, w))
                w.suppressed = 0
        return out

    def pending(self) -> dict[str, int]:
        """Alerts suppressed so far in the open windows, per category."""
        counts = {c: w.suppressed for c, w in self._windows.items() if w.suppressed}
        for s in self._ready:
            counts[s.category] = counts.get(s.category, 0) + s.count
        return counts

    def _summary(self, category: str, w: _Window) -> Suppressed:
        return Suppressed(category=category, count=w.suppressed, max_severity=w.max_severity,
                          window_s=self.window_s, first_title=w.first_title,
                          last_title=w.last_title)
