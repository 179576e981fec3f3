"""The alert router: a synchronous, never-blocking ``emit`` in front of per-channel senders.

``emit`` does only in-memory work: rate limiting, the log line, and ``append`` onto one
bounded buffer per remote channel. Each remote channel has its own sender task, so a hung
Slack never delays email (and vice versa), and the pipeline never sees a channel's
exception: after the retries an alert degrades to an ERROR log event.

Lifecycle::

    router = AlertRouter(settings.alerts)
    await router.start()          # sender tasks + the suppression-summary timer
    router.emit(Alert(...))       # from anywhere, sync; safe from other threads too
    await router.stop(timeout=10) # drain what is queued, then cancel
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter, defaultdict, deque
from typing import Any

import structlog

from .alert import Alert, Severity
from .channels import Channel, DeliveryError, LogChannel, build_channels
from .options import AlertOptions
from .ratelimit import RateLimiter, Suppressed

log = structlog.get_logger(__name__)

RECENT_SIZE = 100


class _Lane:
    """One remote channel's bounded buffer and sender task."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.queue: deque[tuple[Alert, dict[str, Any]]] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.in_flight: tuple[Alert, dict[str, Any]] | None = None


def summary_alert(s: Suppressed) -> Alert:
    """The one alert that stands for a window's suppressed alerts of one category."""
    return Alert(
        severity=s.max_severity, category=s.category,
        title=f"{s.count} alerts of category {s.category} suppressed",
        message=(f"{s.count} alerts of category {s.category} suppressed in the last window "
                 f"({s.window_s:g} s); the log holds each one (event alert_suppressed)."),
        context={"suppressed": s.count, "window_s": s.window_s,
                 "first": s.first_title, "last": s.last_title},
    )


