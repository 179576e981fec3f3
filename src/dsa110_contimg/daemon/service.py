"""``contimg run``: one event loop running ingest, the scheduler, monitors and the status API.

Start-up: check directories, take the state-dir lock (one daemon per state dir), clean stale
staging, build the sky catalogue from ``CONTIMG_CAL_FIELD_CATALOGUE`` when it is missing or
out of date, take back claims a dead predecessor held, then serve. Shutdown (SIGTERM/SIGINT):
stop intake, let in-flight stages finish up to a timeout, give the rest back to the queue,
kill abandoned workers (their output only ever lives in staging), close everything.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ..alerting.alert import Alert, Severity
from ..casa_env import casa_log_dir, prepare_casa
from ..config import Settings, check_directories
from ..errors import ConfigError
from .dbguard import backup_loop, guard_database
from .executor import StageExecutor, make_executor
from .fsgate import FsGate
from .metrics import Metrics, render_prometheus
from .queue import ACTIVE_STATES, RESTING_STATES, GroupQueue
from .scheduler import Scheduler, ms_storage, new_worker_id
from .sdnotify import Notifier, watchdog_interval_s, watchdog_loop
from .stages import HOLD_FLAG
from .statelogs import state_log_loop
from .supervisor import Supervisor

if TYPE_CHECKING:
    from ..catalogue import BuildReport
    from .calregistry import CalRegistry

log = structlog.get_logger(__name__)

OUTLOOK_CACHE_S = 60.0
_EXTEND_START_S = 60  # each notice during a catalogue build gives systemd this much more time


class StateLock:
    """An flock on STATE_DIR/contimg.lock: a second daemon on the same queue refuses to start."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "contimg.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"CONTIMG_STATE_DIR: another contimg daemon holds {self.path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


async def sweep_work_area(s: Settings, queue: GroupQueue) -> list[Path]:
    """Archive MSs left in the tmpfs work area by groups that are no longer in the pipeline
    (a crash between a group's end and its MS's archive); return what was archived."""
    store = ms_storage(s)
    archived = []
    for gid, ms in store.kept_groups():
        state = await queue.group_state(gid)
        if state not in ("done", "failed", "quarantined"):
            continue  # still in the pipeline; or not ours to touch
        try:
            final = await asyncio.to_thread(store.archive, gid, ms)
            if final is None:
                continue
        except Exception as exc:  # noqa: BLE001 - start-up housekeeping must not stop the daemon
            log.error("ms_archive_failed", ms=str(ms), error=str(exc))
            continue
        log.warning("ms_archived_at_startup", group_id=gid, state=state, ms=str(final))
        archived.append(final)
    return archived


async def ensure_catalogue(s: Settings, notifier: Notifier | None = None,
                           progress_s: float = 20.0) -> BuildReport | None:
    """Build ``<state_dir>/catalogue.sqlite`` from ``CONTIMG_CAL_FIELD_CATALOGUE`` unless it
    is already built from that file as it is now; None when nothing was built.

    The build runs in a thread (NVSS takes a while); meanwhile systemd is asked for more
    start-up time. A file that does not parse is a configuration error naming file and line;
    a build that fails otherwise (disk full) is logged and the daemon runs on with the
    catalogue it had, since builds replace the file atomically.
    """
    from ..catalogue import CatalogueFormatError, build_catalogue, catalogue_is_current

    name = s.calibration.field_catalogue
    if not name:
        return None
    source, db = Path(name), s.catalogue_db
    if await asyncio.to_thread(catalogue_is_current, db, [source]):
        log.info("catalogue_current", catalogue=str(db), source=str(source))
        return None
    log.info("catalogue_building", catalogue=str(db), source=str(source))
    build = asyncio.ensure_future(asyncio.to_thread(build_catalogue, db, [source]))
    try:
        while True:
            done, _ = await asyncio.wait({build}, timeout=progress_s)
            if done:
                break
            if notifier is not None:
                notifier.send(extend_timeout_usec=_EXTEND_START_S * 1_000_000,
                              status=f"building the sky catalogue from {source}")
        report = build.result()
    except CatalogueFormatError as exc:
        raise ConfigError(f"CONTIMG_CAL_FIELD_CATALOGUE: {exc}") from None
    except (OSError, sqlite3.Error) as exc:  # e.g. a full disk: the old catalogue is intact
        log.error("catalogue_build_failed", catalogue=str(db), source=str(source),
                  error=f"{type(exc).__name__}: {exc}")
        return None
    log.info("catalogue_built", catalogue=str(db), source=str(source), rows=report.rows,
             seconds=round(report.seconds, 1))
    return report


