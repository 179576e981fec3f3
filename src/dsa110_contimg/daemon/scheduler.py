"""The scheduler: claims groups, runs each stage with its QA gate as one executor task, decides.

Stages and gates never touch the queue, the registry or alerting; this module does, from
the (result, verdict) pair the task returns (see ``tasks``). Outcomes:
pass -> next state; BadInputError or a failed QA gate -> quarantined (re-running cannot help,
an operator can `contimg requeue`); StageError or anything unexpected -> retry with backoff,
then failed; CalibrationUnavailable -> held (no attempt used) under the stale policy;
MeasurementSetLost (a kept MS gone with tmpfs) -> converted again (no attempt used).

A group's MS may live in the tmpfs work area until the group is finished
(``conversion.storage``): it is archived to the product directory before imaging is marked
done, and after a group is quarantined or given up in calibration or imaging.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ..alerting.alert import Alert, Severity
from ..config import Settings
from ..conversion.storage import MSStorage
from ..errors import (
    BadInputError,
    CalibrationUnavailable,
    CalSetDamaged,
    IllegalTransition,
    MeasurementSetLost,
    QAFailure,
    is_no_space,
)
from ..products import atomic_write, dumps, make_dirs, product_dir
from ..qa.result import QAResult
from .executor import StageExecutor
from .metrics import Metrics
from .queue import Claim, GroupQueue
from .stages import BY_NAME, CONVERSION, HOLD_FLAG, StageSpec, record
from .worker import TaskUsage

log = structlog.get_logger(__name__)

_NO_USAGE = TaskUsage(0.0, 0.0)
_RETRY_FIRST_S, _RETRY_MAX_S = 0.5, 30.0
T = TypeVar("T")


_TRANSIENT_DB = ("locked", "busy", "disk is full", "disk i/o error", "unable to open")


def transient_db_error(exc: sqlite3.OperationalError) -> bool:
    """The database's own trouble that passes: locked past the busy timeout, a full disk, an
    I/O error, a file that cannot be opened right now."""
    text = str(exc).lower()
    return any(t in text for t in _TRANSIENT_DB)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def ms_storage(s: Settings) -> MSStorage:
    """The one owner of where groups' MSs live, for these settings."""
    p = s.paths
    return MSStorage(p.output_dir, p.scratch_dir, p.tmpfs_path, p.state_dir,
                     s.conversion.publish_fsync, s.conversion.publish_direct)


def write_qa_json(directory: Path, group_id: str, stage: str, qa: QAResult,
                  extra: dict[str, Any] | None = None) -> Path:
    """Merge one gate's verdict into the group's qa.json (atomic replace)."""
    make_dirs(directory)
    path = directory / "qa.json"
    doc: dict[str, Any] = {"group_id": group_id, "stages": {}}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    doc.setdefault("stages", {})[stage] = {**qa.as_dict(), **(extra or {})}
    doc["passed"] = all(s.get("passed") for s in doc["stages"].values())
    atomic_write(path, dumps(doc, indent=1))
    return path


