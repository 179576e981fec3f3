"""Grouping subband files into observations and deciding when a group is ready.

A file joins the group whose anchor (the timestamp of the group's first file) lies within
``group_tolerance_s`` of its own timestamp; otherwise it anchors a new group. Anchors live in
the queue, so after a restart the same files land in the same groups. When the group is
complete the queue names it by its canonical time (the timestamp most of its files carry),
so a jittered or stray file that arrived first does not name it.

A file is complete when its (inode, size, mtime) has not changed for ``stable_seconds`` and its
UVH5 header opens (headers only, never the visibilities). A file whose header still fails one
more ``stable_seconds`` later, unchanged, is declared unreadable: a writer that pauses longer
than ``stable_seconds`` in the middle of a file then gets a second chance instead of having its
group quarantined under it.

The stability clock starts at the moment a change is known to have happened: after the previous
observation and no later than now, and at the file's mtime when that falls between the two.
So a file found complete at start-up is not made to wait again, and a missed event costs no
latency. Durations (stability, group timeouts, retries) run on the monotonic clock; the wall
clock only converts a file's mtime and a group's stored creation time once, so a step of the
wall clock moves nothing by more than the step.

Every filesystem call goes through the input mount's :class:`FsGate`. A tracked file that is
gone while its directory is gone too, or is an empty directory on another filesystem (the
input mount went away, leaving the bare mount point), or while the mount hangs or its server
does not answer (ESTALE, EIO, ETIMEDOUT...), is *unavailable*, not vanished:
its group keeps it and its timeout pauses until the mount is back, and the file is taken up
again when it reappears.

Everything runs in one task: the watcher only enqueues paths (:meth:`Grouper.submit`), so no
state here is shared between coroutines.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ..alerting.alert import Alert, Severity
from ..config import IngestOptions
from ..conversion.validate import check_uvh5_header
from ..errors import IllegalTransition
from ..products import InvalidName, group_id_for, group_time, parse_subband_name
from .fsgate import FsGate, MountHung
from .queue import DuplicateSubband, GroupQueue

log = structlog.get_logger(__name__)

__all__ = ["Grouper"]

Signature = tuple[int, int, int]  # (inode, size, mtime_ns)
_MTIME_EPS = 1e-3
_MTIME_TICK = 0.02
_MAX_IGNORED = 10_000
_ADOPT_EVERY_S = 5.0


def _signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


_UNAVAILABLE = "unavailable"
# what a network mount answers while its server is away (a soft NFS mount, a restarted server)
_MOUNT_AWAY = frozenset({errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.ENOTCONN,
                         errno.EHOSTDOWN, errno.EHOSTUNREACH})


def _stat_files(paths: list[Path], input_dev: int | None
                ) -> list[os.stat_result | str | None]:
    """Blocking, on the input mount's gate: each path stats to its stat_result, None (gone:
    its directory is there and is the input filesystem), ``_UNAVAILABLE`` (the mount is away:
    its directory is gone, or is an empty directory on another device than the input's, the
    bare mount point; or the server does not answer), or an error text."""
    mounted: dict[Path, bool] = {}
    out: list[os.stat_result | str | None] = []
    for path in paths:
        try:
            out.append(path.stat())
            continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            out.append(_UNAVAILABLE if exc.errno in _MOUNT_AWAY else str(exc))
            continue
        if path.parent not in mounted:
            mounted[path.parent] = _is_mounted(path.parent, input_dev)
        out.append(None if mounted[path.parent] else _UNAVAILABLE)
    return out


def _is_mounted(directory: Path, input_dev: int | None) -> bool:
    """The directory is the input filesystem: on its device, or (a remount may change the
    device number; unknown before any file was seen) not empty."""
    try:
        st = directory.stat()
        if input_dev is not None and st.st_dev == input_dev:
            return True
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


@dataclass
class _File:
    path: Path
    group_id: str
    subband: int
    sig: Signature | None = None
    # monotonic times: the current signature has held since at least changed_at
    changed_at: float = 0.0
    seen_at: float = float("-inf")
    verified: bool = False
    bad_since: float | None = None
    bad_reason: str | None = None
    stat_error: str | None = None
    unavailable: bool = False

    def observe(self, st: os.stat_result, now: float, wall: float) -> bool:
        """Record a stat at monotonic ``now`` (wall time ``wall``); True when the file
        changed since the last one."""
        sig = _signature(st)
        self.unavailable = False
        changed = sig != self.sig
        if changed:
            # Kernels stamp mtime from a coarse clock (one tick, a few ms, behind): pad it.
            mtime = now - max(0.0, wall - (sig[2] / 1e9 + _MTIME_TICK))
            self.changed_at = max(self.seen_at, min(now, mtime))
            self.sig = sig
            self.verified = False
            self.bad_since = self.bad_reason = None
        self.seen_at = now
        return changed


@dataclass
class _Group:
    group_id: str
    created: float  # monotonic; paused time (input unavailable) is added to it
    files: dict[int, _File] = field(default_factory=dict)
    paused_since: float | None = None  # monotonic: since when its input is unavailable


class Grouper:
    """Turns file sightings into queue groups; the only writer of groups in ``collecting``."""

    def __init__(self, queue: GroupQueue, options: IngestOptions,
                 emit: Callable[[Alert], None] | None = None,
                 on_ready: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, fs: FsGate | None = None) -> None:
        self.queue = queue
        self.options = options
        self._emit = emit
        self._on_ready = on_ready
        self._clock = clock
        self._wall = wall
        self._fs = fs or FsGate("input", Path("."))
        self._inbox: asyncio.Queue[Path] = asyncio.Queue()
        self._groups: dict[str, _Group] = {}
        self._files: dict[Path, _File] = {}
        self._ignored: set[str] = set()
        self._busy = False
        # Paths whose handling failed (e.g. the database locked past its busy timeout): the
        # watcher forwards a path only once per signature, so without a retry the file would
        # be dropped from its group. path -> (when to retry, backoff)
        self._retry: dict[Path, tuple[float, float]] = {}
        self._next_adopt = 0.0
        self._input_dev: int | None = None  # the input filesystem's device, once a file is seen

    # ----------------------------------------------------------------- inputs
    def submit(self, path: Path) -> None:
        """Hand over a path that appeared, changed or vanished; never blocks."""
        self._inbox.put_nowait(Path(path))

    def idle(self) -> bool:
        """Nothing queued, nothing being placed, no group still collecting in memory."""
        return self._inbox.empty() and not self._busy and not self._groups and not self._retry

    async def run(self, stop_event: asyncio.Event) -> None:
        """Restore open groups, then react to sightings and re-check files until stopped."""
        self._busy = True
        try:
            await self.restore()
        finally:
            self._busy = False
        stop_wait = asyncio.ensure_future(stop_event.wait())
        try:
            while not stop_event.is_set():
                get = asyncio.ensure_future(self._inbox.get())
                await asyncio.wait({get, stop_wait}, timeout=self._next_wakeup(),
                                   return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    paths = []
                else:
                    paths = [get.result()]
                while not self._inbox.empty():
                    paths.append(self._inbox.get_nowait())
                now = self._clock()
                paths += [p for p, (due, _) in self._retry.items() if due <= now]
                self._busy = True
                try:
                    for path in dict.fromkeys(paths):
                        backoff = self._retry.pop(path, (0.0, 0.0))[1]
                        if not await self._guarded(self.handle(path), "ingest.handle_failed",
                                                   path=str(path)):
                            backoff = min(60.0, max(1.0, 2 * backoff))
                            self._retry[path] = (self._clock() + backoff, backoff)
                    await self._guarded(self.check(), "ingest.check_failed")
                    if self._clock() >= self._next_adopt:
                        self._next_adopt = self._clock() + _ADOPT_EVERY_S
                        await self._guarded(self.adopt(), "ingest.adopt_failed")
                finally:
                    self._busy = False
        finally:
            stop_wait.cancel()

    async def _guarded(self, coro: Awaitable[None], event: str, **kw: object) -> bool:
        """One bad file or a transient DB error must not stop ingest for every later group."""
        try:
            await coro
        except (sqlite3.OperationalError, MountHung) as exc:  # passing: no traceback, retried
            log.error(event, error=f"{type(exc).__name__}: {exc}", **kw)
            return False
        except Exception:
            log.exception(event, **kw)
            return False
        return True

    def _next_wakeup(self) -> float:
        now = self._clock()
        opt = self.options
        deadlines = [now + opt.poll_interval_s]
        for f in self._files.values():
            if not f.verified and not f.unavailable and f.sig is not None:
                deadlines.append(f.changed_at + opt.stable_seconds)
                if f.bad_since is not None:
                    deadlines.append(f.bad_since + opt.stable_seconds)
        for g in self._groups.values():
            if g.paused_since is None:  # a paused group waits for its mount, not a deadline
                deadlines.append(g.created + opt.group_timeout_s)
        deadlines.extend(due for due, _ in self._retry.values())
        return max(0.01, min(deadlines) - now)

    async def restore(self) -> None:
        """Pick up groups that were still collecting when the daemon stopped."""
        for row in await self.queue.list_groups(states=["collecting"], limit=100_000):
            group = self._groups.setdefault(row["id"], _Group(row["id"],
                                                              self._since(row["created"])))
            for sb, rec in (await self.queue.file_records(row["id"])).items():
                f = _File(rec.path, row["id"], sb)
                group.files[sb] = f
                self._files[rec.path] = f
        if self._groups:
            log.info("ingest.restored", groups=sorted(self._groups), files=len(self._files))

    async def adopt(self) -> None:
        """Take up groups put back to ``collecting`` from outside (an operator's requeue of a
        group stopped at ingest) and look in the input directory for their files again."""
        rows = [r for r in await self.queue.list_groups(states=["collecting"], limit=100_000)
                if r["id"] not in self._groups]
        if not rows:
            return
        names = await self._fs.call(os.listdir, self._fs.path)  # first: a hung mount retries
        for row in rows:
            group = self._groups[row["id"]] = _Group(row["id"], self._clock())
            log.info("ingest.group_adopted", group_id=row["id"],
                     reason="back in collecting (requeued): looking for its files again")
            for sb, rec in (await self.queue.file_records(row["id"])).items():
                group.files[sb] = self._files[rec.path] = _File(rec.path, row["id"], sb)
        await self._look_for_files({r["id"]: r["anchor"] for r in rows}, names)

    async def _look_for_files(self, anchors: dict[str, float],
                              names: list[str] | None = None) -> None:
        """Handle every subband file in the input directory stamped within the tolerance of
        one of these groups' anchors."""
        if names is None:
            names = await self._fs.call(os.listdir, self._fs.path)
        tol = self.options.group_tolerance_s
        for name in names:
            try:
                parsed = parse_subband_name(name)
            except InvalidName:
                continue
            stamp = parsed.timestamp.timestamp()
            if any(abs(stamp - anchor) <= tol for anchor in anchors.values()):
                await self.handle(self._fs.path / name)

    # ----------------------------------------------------------------- one sighting
    async def handle(self, path: Path) -> None:
        """Place one file: track it, attach it to its group, or explain why not."""
        path = Path(path)
        try:
            parsed = parse_subband_name(path.name)
        except InvalidName as exc:
            if path.name not in self._ignored:
                self._remember_ignored(path.name)
                log.debug("ingest.ignored_name", path=str(path), reason=exc.reason)
            return
        tracked = self._files.get(path)
        (got,) = await self._fs.call(_stat_files, [path], self._input_dev)
        now, wall = self._clock(), self._wall()
        if isinstance(got, str) and got != _UNAVAILABLE:
            raise OSError(f"cannot stat {path}: {got}")
        st = got if isinstance(got, os.stat_result) else None
        if st is not None:
            self._input_dev = st.st_dev
        if tracked is not None:
            if got is None:
                await self._vanished(tracked)
            elif got == _UNAVAILABLE:
                tracked.unavailable = True
            elif st is not None and tracked.observe(st, now, wall):
                log.debug("ingest.file_changed", path=str(path), size=st.st_size)
            return
        if st is None:
            return
        if parsed.subband >= self.options.expected_subbands:
            if path.name not in self._ignored:
                self._remember_ignored(path.name)
                log.warning("ingest.subband_out_of_range", path=str(path),
                            reason=f"sb{parsed.subband:02d} is not below the expected "
                                   f"{self.options.expected_subbands} subbands")
            return

        tol = self.options.group_tolerance_s
        group_id = await self.queue.find_group_for(parsed.timestamp, tol)
        if group_id is None:
            group_id = group_id_for(parsed.timestamp)
            if await self.queue.create_group(group_id, now=wall):
                log.info("ingest.group_created", group_id=group_id, first_file=path.name)
        state = await self.queue.group_state(group_id)
        if state != "collecting":
            await self._closed_group_file(group_id, state or "unknown", parsed.subband, path, st)
            return
        try:
            await self.queue.record_file(group_id, parsed.subband, path, st.st_size, st.st_mtime)
        except DuplicateSubband as exc:
            await self._quarantine(group_id, str(exc), files=list(exc.files))
            return
        group = self._groups.get(group_id)
        if group is None:
            info = await self.queue.get_group(group_id)
            group = self._groups[group_id] = _Group(group_id, self._since(info["created"]))
        f = _File(path, group_id, parsed.subband)
        f.observe(st, now, wall)
        group.files[parsed.subband] = f
        self._files[path] = f
        log.debug("ingest.file_added", group_id=group_id, path=path.name, size=st.st_size)

    async def _closed_group_file(self, group_id: str, state: str, subband: int, path: Path,
                                 st: os.stat_result) -> None:
        """A file for a group that already left ``collecting``: explain, never reopen it."""
        if state in ("quarantined", "failed"):
            log.debug("ingest.file_for_stopped_group", group_id=group_id, state=state,
                      path=path.name)
            return
        known = (await self.queue.file_records(group_id)).get(subband)
        if known is not None and known.path == path:
            if known.size == st.st_size and abs(known.mtime - st.st_mtime) < _MTIME_EPS:
                log.debug("ingest.already_queued", group_id=group_id, path=path.name)
                return
            reason = (f"{path.name} changed after group {group_id} was queued "
                      f"(now {state}); the change is not picked up")
        elif known is not None:
            reason = (f"duplicate subband sb{subband:02d} for group {group_id}: {known.path} "
                      f"and {path}")
            if state == "pending":  # nothing has read the group yet: stop it before it runs
                await self._quarantine(group_id, reason, files=[str(known.path), str(path)])
                return
            reason += f" (group already {state}; the new file is ignored)"
        else:
            reason = (f"late file {path.name}: group {group_id} is already {state}; "
                      "the file is not added")
        log.warning("ingest.late_file", group_id=group_id, path=str(path), reason=reason)
        self._alert("Late or changed subband file", reason, group_id=group_id, path=str(path))

    async def _vanished(self, f: _File) -> None:
        group = self._groups.get(f.group_id)
        self._files.pop(f.path, None)
        if group is not None and group.files.get(f.subband) is f:
            del group.files[f.subband]
            try:
                await self.queue.remove_file(f.group_id, f.subband)
            except IllegalTransition:
                pass
        log.warning("ingest.file_vanished", group_id=f.group_id, path=str(f.path),
                    reason="file disappeared before its group was queued")

    # ----------------------------------------------------------------- periodic check
    async def check(self) -> None:
        """Re-stat tracked files, verify the stable ones, and close complete or late groups."""
        stable = self.options.stable_seconds
        files = list(self._files.values())
        try:
            got = await self._fs.call(_stat_files, [f.path for f in files], self._input_dev)
        except MountHung:
            got = [_UNAVAILABLE] * len(files)
        now, wall = self._clock(), self._wall()
        for f, st in zip(files, got, strict=True):
            if st is None:
                await self._vanished(f)
            elif st == _UNAVAILABLE:
                f.unavailable = True
            elif isinstance(st, str):  # e.g. permissions, a stale NFS handle: say so once
                if f.stat_error != st:
                    f.stat_error = st
                    log.warning("ingest.stat_failed", path=str(f.path), error=st)
            else:
                f.stat_error = None
                self._input_dev = st.st_dev
                f.observe(st, now, wall)
        resumed = self._pause_or_resume(now)
        if resumed:  # files written while the mount was away sent no event: look for them
            await self._look_for_files({g: group_time(g).timestamp() for g in resumed})
        for f in list(self._files.values()):
            if (f.verified or f.unavailable or f.path not in self._files
                    or now - f.changed_at < stable):
                continue
            if f.bad_since is not None and now - f.bad_since < stable:
                continue
            sig = f.sig
            try:
                reason = await self._fs.call(check_uvh5_header, f.path)
            except MountHung:
                break  # the mount hangs: nothing more to read now; groups pause next pass
            if f.sig != sig or f.path not in self._files:
                continue  # changed while we looked; the next pass decides
            if reason is None and sig is not None:
                f.verified = True
                try:
                    await self.queue.record_file(f.group_id, f.subband, f.path, sig[1],
                                                 sig[2] / 1e9)
                except IllegalTransition as exc:
                    self._moved_on(f.group_id, exc)
                    continue
                log.debug("ingest.file_complete", group_id=f.group_id, path=f.path.name)
            elif f.bad_since is None:
                f.bad_since, f.bad_reason = self._clock(), reason
                log.info("ingest.header_not_readable_yet", path=str(f.path), reason=reason)
            else:
                await self._quarantine(
                    f.group_id, f"{f.path.name} is unreadable after it stopped growing: {reason}",
                    files=[str(f.path)])
        now = self._clock()
        for group in list(self._groups.values()):
            try:
                await self._decide(group, now)
            except IllegalTransition as exc:
                self._moved_on(group.group_id, exc)

    def _moved_on(self, group_id: str, exc: IllegalTransition) -> None:
        """Someone else (an operator, via the CLI or API) took the group out of collecting."""
        log.warning("ingest.group_left_collecting", group_id=group_id, error=str(exc))
        self._forget(group_id)

    def _since(self, wall_time: float) -> float:
        """A stored wall-clock time as a monotonic one (no earlier than now minus its age)."""
        return self._clock() - max(0.0, self._wall() - wall_time)

    def _pause_or_resume(self, now: float) -> list[str]:
        """A group with unavailable files pauses (no timeout) until they are back; the pause
        is added to its age. Returns the groups that resumed."""
        resumed = []
        for group in self._groups.values():
            away = [f for f in group.files.values() if f.unavailable]
            if away and group.paused_since is None:
                group.paused_since = now
                log.warning("ingest.input_unavailable", group_id=group.group_id,
                            files=[f.path.name for f in away],
                            reason="input mount gone or hung: the group waits for it")
            elif not away and group.paused_since is not None:
                paused = now - group.paused_since
                group.created += paused
                group.paused_since = None
                log.info("ingest.input_back", group_id=group.group_id,
                         paused_s=round(paused, 1))
                resumed.append(group.group_id)
        return resumed

    async def _decide(self, group: _Group, now: float) -> None:
        if group.paused_since is not None:
            return
        opt = self.options
        expected = range(opt.expected_subbands)
        done = [sb for sb in expected if sb in group.files and group.files[sb].verified]
        if len(done) == opt.expected_subbands:
            await self._ready(group, None)
            return
        waited = now - group.created
        if waited < opt.group_timeout_s:
            return
        missing = [sb for sb in expected if sb not in group.files]
        unfinished = [sb for sb in group.files if sb not in done]
        what = (f"{len(done)}/{opt.expected_subbands} subbands complete after {waited:.0f} s"
                + (f"; missing {_sbs(missing)}" if missing else "")
                + (f"; not complete {_sbs(unfinished)}" if unfinished else ""))
        if opt.timeout_policy == "process" and len(done) >= opt.min_subbands:
            for sb in unfinished:
                await self.queue.remove_file(group.group_id, sb)
            reason = f"timed out, processing anyway: {what}"
            await self.queue.set_flag(group.group_id, "incomplete", reason)
            self._alert("Group processed incomplete", f"group {group.group_id}: {reason}",
                        group_id=group.group_id, subbands=done)
            await self._ready(group, reason)
        else:
            rule = (f"policy 'process' needs at least {opt.min_subbands}"
                    if opt.timeout_policy == "process" else "policy 'quarantine'")
            await self._quarantine(group.group_id, f"timed out: {what} ({rule})")

    async def _ready(self, group: _Group, reason: str | None) -> None:
        gid = await self.queue.mark_ready(group.group_id, reason)
        self._forget(group.group_id)
        log.info("ingest.group_ready", group_id=gid, subbands=len(group.files), note=reason,
                 **({"first_named": group.group_id} if gid != group.group_id else {}))
        if self._on_ready is not None:
            self._on_ready(gid)

    async def _quarantine(self, group_id: str, reason: str, **context: object) -> None:
        try:
            named = await self.queue.quarantine(group_id, reason)
        except IllegalTransition as exc:  # someone else moved it on; say so and carry on
            log.warning("ingest.quarantine_refused", group_id=group_id, reason=reason,
                        error=str(exc))
            return
        finally:
            self._forget(group_id)
        log.warning("ingest.group_quarantined", group_id=named, reason=reason)
        self._alert("Group quarantined at ingest", f"group {named}: {reason}",
                    group_id=named, **context)

    def _remember_ignored(self, name: str) -> None:
        if len(self._ignored) >= _MAX_IGNORED:  # bounded: a junk-filled directory must not leak
            self._ignored.clear()
        self._ignored.add(name)

    def _forget(self, group_id: str) -> None:
        group = self._groups.pop(group_id, None)
        if group is not None:
            for f in group.files.values():
                self._files.pop(f.path, None)

    def _alert(self, title: str, message: str, **context: object) -> None:
        if self._emit is None:
            return
        try:
            self._emit(Alert(Severity.WARNING, "ingest", title, message, dict(context)))
        except Exception:  # alerting trouble must never stall ingest
            log.exception("ingest.alert_failed", title=title)


def _sbs(subbands: list[int]) -> str:
    return ", ".join(f"sb{sb:02d}" for sb in sorted(subbands))