class AlertRouter:
    """Routes alerts by severity to the log, Slack and email, without ever blocking the caller."""

    def __init__(self, options: AlertOptions, *, host: str | None = None,
                 recent_size: int = RECENT_SIZE) -> None:
        self._o = options
        self._host = host or socket.gethostname()
        self._log_channel = LogChannel(Severity.parse(options.log_min_severity))
        self._lanes = [_Lane(c) for c in build_channels(options, self._host)]
        self._limiter = RateLimiter(options.rate_limit_count, options.rate_limit_window_s)
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent_size)
        self._emitted: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self._sent: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._failed: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._dropped: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._retries: Counter[str] = Counter()
        self._state = "new"  # new -> running -> stopping -> stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._timer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        names = ", ".join(["log", *(lane.channel.name for lane in self._lanes)])
        return f"AlertRouter(channels=[{names}], state={self._state})"

    @property
    def channels(self) -> list[str]:
        """Names of the active channels, the log first."""
        return ["log", *(lane.channel.name for lane in self._lanes)]

    async def __aenter__(self) -> AlertRouter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- producer side
    def emit(self, alert: Alert) -> None:
        """Queue an alert and return at once; never raises, never waits on I/O.

        Called off the loop's thread it hops onto the loop (``call_soon_threadsafe``), since
        the buffers belong to the loop.
        """
        loop = self._loop
        if (loop is not None and self._loop_thread != threading.get_ident()
                and not loop.is_closed()):
            try:
                loop.call_soon_threadsafe(self._emit, alert)
                return
            except RuntimeError:  # loop closed between the check and the call
                pass
        self._emit(alert)

    def _emit(self, alert: Alert) -> None:
        try:
            self._release_summaries()
            self._emitted[alert.category] += 1
            if not self._limiter.allow(alert.category, alert.severity, alert.title):
                self._suppressed[alert.category] += 1
                log.info("alert_suppressed", severity=alert.severity.name,
                         category=alert.category, title=alert.title)
                self._record(alert, suppressed=True)
                return
            self._dispatch(alert)
        except Exception:  # a bug here must not reach the pipeline
            log.exception("alert_emit_failed", category=getattr(alert, "category", None))

    def _record(self, alert: Alert, suppressed: bool = False,
                summary: bool = False) -> dict[str, Any]:
        entry = {**alert.as_dict(), "suppressed": suppressed, "summary": summary, "delivery": {}}
        self._recent.append(entry)
        return entry

    def _dispatch(self, alert: Alert, summary: bool = False) -> None:
        """Past the rate limit: log now, queue for each remote channel that wants it."""
        entry = self._record(alert, summary=summary)
        if self._log_channel.wants(alert):
            self._log_channel.write(alert)
            self._sent["log"][alert.category] += 1
            entry["delivery"]["log"] = "sent"
        for lane in self._lanes:
            if not lane.channel.wants(alert):
                continue
            if self._state == "stopped":
                self._drop(lane, alert, entry, "router stopped")
                continue
            if len(lane.queue) >= self._o.buffer_size:
                old_alert, old_entry = lane.queue.popleft()
                self._drop(lane, old_alert, old_entry, "buffer full")
            lane.queue.append((alert, entry))
            entry["delivery"][lane.channel.name] = "queued"
            lane.wake.set()

    def _drop(self, lane: _Lane, alert: Alert, entry: dict[str, Any], reason: str) -> None:
        name = lane.channel.name
        self._dropped[name][alert.category] += 1
        entry["delivery"][name] = "dropped"
        log.warning("alert_dropped", channel=name, reason=reason, severity=alert.severity.name,
                    category=alert.category, title=alert.title,
                    dropped_total=sum(self._dropped[name].values()))

    def _release_summaries(self) -> None:
        for s in self._limiter.due():
            self._dispatch(summary_alert(s), summary=True)

    # ---------------------------------------------------------------- sender side
    async def start(self) -> None:
        """Start one sender task per remote channel and the summary timer (idempotent)."""
        if self._state != "new":
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._state = "running"
        for lane in self._lanes:
            lane.wake = asyncio.Event()
            if lane.queue:  # alerts emitted before start
                lane.wake.set()
            lane.task = asyncio.create_task(self._sender(lane),
                                            name=f"alert-sender-{lane.channel.name}")
        self._timer = asyncio.create_task(self._summary_timer(), name="alert-summaries")

    async def stop(self, timeout: float = 10.0) -> None:
        """Flush suppression summaries, drain the buffers for up to ``timeout`` s, then cancel.

        Whatever is still queued afterwards is logged as ``alert_dropped`` (reason shutdown).
        """
        if self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        for s in self._limiter.flush():
            self._dispatch(summary_alert(s), summary=True)
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        for lane in self._lanes:
            lane.wake.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._state = "stopped"
        for lane in self._lanes:
            while lane.queue:
                self._drop(lane, *lane.queue.popleft(), "shutdown")
            try:
                await lane.channel.aclose()
            except Exception as exc:
                log.warning("alert_channel_close_failed", channel=lane.channel.name,
                            error=type(exc).__name__)

    async def _summary_timer(self) -> None:
        """Releases summaries when a window reopens even if no further alert arrives."""
        tick = min(1.0, self._o.rate_limit_window_s / 10)
        while True:
            await asyncio.sleep(tick)
            try:
                self._release_summaries()
            except Exception:
                log.exception("alert_summary_failed")

    async def _sender(self, lane: _Lane) -> None:
        while True:
            if not lane.queue:
                if self._state != "running":
                    return
                lane.wake.clear()
                await lane.wake.wait()
                continue
            lane.in_flight = lane.queue.popleft()
            try:
                await self._deliver(lane, *lane.in_flight)
            except asyncio.CancelledError:
                self._drop(lane, *lane.in_flight, "shutdown")
                raise
            except Exception:  # defensive: the sender must outlive any bug
                log.exception("alert_sender_error", channel=lane.channel.name)
            finally:
                lane.in_flight = None

    def _retry_delay(self, attempt: int, err: DeliveryError) -> float:
        if err.retry_after is not None:
            delay = err.retry_after
        else:
            delay = self._o.retry_backoff_s * (2 ** attempt)
        return min(delay, self._o.retry_max_delay_s)

    async def _deliver(self, lane: _Lane, alert: Alert, entry: dict[str, Any]) -> None:
        """Send with a per-attempt timeout and exponential backoff; log the alert on failure."""
        name = lane.channel.name
        attempts = self._o.max_retries + 1
        err = DeliveryError("not attempted", retryable=False)
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(self._o.send_timeout_s):
                    await lane.channel.send(alert)
            except DeliveryError as exc:
                err = exc
            except TimeoutError:
                err = DeliveryError(f"no answer within {self._o.send_timeout_s:g} s",
                                    retryable=True)
            except Exception as exc:  # a channel bug: report the type only, never its text
                err = DeliveryError(f"unexpected {type(exc).__name__}", retryable=False)
            else:
                self._sent[name][alert.category] += 1
                entry["delivery"][name] = "sent"
                return
            if not err.retryable or attempt + 1 >= attempts:
                break
            delay = self._retry_delay(attempt, err)
            self._retries[name] += 1
            log.info("alert_delivery_retry", channel=name, category=alert.category,
                     attempt=attempt + 1, delay_s=round(delay, 3), error=err.detail)
            await asyncio.sleep(delay)
        self._failed[name][alert.category] += 1
        entry["delivery"][name] = "failed"
        log.error("alert_delivery_failed", channel=name, error=err.detail,
                  attempts=attempt + 1, severity=alert.severity.name, category=alert.category,
                  title=alert.title, message=alert.message, context=dict(alert.context))

    # ---------------------------------------------------------------- observers
    def stats(self) -> dict[str, Any]:
        """Counters for the status API and Prometheus; plain data, no secrets.

        ``sent``/``failed``/``dropped`` are ``{channel: {category: n}}``; ``emitted`` and
        ``suppressed`` are ``{category: n}`` (rate limiting happens before any channel).
        """
        def nested(d: defaultdict[str, Counter[str]]) -> dict[str, dict[str, int]]:
            return {ch: dict(c) for ch, c in d.items()}

        channels: dict[str, dict[str, Any]] = {
            "log": {"min_severity": self._log_channel.min_severity.name, "queued": 0,
                    "in_flight": False, "retries": 0}}
        for lane in self._lanes:
            channels[lane.channel.name] = {
                "min_severity": lane.channel.min_severity.name, "queued": len(lane.queue),
                "in_flight": lane.in_flight is not None,
                "retries": self._retries[lane.channel.name]}
        return {
            "state": self._state,
            "channels": channels,
            "emitted": dict(self._emitted),
            "suppressed": dict(self._suppressed),
            "suppressed_pending": self._limiter.pending(),
            "sent": nested(self._sent),
            "failed": nested(self._failed),
            "dropped": nested(self._dropped),
            "totals": {
                "emitted": sum(self._emitted.values()),
                "suppressed": sum(self._suppressed.values()),
                "sent": sum(sum(c.values()) for c in self._sent.values()),
                "failed": sum(sum(c.values()) for c in self._failed.values()),
                "dropped": sum(sum(c.values()) for c in self._dropped.values()),
            },
        }

    def recent(self, n: int = RECENT_SIZE) -> list[dict[str, Any]]:
        """The last ``n`` alerts, newest first: ``Alert.as_dict()`` plus ``suppressed``,
        ``summary`` and ``delivery`` ({channel: queued|sent|failed|dropped})."""
        items = list(self._recent)[-n:] if n > 0 else []
        return [{**e, "context": dict(e["context"]), "delivery": dict(e["delivery"])}
                for e in reversed(items)]