def outlook_provider(s: Settings, registry: CalRegistry, queue: GroupQueue,
                     cache_s: float = OUTLOOK_CACHE_S
                     ) -> Callable[..., Awaitable[dict[str, Any] | None]]:
    """``outlook(now_mjd=None)``: the calibration outlook (JSON) at the pointing of the newest
    converted group, or None before any group is converted. Without ``now_mjd`` (the status
    API) an answer up to ``cache_s`` old is reused: computing one takes about a second."""
    from ..calibration.outlook import gather_outlook, newest_pointing_dec
    from ..instrument import PrimaryBeam

    lock = asyncio.Lock()
    cached: dict[str, Any] = {}

    async def outlook(now_mjd: float | None = None) -> dict[str, Any] | None:
        async with lock:
            if now_mjd is None and cached and time.monotonic() - cached["at"] < cache_s:
                return cached["doc"]
            found = newest_pointing_dec(await queue.list_groups(limit=200))
            if found is None:
                return None
            dec, gid = found
            catalogue = s.catalogue_db if s.catalogue_db.is_file() else None
            o = await gather_outlook(registry, catalogue, dec, s.calibration,
                                     PrimaryBeam.from_options(s.beam), now_mjd=now_mjd,
                                     pointing_source=f"group {gid}")
            doc = o.as_dict()
            if now_mjd is None:
                cached.update(doc=doc, at=time.monotonic())
            return doc

    return outlook


async def run_daemon(settings: Settings, once: bool = False) -> int:
    s = settings
    check_directories(s.paths)
    prepare_casa(s.paths.state_dir)
    lock = StateLock(s.paths.state_dir)
    lock.acquire()
    try:
        return await _serve(s, once)
    finally:
        lock.release()



async def _queue_stats(queue: GroupQueue) -> dict[str, Any]:
    """Counts by state, the groups waiting, and the oldest claim per active state (for the
    system monitor's stuck-stage check)."""
    counts = await queue.counts()
    now = time.time()
    oldest: dict[str, float] = {}
    oldest_group: dict[str, str] = {}
    for g in await queue.list_groups(states=ACTIVE_STATES, limit=1000):
        age = now - g["updated"]
        if age > oldest.get(g["state"], -1):
            oldest[g["state"]], oldest_group[g["state"]] = age, g["id"]
    return {"counts": counts, "waiting": sum(counts[k] for k in RESTING_STATES),
            "oldest_active_age_s": oldest, "oldest_active_group": oldest_group}