class Scheduler:
    def __init__(self, settings: Settings, queue: GroupQueue, executor: StageExecutor,
                 emit: Callable[[Alert], None], registry: Any, catalog: Any,
                 metrics: Metrics, worker_id: str | None = None) -> None:
        self.s = settings
        self.queue = queue
        self.executor = executor
        self.emit = emit
        self.registry = registry
        self.catalog = catalog
        self.metrics = metrics
        self.ms = ms_storage(settings)
        self.worker_id = worker_id or new_worker_id()
        self.inflight: dict[str, asyncio.Task] = {}
        # per claimed group: worker usage of the current stage's tasks so far; None = unknown
        self._usage: dict[str, TaskUsage | None] = {}
        self._wake = asyncio.Event()
        self.draining = False
        self._next_sweep = 0.0
        self.disk_full: str | None = None  # why groups are held for space, while they are

    def wake(self, *_: object) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ main loop
    async def run(self, stop: asyncio.Event, once: bool = False,
                  idle_check: Callable[[], Any] | None = None) -> None:
        """Claim while there is room; with ``once``, return when nothing is left to do."""
        while not stop.is_set():
            await self._sweep()
            while len(self.inflight) < self.s.executor.max_workers and not stop.is_set():
                try:
                    claim = await self.queue.claim(self.worker_id)
                except Exception as exc:  # noqa: BLE001 - e.g. DB locked past busy_timeout
                    log.error("claim_failed", error=str(exc))
                    claim = None
                if claim is None:
                    break
                task = asyncio.create_task(self._process(claim), name=f"group:{claim.group_id}")
                self.inflight[claim.group_id] = task
                task.add_done_callback(lambda t, g=claim.group_id: self._finished(g, t))
            if once and not self.inflight and idle_check is not None and await idle_check():
                return
            self._wake.clear()
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()

    def _finished(self, group_id: str, task: asyncio.Task) -> None:
        self.inflight.pop(group_id, None)
        self._wake.set()
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        # _process handles every stage outcome; what escapes is the daemon's own fault. The
        # claim stays behind and the sweep takes it back once its heartbeat is stale.
        log.error("group_task_crashed", group_id=group_id,
                  error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        self.emit(Alert(Severity.ERROR, "daemon.task", f"Processing of {group_id} crashed",
                        f"{type(exc).__name__}: {exc}", {"group_id": group_id}))

    async def _sweep(self) -> None:
        """Take back, while running, claims nothing heartbeats any more (a group task that
        crashed, a claim whose outcome could not be written); never the groups in flight."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + max(1.0, self.s.queue.claim_timeout_s / 4)
        try:
            taken = await self.queue.recover_stale(exclude=set(self.inflight))
        except Exception as exc:  # noqa: BLE001 - e.g. DB locked: the next sweep tries again
            log.error("stale_sweep_failed", error=str(exc))
            return
        if taken:
            self.emit(Alert(Severity.WARNING, "daemon.recovered",
                            f"Took back {len(taken)} stale claim(s)", ", ".join(taken),
                            {"groups": taken}))

    async def drain(self, timeout: float) -> list[str]:
        """Let in-flight stages finish up to ``timeout``; give the rest back to the queue."""
        self.draining = True
        tasks = list(self.inflight.values())
        if tasks:
            log.info("draining", inflight=len(tasks), timeout_s=timeout)
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        else:
            pending = set()
        released = []
        for task in pending:
            task.cancel()
        for task in pending:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
            released.append(task.get_name().removeprefix("group:"))
        return released

    # ------------------------------------------------------------------ one claim
    async def _heartbeat(self, group_id: str) -> None:
        while True:
            await asyncio.sleep(self.s.queue.heartbeat_s)
            try:
                if not await self.queue.heartbeat(group_id, self.worker_id):
                    log.warning("claim_lost", group_id=group_id)
                    return
            except Exception as exc:  # noqa: BLE001 - e.g. DB locked: beat again next time
                log.warning("heartbeat_failed", group_id=group_id, error=str(exc))

    async def _bookkeep(self, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """A queue write that records a stage's outcome, retried until it succeeds: given up,
        the group would stay claimed with its result lost. Only the database's own trouble
        (locked past the busy timeout, disk full, I/O) is retried."""
        delay = _RETRY_FIRST_S
        while True:
            try:
                return await write()
            except sqlite3.OperationalError as exc:
                if not transient_db_error(exc):
                    raise  # e.g. a missing table: retrying cannot mend it
                log.error("queue_write_retry", what=what, error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(_RETRY_MAX_S, 2 * delay)

    bookkeep = _bookkeep  # the stages' finish hooks record their outcome (calsets, catalogue)

    async def _process(self, claim: Claim) -> None:
        gid, stage = claim.group_id, claim.stage
        structlog.contextvars.bind_contextvars(group_id=gid, stage=stage)
        hb = asyncio.create_task(self._heartbeat(gid))
        self._usage[gid] = _NO_USAGE
        t0 = time.monotonic()
        log.info("stage_start", attempt=claim.attempt)
        try:
            await self._run_and_record(claim, t0)
        except asyncio.CancelledError:
            # shutdown, wherever it lands (the stage, or the write of its outcome): the claim
            # goes back to the queue rather than count as an unclean stop
            await self._release(gid)
            raise
        finally:
            hb.cancel()
            self._usage.pop(gid, None)

    async def _release(self, gid: str) -> None:
        try:
            await self.queue.release(gid, self.worker_id)
        except IllegalTransition:
            return  # the outcome was recorded before the cancellation landed
        except Exception as exc:  # noqa: BLE001 - the start-up recovery takes it back
            log.error("queue_update_failed", error=str(exc))
            return
        log.info("stage_released", reason="shutdown")

    async def _run_and_record(self, claim: Claim, t0: float) -> None:
        """Run the claimed stage and record what came of it."""
        gid, stage = claim.group_id, claim.stage
        try:
            result, qa = await asyncio.wait_for(self._run_stage(claim, BY_NAME[stage]),
                                                self.s.executor.stage_timeout_s)
        except asyncio.CancelledError:
            raise
        except CalibrationUnavailable as exc:
            await self._hold(claim, str(exc))
        except CalSetDamaged as exc:
            await self._damaged_set(claim, exc)
        except MeasurementSetLost as exc:
            await self._reconvert(claim, str(exc))
        except (BadInputError, QAFailure) as exc:
            await self._quarantine(claim, exc, time.monotonic() - t0)
            await self.archive(claim)
        except Exception as exc:  # noqa: BLE001 - any other failure is retried, never fatal
            if is_no_space(exc):
                await self._hold_for_space(claim, exc)
            elif await self._retry(claim, exc, time.monotonic() - t0) == "failed":
                await self.archive(claim)
        else:
            self._space_back()
            took = time.monotonic() - t0
            self.metrics.stage_done(stage, took)
            metrics = {"result": result, "qa": qa.as_dict()}
            usage = self._usage.get(gid)
            cpu_s, rss_mb = (None, None) if usage is None else (usage.cpu_s, usage.peak_rss_mb)
            state = await self._bookkeep("complete", lambda: self.queue.complete(
                gid, self.worker_id, took, metrics, cpu_s=cpu_s, peak_rss_mb=rss_mb,
                qa_s=qa.duration_s))
            log.info("stage_done", duration_s=round(took, 2), state=state,
                     qa_s=round(qa.duration_s, 3), cpu_s=cpu_s and round(cpu_s, 2),
                     peak_rss_mb=rss_mb and round(rss_mb, 1))
            for w in qa.warnings:
                self.emit(Alert(Severity.WARNING, f"qa.{stage}", f"QA warning for {gid}", w,
                                {"group_id": gid, "stage": stage}))
            if state == "done":
                self.metrics.group_done()

    async def _hold(self, claim: Claim, reason: str) -> None:
        policy_retry = self.s.queue.hold_retry_s
        gid = claim.group_id
        await self._bookkeep("hold", lambda: self.queue.set_flag(gid, HOLD_FLAG, reason))
        await self._bookkeep("defer", lambda: self.queue.defer(
            gid, self.worker_id, time.time() + policy_retry, reason))
        self.emit(Alert(Severity.WARNING, "calibration.stale",
                        f"Calibration stale: holding {claim.group_id}", reason,
                        {"group_id": claim.group_id, "policy": "hold"}))

    async def _damaged_set(self, claim: Claim, exc: CalSetDamaged) -> None:
        """A registered set's tables are gone or altered: retire it from the registry, so no
        group applies it again, and let this group try again at once with what else is valid
        (no attempt used: the group is not at fault)."""
        reason = str(exc)
        retired = self.registry is not None and await self._bookkeep(
            "mark_failed", lambda: self.registry.mark_failed(exc.set_name, f"damaged: {reason}"))
        if not retired:  # not a registered set: trying again would meet it again
            if await self._retry(claim, exc, 0.0) == "failed":
                await self.archive(claim)
            return
        gid = claim.group_id
        await self._bookkeep("defer", lambda: self.queue.defer(
            gid, self.worker_id, time.time(), f"calibration set damaged: {reason}", ran=True))
        log.error("calibration_set_damaged", set=exc.set_name, error=reason)
        self.emit(Alert(Severity.ERROR, "calibration.damaged",
                        f"Calibration set {exc.set_name} damaged: retired", reason,
                        {"group_id": gid, "set": exc.set_name}))

    async def _hold_for_space(self, claim: Claim, exc: Exception) -> None:
        """A disk filled: the group is not at fault. Hold it without using an attempt and try
        again every CONTIMG_DISK_FULL_RETRY_S; alert once until a stage completes again."""
        reason = f"{type(exc).__name__}: {exc}"
        gid, retry_s = claim.group_id, self.s.queue.disk_full_retry_s
        await self._bookkeep("defer", lambda: self.queue.defer(
            gid, self.worker_id, time.time() + retry_s, f"disk full: {reason}", ran=True))
        log.error("stage_held_disk_full", error=reason, retry_in_s=retry_s)
        if self.disk_full is None:
            self.emit(Alert(Severity.CRITICAL, "disk.full",
                            f"Disk full: holding groups at {claim.stage}",
                            f"{reason}. Groups wait without using attempts and resume by "
                            "themselves once space is freed.", {"group_id": gid,
                                                                "stage": claim.stage}))
        self.disk_full = reason

    def _space_back(self) -> None:
        if self.disk_full is not None:
            log.info("disk_space_back", was=self.disk_full)
            self.emit(Alert(Severity.INFO, "disk.full", "Disk space is back",
                            f"A stage completed again after: {self.disk_full}", {}))
            self.disk_full = None

    async def _quarantine(self, claim: Claim, exc: Exception, took: float) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, QAFailure):
            self.metrics.qa_failed(claim.stage)
        await self._bookkeep("quarantine", lambda: self.queue.quarantine(
            claim.group_id, reason, worker_id=self.worker_id))
        log.error("group_quarantined", reason=reason, duration_s=round(took, 2))
        self.emit(Alert(Severity.ERROR, f"{claim.stage}.quarantined",
                        f"Group {claim.group_id} quarantined at {claim.stage}", reason,
                        {"group_id": claim.group_id, "stage": claim.stage}))

    async def _reconvert(self, claim: Claim, reason: str) -> None:
        await self._bookkeep("reconvert", lambda: self.queue.reconvert(
            claim.group_id, self.worker_id, reason))
        self.emit(Alert(Severity.WARNING, "conversion.lost",
                        f"MS of {claim.group_id} lost: converting it again", reason,
                        {"group_id": claim.group_id, "stage": claim.stage}))

    async def _retry(self, claim: Claim, exc: Exception, took: float) -> str:
        reason = f"{type(exc).__name__}: {exc}"
        state = await self._bookkeep("fail", lambda: self.queue.fail(
            claim.group_id, self.worker_id, reason, retry=True, duration_s=took))
        sev = Severity.ERROR if state == "failed" else Severity.WARNING
        log.log(40 if state == "failed" else 30, "stage_failed", error=reason, state=state,
                attempt=claim.attempt)
        self.emit(Alert(sev, f"{claim.stage}.failed",
                        f"{claim.stage} of {claim.group_id} failed (attempt {claim.attempt})"
                        + (": giving up" if state == "failed" else ", will retry"), reason,
                        {"group_id": claim.group_id, "stage": claim.stage, "state": state}))
        await self._free_dead_staging()
        return state

    # ------------------------------------------------------------------ the MS's place
    def final_ms(self, group_id: str) -> Path:
        return self.ms.final(group_id)

    async def locate_ms(self, claim: Claim) -> Path:
        """The group's MS where it is now; MeasurementSetLost if it is nowhere."""
        recorded = CONVERSION.handoff(claim.flags).ms_path
        ms = await asyncio.to_thread(self.ms.locate, claim.group_id, recorded)
        if ms is None:
            raise MeasurementSetLost(f"{recorded} no longer exists (tmpfs emptied by a "
                                     "reboot?) and the MS was never archived")
        return ms

    async def archive(self, claim: Claim, must: bool = False) -> None:
        """Move a group's MS from the tmpfs work area to its product directory (if there).

        Before imaging is marked done a failure propagates (``must``: the stage is retried
        rather than a finished group left with its MS in RAM); after a quarantine it is
        logged, and the start-up sweep tries again.
        """
        conv = CONVERSION.handoff(claim.flags or {})
        if conv is None or claim.stage == CONVERSION.name:
            return
        try:
            t0 = time.monotonic()
            final = await asyncio.to_thread(self.ms.archive, claim.group_id, conv.ms_path)
            if final is not None:
                log.info("ms_archived", ms=str(final), seconds=round(time.monotonic() - t0, 2))
        except Exception as exc:
            if must:
                raise
            log.error("ms_archive_failed", ms=str(conv.ms_path), error=str(exc))

    async def _free_dead_staging(self) -> None:
        """A worker that died cannot remove its staging directory: free it now rather than at
        the next restart, months away (it can be GBs of tmpfs)."""
        try:
            cleaned = await asyncio.to_thread(self.ms.free_dead_staging)
        except Exception as exc:  # noqa: BLE001 - housekeeping must not fail the group
            log.warning("stale_staging_cleanup_failed", error=str(exc))
            return
        if cleaned:
            log.warning("stale_staging_removed", paths=[str(p) for p in cleaned])

    async def _run(self, claim: Claim, fn: Any, *args: Any, nice: int = 0) -> Any:
        """Run a task of the claimed stage in the executor, adding up what it cost."""
        value, usage = await self.executor.run_measured(fn, *args, group_id=claim.group_id,
                                                        nice=nice)
        so_far = self._usage.get(claim.group_id, _NO_USAGE)
        self._usage[claim.group_id] = None if usage is None or so_far is None else so_far + usage
        return value

    async def record_qa(self, stage: str, claim: Claim, qa: QAResult) -> None:
        """Merge a gate's verdict into the group's qa.json."""
        await asyncio.to_thread(write_qa_json, product_dir(self.s.paths.output_dir, claim.group_id),
                                claim.group_id, stage, qa)

    async def judge(self, stage: str, claim: Claim, qa: QAResult) -> QAResult:
        """Record a gate's verdict in qa.json; a failed gate stops the group (QAFailure)."""
        await self.record_qa(stage, claim, qa)
        if not qa.passed:
            raise QAFailure(f"{stage} QA failed: {qa.reason}", qa.metrics)
        return qa

    # ------------------------------------------------------------------ stages
    async def _run_stage(self, claim: Claim, spec: StageSpec) -> tuple[dict, QAResult]:
        """One stage as declared in :mod:`.stages`: build its inputs, run its task (stage and
        gate) in the executor, act on a passing verdict, and keep its typed result."""
        args, nice = await spec.prepare(self, claim)
        res, qa = await self._run(claim, spec.task, *args, nice=nice)
        qa = await spec.finish(self, claim, res, qa)
        rec = record(res)
        await self._bookkeep("result", lambda: self.queue.set_flag(claim.group_id, spec.name, rec))
        return rec, qa
