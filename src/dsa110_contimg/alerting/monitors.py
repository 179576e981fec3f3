"""System monitors: disk, tmpfs, queue backlog, stuck groups, calibration age, and the
calibration outlook (gaps ahead, :class:`CalibrationOutlookMonitor`).

Each condition alerts once when it starts, once more if it escalates WARNING -> CRITICAL,
and once (INFO, "Cleared: ...") when it clears; nothing in between, however often the
monitor runs. Two kinds of hysteresis stop flapping: a condition that has been CRITICAL and
eases back to WARNING stays quiet (re-crossing CRITICAL does not alert again), and it only
clears once the value is ``hysteresis_pct`` percent of the warning threshold back on the
good side. The state lives in memory, so a restart re-announces what still holds.

Filesystem probes (``statvfs``) run in a thread with a timeout: a hung NFS mount becomes an
alert instead of a frozen event loop, and a probe still hung from the previous round is not
started again.

GB here means 10^9 bytes (as ``df -H``); thresholds may be fractional. The watched directory
named ``state`` (queue database, backups, CASA logs: often the small root filesystem) has its
own thresholds (``state_disk_warn_gb``/``state_disk_crit_gb``); a filesystem holding several
watched directories is graded against the highest of their thresholds.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import structlog

from .alert import Alert, Severity
from .options import MonitorOptions

log = structlog.get_logger(__name__)

GB = 1e9
STATE_DISK = "state"  # the watched name that takes the state-disk thresholds


class QueueStats(TypedDict, total=False):
    """What ``queue_stats()`` must return (extra keys are ignored).

    ``waiting``: groups ready and waiting for a worker; the backlog check compares it with
    ``queue_depth_warn`` (skipped, with one log line, if absent).
    ``oldest_active_age_s``: for each ACTIVE (in-progress) state that holds groups, how long
    the oldest of them has been in it; an active state missing here counts as empty.
    ``oldest_active_group``: optional, the id of that oldest group, named in the alert.
    ``counts``: groups per state; reported as context only.
    """

    counts: dict[str, int]
    waiting: int
    oldest_active_age_s: dict[str, float]
    oldest_active_group: dict[str, str]


@dataclass
class Reading:
    """One evaluated condition: ``level`` None means fine."""

    key: str
    category: str
    level: Severity | None
    title: str
    clear_title: str
    message: str
    context: dict[str, Any] = field(default_factory=dict)


class ProbeHung(Exception):
    """A filesystem probe did not answer within ``probe_timeout_s``."""


def grade(value: float, warn: float, crit: float | None, *, higher_is_worse: bool,
          held: Severity | None, hysteresis: float) -> Severity | None:
    """Level of ``value`` against thresholds; a raised condition (``held``) clears only past
    the warning threshold moved by ``hysteresis`` (a fraction) towards the good side."""
    def beyond(limit: float) -> bool:
        return value > limit if higher_is_worse else value < limit

    if crit is not None and beyond(crit):
        return Severity.CRITICAL
    if beyond(warn):
        return Severity.WARNING
    if held is None:
        return None
    clear_at = warn * (1 - hysteresis) if higher_is_worse else warn * (1 + hysteresis)
    return held if beyond(clear_at) else None


def _disk_probe(path: Path) -> tuple[int, int, int, int]:
    """(device, total, used, free-for-unprivileged) bytes; blocking, run in a thread."""
    usage = shutil.disk_usage(path)
    return os.stat(path).st_dev, usage.total, usage.used, usage.free


def _settle(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark as retrieved: a late failure of an abandoned probe is expected


class SystemMonitor:
    """Periodic checks that emit alerts on state changes only.

    ``watched`` names directories whose filesystem's free space matters (input, scratch,
    output, state); paths on one filesystem share one condition. ``tmpfs`` is checked for use %.
    ``queue_stats`` returns a ``QueueStats`` dict; ``calibration_age_h`` the age in hours of
    the newest calibration set, or None when there is none yet (no alert: the scheduler
    reports missing calibration itself).
    """

    def __init__(self, options: MonitorOptions, watched: dict[str, Path],
                 tmpfs: Path | None = None, emit: Callable[[Alert], None] | None = None,
                 queue_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                 calibration_age_h: Callable[[], Awaitable[float | None]] | None = None) -> None:
        self._o = options
        self._watched = {name: Path(p) for name, p in watched.items()}
        self._tmpfs = Path(tmpfs) if tmpfs is not None else None
        self._emit = emit
        self._queue_stats = queue_stats
        self._cal_age = calibration_age_h
        self._h = options.hysteresis_pct / 100.0
        self._state: dict[str, Severity] = {}
        self._probes: dict[str, asyncio.Future[Any]] = {}
        self._said_no_waiting = False

    def active(self) -> dict[str, str]:
        """Raised conditions, ``{key: severity}``, for the status API."""
        return {k: v.name for k, v in self._state.items()}

    async def run(self, stop_event: asyncio.Event) -> None:
        """Check every ``interval_s`` (start to start) until ``stop_event`` is set."""
        loop = asyncio.get_running_loop()
        while not stop_event.is_set():
            started = loop.time()
            try:
                await self.check_once()
            except Exception:
                log.exception("monitor_check_failed")
            delay = max(0.0, self._o.interval_s - (loop.time() - started))
            try:
                await asyncio.wait_for(stop_event.wait(), delay)
            except TimeoutError:
                pass

    async def check_once(self) -> list[Alert]:
        """Run every check once; returns the alerts emitted (state changes only)."""
        results = await asyncio.gather(self._disk_readings(), self._tmpfs_readings(),
                                       self._queue_readings(), self._cal_readings(),
                                       return_exceptions=True)
        alerts: list[Alert] = []
        for res in results:
            if isinstance(res, BaseException):
                log.error("monitor_check_failed", error=f"{type(res).__name__}: {res}")
                continue
            for reading in res:
                alert = self._update(reading)
                if alert is not None:
                    alerts.append(alert)
        return alerts

    # ------------------------------------------------------------------ state machine
    def _update(self, r: Reading) -> Alert | None:
        prev = self._state.get(r.key)
        if r.level is None:
            if prev is None:
                return None
            del self._state[r.key]
            alert = Alert(Severity.INFO, r.category, f"Cleared: {r.clear_title}", r.message,
                          {**r.context, "condition": r.key, "was": prev.name})
        elif prev is None or r.level > prev:
            self._state[r.key] = r.level
            alert = Alert(r.level, r.category, r.title, r.message,
                          {**r.context, "condition": r.key})
        else:
            return None
        if self._emit is not None:
            try:
                self._emit(alert)
            except Exception:
                log.exception("monitor_emit_failed", condition=r.key)
        return alert

    def _grade(self, key: str, value: float, warn: float, crit: float | None,
               higher_is_worse: bool) -> Severity | None:
        return grade(value, warn, crit, higher_is_worse=higher_is_worse,
                     held=self._state.get(key), hysteresis=self._h)

    async def _probe(self, key: str, path: Path) -> tuple[int, int, int, int]:
        prev = self._probes.get(key)
        if prev is not None and not prev.done():
            raise ProbeHung
        fut = asyncio.get_running_loop().run_in_executor(None, _disk_probe, path)
        fut.add_done_callback(_settle)
        self._probes[key] = fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self._o.probe_timeout_s)
        except TimeoutError:
            raise ProbeHung from None

    def _probe_failure(self, key: str, category: str, what: str, path: Path,
                       exc: BaseException | None) -> Reading:
        ok = exc is None
        if isinstance(exc, ProbeHung):
            why = f"no answer within {self._o.probe_timeout_s:g} s (hung mount?)"
        elif exc is not None:
            why = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
        else:
            why = "readable again"
        return Reading(key=f"{key}_probe", category=category,
                       level=None if ok else Severity.WARNING,
                       title=f"Cannot measure {what} ({path})",
                       clear_title=f"{what} ({path}) can be measured again",
                       message=f"{what} at {path}: {why}", context={"path": str(path)})

    # ------------------------------------------------------------------ checks
    async def _disk_readings(self) -> list[Reading]:
        names = list(self._watched)
        results = await asyncio.gather(*(self._probe(f"disk:{n}", self._watched[n]) for n in names),
                                       return_exceptions=True)
        readings: list[Reading] = []
        by_dev: dict[int, list[tuple[str, int]]] = {}
        for name, res in zip(names, results, strict=True):
            path = self._watched[name]
            if isinstance(res, BaseException):
                readings.append(self._probe_failure(f"disk:{name}", "disk",
                                                    f"free space of {name}", path, res))
                continue
            readings.append(self._probe_failure(f"disk:{name}", "disk",
                                                f"free space of {name}", path, None))
            dev, _, _, free = res
            by_dev.setdefault(dev, []).append((name, free))
        for dev, members in by_dev.items():
            label = ", ".join(n for n, _ in members)
            paths = ", ".join(str(self._watched[n]) for n, _ in members)
            free_gb = min(f for _, f in members) / GB
            key = f"disk:dev{dev}"
            warn_gb = max(self._limits(n)[0] for n, _ in members)
            crit_gb = max(self._limits(n)[1] for n, _ in members)
            level = self._grade(key, free_gb, warn_gb, crit_gb, False)
            limit = crit_gb if level == Severity.CRITICAL else warn_gb
            readings.append(Reading(
                key=key, category="disk", level=level,
                title=f"Low disk space on {label}: {free_gb:.3g} GB free",
                clear_title=f"disk space on {label} recovered: {free_gb:.3g} GB free",
                message=(f"{free_gb:.3g} GB free on the filesystem holding {paths} "
                         f"(threshold {limit:g} GB)." if level else
                         f"{free_gb:.3g} GB free on the filesystem holding {paths}."),
                context={"paths": paths, "free_gb": round(free_gb, 4),
                         "warn_gb": warn_gb, "crit_gb": crit_gb}))
        return readings

    def _limits(self, name: str) -> tuple[float, float]:
        """(warn, crit) free-space thresholds in GB of one watched directory."""
        o = self._o
        if name == STATE_DISK:
            return o.state_disk_warn_gb, o.state_disk_crit_gb
        return o.disk_warn_gb, o.disk_crit_gb

    async def _tmpfs_readings(self) -> list[Reading]:
        if self._tmpfs is None:
            return []
        path, o = self._tmpfs, self._o
        try:
            _, total, used, free = await self._probe("tmpfs", path)
        except Exception as exc:
            return [self._probe_failure("tmpfs", "tmpfs", "tmpfs use", path, exc)]
        pct = 100.0 * used / total if total else 100.0
        level = self._grade("tmpfs", pct, o.tmpfs_warn_pct, o.tmpfs_crit_pct, True)
        return [self._probe_failure("tmpfs", "tmpfs", "tmpfs use", path, None), Reading(
            key="tmpfs", category="tmpfs", level=level,
            title=f"tmpfs {path} {pct:.0f}% full",
            clear_title=f"tmpfs {path} back to {pct:.0f}% full",
            message=(f"tmpfs {path} is {pct:.1f}% full ({free / GB:.3g} GB free); staging "
                     "falls back to scratch disk when it has no room."),
            context={"path": str(path), "used_pct": round(pct, 2),
                     "free_gb": round(free / GB, 4), "warn_pct": o.tmpfs_warn_pct,
                     "crit_pct": o.tmpfs_crit_pct})]

    async def _queue_readings(self) -> list[Reading]:
        if self._queue_stats is None:
            return []
        try:
            stats = await asyncio.wait_for(self._queue_stats(), self._o.probe_timeout_s)
        except Exception as exc:
            log.warning("monitor_probe_failed", probe="queue_stats", error=type(exc).__name__)
            return []
        o = self._o
        readings: list[Reading] = []
        counts = dict(stats.get("counts") or {})
        waiting = stats.get("waiting")
        if waiting is None:
            if not self._said_no_waiting:
                log.warning("monitor_queue_stats_incomplete", missing="waiting",
                            hint="queue_stats() must return QueueStats; backlog check skipped")
                self._said_no_waiting = True
        else:
            level = self._grade("queue_depth", float(waiting), o.queue_depth_warn, None, True)
            readings.append(Reading(
                key="queue_depth", category="queue", level=level,
                title=f"Queue backlog: {waiting} groups waiting",
                clear_title=f"queue backlog down to {waiting} groups waiting",
                message=(f"{waiting} groups are waiting for a worker (threshold "
                         f"{o.queue_depth_warn}); the pipeline is falling behind real time."
                         if level else f"{waiting} groups waiting."),
                context={"waiting": waiting, "warn": o.queue_depth_warn, "counts": counts}))
        ages = dict(stats.get("oldest_active_age_s") or {})
        groups = dict(stats.get("oldest_active_group") or {})
        states = set(ages) | {k.split(":", 1)[1] for k in self._state if k.startswith("stuck:")}
        for state in sorted(states):
            age = float(ages.get(state, 0.0))
            key = f"stuck:{state}"
            level = self._grade(key, age, o.stuck_after_s, None, True)
            ctx: dict[str, Any] = {"state": state, "age_s": round(age, 1),
                                   "stuck_after_s": o.stuck_after_s}
            if state in groups:
                ctx["group"] = groups[state]
            who = f"group {groups[state]}" if state in groups else "a group"
            readings.append(Reading(
                key=key, category="queue", level=level,
                title=f"Group stuck in {state} for {age / 60:.0f} min",
                clear_title=f"no group stuck in {state} any more",
                message=(f"{who} has been in state {state} for {age:.0f} s "
                         f"(limit {o.stuck_after_s:g} s)." if level else
                         f"oldest group in {state}: {age:.0f} s."),
                context=ctx))
        return readings

    async def _cal_readings(self) -> list[Reading]:
        if self._cal_age is None:
            return []
        try:
            age_h = await asyncio.wait_for(self._cal_age(), self._o.probe_timeout_s)
        except Exception as exc:
            log.warning("monitor_probe_failed", probe="calibration_age", error=type(exc).__name__)
            return []
        if age_h is None:
            return []
        o = self._o
        level = self._grade("cal_age", float(age_h), o.cal_age_warn_h, None, True)
        return [Reading(
            key="cal_age", category="calibration", level=level,
            title=f"Calibration is {age_h:.1f} h old",
            clear_title=f"calibration refreshed ({age_h:.1f} h old)",
            message=(f"The newest calibration set is {age_h:.1f} h old (limit "
                     f"{o.cal_age_warn_h:g} h); no calibrator transit has been solved since."
                     if level else f"The newest calibration set is {age_h:.1f} h old."),
            context={"age_h": round(float(age_h), 2), "warn_h": o.cal_age_warn_h})]


MJD_UNIX_EPOCH = 40587.0
_DAY_S = 86400.0


class CalibrationOutlookMonitor:
    """Warns ahead of time when groups are about to go without calibration.

    ``outlook(now_mjd)`` returns the calibration outlook as JSON (``Outlook.as_dict()``; None
    when there is nothing to say yet, e.g. no group converted, so no pointing). Each gap
    starting within ``cal_outlook_lead_h`` hours raises one WARNING in category
    ``calibration.gap``. A gap is remembered by its start rounded to the minute, and a later
    gap of the same kind that overlaps a remembered one (its start moves by minutes as the
    groups around it are solved; once it has begun the outlook sees it start "now") is the
    same gap: no repeat.
    """

    CATEGORY = "calibration.gap"
    SAME_GAP_TOLERANCE_D = 10.0 / 1440.0
    FORGET_AFTER_D = 1.0

    def __init__(self, options: MonitorOptions,
                 outlook: Callable[[float], Awaitable[dict[str, Any] | None]],
                 emit: Callable[[Alert], None] | None = None) -> None:
        self._o = options
        self._outlook = outlook
        self._emit = emit
        self._alerted: dict[str, tuple[str, float, float]] = {}  # key -> (missing, start, end)

    @staticmethod
    def gap_key(start_mjd: float) -> str:
        """The gap's identity: its start, rounded to the minute (UTC)."""
        minute = round((start_mjd - MJD_UNIX_EPOCH) * 1440.0)
        return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(minute * 60))

    async def run(self, stop_event: asyncio.Event, first_delay_s: float = 60.0) -> None:
        """Check every ``cal_outlook_interval_s`` until ``stop_event``; never raises."""
        delay = min(first_delay_s, self._o.cal_outlook_interval_s)
        while not stop_event.is_set():
            try:
                await asyncio.wait_for(stop_event.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                await self.check()
            except Exception:
                log.exception("calibration_outlook_failed")
            delay = self._o.cal_outlook_interval_s

    async def check(self, now_mjd: float | None = None) -> list[Alert]:
        """Compute the outlook at ``now_mjd`` (default: now); emit and return new alerts."""
        now = time.time() / _DAY_S + MJD_UNIX_EPOCH if now_mjd is None else float(now_mjd)
        doc = await self._outlook(now)
        self._forget(now)
        if not doc:
            return []
        lead = self._o.cal_outlook_lead_h / 24.0
        alerts = []
        for gap in doc.get("gaps") or ():
            start, end = float(gap["start_mjd"]), float(gap["end_mjd"])
            if not (math.isfinite(start) and math.isfinite(end)) or start > now + lead:
                continue
            missing = str(gap.get("missing", ""))
            if self._seen(missing, start, end):
                continue
            key = self.gap_key(start)
            self._alerted[key] = (missing, start, end)
            alert = self._alert(gap, key, doc, now)
            alerts.append(alert)
            log.warning("calibration_gap_ahead", gap_start=gap.get("start"),
                        gap_end=gap.get("end"), missing=gap.get("missing"))
            if self._emit is not None:
                try:
                    self._emit(alert)
                except Exception:
                    log.exception("monitor_emit_failed", condition=self.CATEGORY)
        return alerts

    def _seen(self, missing: str, start: float, end: float) -> bool:
        if self.gap_key(start) in self._alerted:
            return True
        tol = self.SAME_GAP_TOLERANCE_D
        for key, (kind, s0, e0) in self._alerted.items():
            if kind == missing and start <= e0 + tol and end >= s0 - tol:
                self._alerted[key] = (kind, min(s0, start), max(e0, end))
                return True
        return False

    def _forget(self, now: float) -> None:
        for key, (_, _, end) in list(self._alerted.items()):
            if end < now - self.FORGET_AFTER_D:
                del self._alerted[key]

    def _alert(self, gap: dict[str, Any], key: str, doc: dict[str, Any], now: float) -> Alert:
        start, end = gap.get("start", key), gap.get("end", "?")
        held = ("held" if (doc.get("options") or {}).get("stale_policy", "hold") == "hold"
                else "imaged uncalibrated")
        when = ("now" if gap.get("ongoing") else
                f"in {(float(gap['start_mjd']) - now) * 24.0:.1f} h")
        dec = doc.get("pointing_dec_deg")
        where = f" at dec {dec:+.2f} deg" if isinstance(dec, int | float) else ""
        return Alert(
            Severity.WARNING, self.CATEGORY,
            f"Calibration gap from {start} ({when}): no {gap.get('missing', 'calibration')}",
            f"Groups{where} from {start} to {end} will be {held}: {gap.get('reason', '')}",
            {"gap_key": key, "gap_start": start, "gap_end": end,
             "missing": gap.get("missing"), "reason": gap.get("reason"),
             "ongoing": bool(gap.get("ongoing")), "pointing_dec_deg": dec})