@dataclass
class _Daemon:
    """The running daemon's parts, opened in order by :meth:`open` and closed in reverse by
    :meth:`close`."""

    s: Settings
    notifier: Notifier
    router: Any = None
    queue: Any = None
    registry: Any = None
    catalog: Any = None
    executor: Any = None
    scheduler: Any = None
    grouper: Any = None
    watcher: Any = None
    api: Any = None
    outlook: Any = None  # the calibration outlook (cached), shared by its monitor and the API
    supervisor: Supervisor | None = None
    input_fs: FsGate | None = None  # every call on the input mount, with a timeout
    metrics: Metrics = field(default_factory=Metrics)

    async def open(self) -> None:
        from ..alerting.router import AlertRouter
        from .calregistry import CalRegistry
        from .grouping import Grouper
        from .imagecatalog import ImageCatalog
        from .watcher import Watcher

        s = self.s
        self.router = AlertRouter(s.alerts)
        await self.router.start()
        self.queue = await GroupQueue.open(s.queue_db, s.queue)
        self.registry = await CalRegistry.open(s.queue_db)
        self.catalog = await ImageCatalog.open(s.queue_db)
        await sweep_work_area(s, self.queue)
        await self.recover_claims()
        self.executor = await make_executor(s.executor.executor, s.executor.max_workers,
                                            s.log.level, _worker_log_format(s.log.format),
                                            s.executor.stage_timeout_s)
        self.scheduler = Scheduler(s, self.queue, self.executor, self.router.emit,
                                   self.registry, self.catalog, self.metrics, new_worker_id())
        self.input_fs = FsGate("input", s.paths.input_dir, s.ingest.fs_timeout_s,
                               emit=self.router.emit)
        self.grouper = Grouper(self.queue, s.ingest, emit=self.router.emit,
                               on_ready=self.scheduler.wake, fs=self.input_fs)
        self.watcher = Watcher(s.paths.input_dir, self.grouper.submit, fs=self.input_fs)
        self.outlook = outlook_provider(s, self.registry, self.queue)

    async def recover_claims(self) -> None:
        """Take back the claims of a predecessor that did not stop cleanly (a clean stop
        releases them); a group in flight at too many such starts in a row is quarantined."""
        recovered = await self.queue.recover_stale(all_active=True)
        if not recovered:
            return
        log.warning("claims_recovered", groups=recovered)
        self.router.emit(Alert(Severity.WARNING, "daemon.recovered",
                               f"Took back {len(recovered)} unfinished stage(s) after an "
                               "unclean stop", ", ".join(recovered), {"groups": recovered}))
        for gid in recovered:
            if await self.queue.group_state(gid) == "quarantined":
                reason = (await self.queue.get_group(gid))["last_error"]
                log.error("group_quarantined", group_id=gid, reason=reason)
                self.router.emit(Alert(Severity.ERROR, "daemon.poison",
                                       f"Group {gid} quarantined: suspected poison group",
                                       reason, {"group_id": gid}))

    def monitors(self) -> list[Any]:
        from ..alerting.monitors import CalibrationOutlookMonitor, SystemMonitor

        s, registry = self.s, self.registry

        async def calibration_age_h() -> float | None:
            return await registry.newest_age_hours(time.time() / 86400.0 + 40587.0)

        async def queue_stats() -> dict[str, Any]:
            return await _queue_stats(self.queue)

        system = SystemMonitor(s.monitors, {"input": s.paths.input_dir,
                                            "scratch": s.paths.scratch_dir,
                                            "output": s.paths.output_dir,
                                            "state": s.paths.state_dir},
                               tmpfs=s.paths.tmpfs_path if s.conversion.stage_to_tmpfs else None,
                               emit=self.router.emit, queue_stats=queue_stats,
                               calibration_age_h=calibration_age_h)
        outlook = CalibrationOutlookMonitor(s.monitors, self.outlook, emit=self.router.emit)
        return [system, outlook]

    def api_views(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """The status API's read views and its one write (requeue)."""
        from .status import requeue_group

        s, queue, router, scheduler = self.s, self.queue, self.router, self.scheduler

        async def health() -> dict[str, Any]:
            sup = self.supervisor
            problems = [f"task {n}: {st.state}" for n, st in (sup.status if sup else {}).items()
                        if st.state not in ("running", "stopped")]
            if scheduler.disk_full:
                problems.append(f"disk full: {scheduler.disk_full}")
            if self.input_fs is not None and self.input_fs.hung:
                problems.append(f"input filesystem hung: {self.input_fs.path}")
            return {"status": "degraded" if problems else "ok", "problems": problems,
                    "tasks": sup.report() if sup else {},
                    "input": self.input_fs.describe() if self.input_fs else None,
                    "executor": self.executor.describe(), "inflight": sorted(scheduler.inflight),
                    "draining": scheduler.draining, "counts": await queue.counts()}

        async def queue_view() -> dict[str, Any]:
            return {"counts": await queue.counts(), "groups": await queue.list_groups(limit=100)}

        async def group_view(gid: str) -> dict[str, Any]:
            return await queue.get_group(gid)

        async def alerts_view() -> dict[str, Any]:
            return {"recent": router.recent(50), "stats": router.stats()}

        async def calibration_view() -> list[Any]:
            return await self.registry.list_sets(active_only=True)

        async def images_view() -> list[Any]:
            return await self.catalog.latest(12)

        async def metrics_view() -> str:
            return render_prometheus(await queue.counts(), self.metrics, router.stats(),
                                     await self.disk_free())

        async def requeue(gid: str) -> str:
            msg = await requeue_group(s.queue_db, gid, s.ingest.expected_subbands)
            scheduler.wake()
            return msg

        return {"health": health, "queue": queue_view, "group": group_view,
                "alerts": alerts_view, "calibration": calibration_view,
                "calibration_outlook": self.outlook, "images": images_view,
                "metrics": metrics_view, "requeue": requeue}

    async def disk_free(self) -> dict[str, int | None]:
        """Free bytes per filesystem, measured off the loop: the input mount through its gate
        (None while it hangs), the others in a thread each with a timeout."""
        s = self.s
        out: dict[str, int | None] = {}
        for name, path in (("input", s.paths.input_dir), ("scratch", s.paths.scratch_dir),
                           ("output", s.paths.output_dir), ("state", s.paths.state_dir),
                           ("tmpfs", s.paths.tmpfs_path)):
            try:
                if name == "input" and self.input_fs is not None:
                    usage = await self.input_fs.call(shutil.disk_usage, path)
                else:
                    usage = await asyncio.wait_for(asyncio.to_thread(shutil.disk_usage, path),
                                                   s.ingest.fs_timeout_s)
                out[name] = usage.free
            except (OSError, TimeoutError):
                out[name] = None
        return out

    async def start_api(self) -> None:
        from .api import StatusAPI

        s = self.s
        self.api = StatusAPI(s.api.host, s.api.port, s.api.token.get(), s.paths.output_dir,
                             self.api_views())
        await self.api.start()
        (s.paths.state_dir / "api.port").write_text(f"{self.api.port}\n")

    async def idle(self, started: float) -> bool:
        """Nothing left to do (``run --once``): files settled, nothing collecting or running,
        and every waiting group held for calibration rather than waiting out a backoff."""
        s = self.s
        if time.monotonic() - started < s.ingest.stable_seconds + 3 * s.ingest.poll_interval_s + 1:
            return False
        if not self.grouper.idle():
            return False
        counts = await self.queue.counts()
        if counts["collecting"] or any(counts[k] for k in ACTIVE_STATES):
            return False
        for g in await self.queue.list_groups(states=RESTING_STATES, limit=10000):
            if not g["flags"].get(HOLD_FLAG):
                return False  # waiting out a retry backoff: it will run
        return True

    def on_signal(self, stop: asyncio.Event, name: str) -> None:
        """First SIGTERM/SIGINT: drain; a second: abandon the stages in flight now."""
        if stop.is_set():
            log.warning("second_signal", signal=name, action="abandoning in-flight stages now")
            self.scheduler.draining = True
            for task in self.scheduler.inflight.values():
                task.cancel()
            return
        log.info("shutdown_requested", signal=name)
        stop.set()

    async def close(self, tasks: list[asyncio.Task], stop: asyncio.Event,
                    stop_intake: asyncio.Event) -> list[str]:
        """Stop intake, drain the stages in flight (up to the shutdown timeout), then close
        every part in reverse order; returns the groups given back to the queue."""
        self.notifier.stopping()
        stop_intake.set()
        released = []
        if self.scheduler is not None:
            released = await self.scheduler.drain(self.s.executor.shutdown_timeout_s)
            if released:
                log.warning("released_unfinished", groups=released)
        if self.executor is not None:
            await self.executor.shutdown(kill=True)
        # a stopped daemon holds no RAM: drop the tile files kept for the next conversion
        await asyncio.to_thread(ms_storage(self.s).free_warm_columns)
        stop.set()
        if self.supervisor is not None:
            await self.supervisor.stop()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with suppress(asyncio.CancelledError, Exception):
                await t
        if self.api is not None:
            await self.api.stop()
        if self.router is not None:
            await self.router.stop(timeout=5)
        for part in (self.catalog, self.registry, self.queue):
            if part is not None:
                await part.close()
        if self.input_fs is not None:
            self.input_fs.close()
        self.notifier.close()
        return released


async def _serve(s: Settings, once: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_intake = asyncio.Event()
    cleaned = ms_storage(s).free_dead_staging()
    if cleaned:
        log.warning("stale_staging_removed", paths=[str(p) for p in cleaned])
    notifier = Notifier()
    try:
        # before any component opens the database: a corrupt one is restored from a backup
        recovery = await guard_database(s.queue_db, s.db_backup_dir, s.database,
                                        s.paths.output_dir, s.paths.input_dir,
                                        s.ingest.group_tolerance_s)
        await ensure_catalogue(s, notifier)
    except BaseException:
        notifier.close()
        raise

    d = _Daemon(s, notifier)
    await d.open()
    if recovery is not None:
        log.critical("database_restored", restored_from=str(recovery.restored_from),
                     problems=recovery.problems[:5])
        d.router.emit(recovery.alert())
    if s.api.enabled:
        await d.start_api()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.on_signal, stop, sig.name)
    sup = d.supervisor = Supervisor(d.router.emit, lambda name: stop.set())
    sup.start("watcher", lambda: d.watcher.run(stop_intake), stop_intake)
    sup.start("grouper", lambda: d.grouper.run(stop_intake), stop_intake)
    for name, monitor in zip(("monitor", "calibration-outlook"), d.monitors(), strict=True):
        sup.start(name, functools.partial(monitor.run, stop), stop)
    sup.start("sd-status", lambda: _status_loop(notifier, d.queue, stop), stop)
    sup.start("db-backup", lambda: backup_loop(s.queue_db, s.db_backup_dir, s.database, stop,
                                               emit=d.router.emit), stop)
    sup.start("state-logs", lambda: state_log_loop(casa_log_dir(s.paths.state_dir),
                                                   s.state_logs, stop), stop)
    wd = watchdog_interval_s()
    if wd:
        sup.start("watchdog", lambda: watchdog_loop(notifier, wd, stop), stop)
    tasks = [asyncio.create_task(_warm(d.executor), name="warm-executor")]
    started = time.monotonic()
    log.info("daemon_ready", input_dir=str(s.paths.input_dir), executor=d.executor.describe(),
             once=once, api=f"{s.api.host}:{d.api.port}" if d.api else None)
    notifier.ready(status="ready")
    released: list[str] = []
    try:
        await d.scheduler.run(stop, once=once, idle_check=lambda: d.idle(started))
    finally:
        released = await d.close(tasks, stop, stop_intake)
        log.info("daemon_stopped", released=released)
    if sup.failed:
        log.critical("daemon_exit", reason=f"background task {sup.failed} could not be kept "
                                           "running")
        return 1
    return 0


def _worker_log_format(fmt: str) -> str:
    # Workers write to the same stdout as the daemon: keep journald's JSON when in doubt.
    if fmt != "auto":
        return fmt
    import sys

    return "console" if sys.stdout.isatty() else "json"


async def _warm(executor: StageExecutor) -> None:
    """Warm the executor in the background; a failure here is logged, the first stage retries."""
    try:
        seconds = await executor.warm()
    except Exception as exc:  # noqa: BLE001 - never fatal: stages start workers themselves
        log.warning("executor_warm_failed", error=f"{type(exc).__name__}: {exc}")
        return
    if seconds is not None:
        log.info("executor_warm", seconds=round(seconds, 2))


async def _status_loop(notifier: Notifier, queue: GroupQueue, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with suppress(Exception):
            counts = await queue.counts()
            notifier.status(" ".join(f"{k}={v}" for k, v in counts.items() if v) or "idle")
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5)
