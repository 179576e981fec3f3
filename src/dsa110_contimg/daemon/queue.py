"""The durable group queue: one owner of the SQLite file's ``queue`` tables.

Every state change is a single ``BEGIN IMMEDIATE`` transaction that re-reads the row it changes,
so a crash between any two statements leaves the previous state intact, and two processes (or
two daemons started by mistake) can never claim the same group: the second waits for the
write lock and then sees the group already taken.

States::

    collecting -> pending -> converting -> converted -> calibrating -> calibrated -> imaging -> done
                     (resting)   (active)     (resting)    (active)        (resting)   (active)
    any but done -> quarantined        active -> failed        failed|quarantined -> pending
    calibrating|imaging -> pending (the MS was lost, e.g. tmpfs emptied by a reboot: convert again)

A claim moves a resting group to its active state and opens a ``stage_runs`` row; complete,
fail, release and stale-claim recovery close that row (outcome ok / failed / abandoned), which
is the group's history with durations, QA metrics and (v3) the workers' CPU time, peak RSS and
QA time. ``state_reason`` says why a group is where it is, and a trigger copies every state change with that reason into ``group_events``, so a
requeue does not erase why the group had stopped.

Other components keep their own tables in the same file and their own row in
``schema_versions``; this module only creates and migrates the tables it names.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiosqlite
import structlog

from ..config import QueueOptions
from ..errors import BadInputError, ContimgError, IllegalTransition
from ..products import (
    InvalidName,
    group_id_for,
    group_time,
    parse_subband_name,
    validate_group_id,
)
from ..sqlitedb import SQLiteComponent
from .stages import FIRST_WAITING, PIPELINE

log = structlog.get_logger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

__all__ = [
    "ACTIVE_STATES",
    "Claim",
    "DuplicateSubband",
    "FileRecord",
    "GroupQueue",
    "MIGRATIONS",
    "RESTING_STATES",
    "SCHEMA_VERSION",
    "STATES",
    "UnknownGroup",
    "is_legal",
]

# Derived from the stage declarations (daemon.stages): each stage waits in a resting state,
# runs in an active one, and leaves for the next stage's resting state.
STATES: tuple[str, ...] = (
    "collecting", FIRST_WAITING, *(s for st in PIPELINE for s in (st.active, st.done)),
    "failed", "quarantined",
)
RESTING_STATES: tuple[str, ...] = tuple(st.waiting for st in PIPELINE)
ACTIVE_STATES: tuple[str, ...] = tuple(st.active for st in PIPELINE)

# resting state -> (active state, stage name)
_CLAIMS: dict[str, tuple[str, str]] = {st.waiting: (st.active, st.name) for st in PIPELINE}
# active state -> (resting state it came from, state after success, stage name)
_ACTIVE: dict[str, tuple[str, str, str]] = {st.active: (st.waiting, st.done, st.name)
                                            for st in PIPELINE}


# One placeholder per state: the state lists are bound as parameters, never spliced into SQL.
_RESTING_MARKS = ", ".join("?" * len(RESTING_STATES))
_ACTIVE_MARKS = ", ".join("?" * len(ACTIVE_STATES))
_HEARTBEAT = ("UPDATE groups SET heartbeat = ? WHERE id = ? AND worker = ? "  # noqa: S608 - placeholders only
              "AND state IN (" + _ACTIVE_MARKS + ")")
_FLAGGED_RESTING = ("SELECT id, flags FROM groups WHERE state IN ("  # noqa: S608 - placeholders only
                    + _RESTING_MARKS + ") AND json_extract(flags, '$.' || ?) IS NOT NULL")


def _legal_transitions() -> frozenset[tuple[str, str]]:
    edges = {("collecting", "pending"), ("collecting", "quarantined"),
             ("failed", "pending"), ("quarantined", "pending"), ("quarantined", "collecting")}
    for resting, (active, _) in _CLAIMS.items():
        edges |= {(resting, active), (resting, "quarantined")}
    for active, (resting, after, _) in _ACTIVE.items():
        edges |= {(active, resting), (active, after), (active, "failed"), (active, "quarantined")}
        if resting != FIRST_WAITING:
            edges.add((active, "pending"))
    return frozenset(edges)


LEGAL_TRANSITIONS = _legal_transitions()


def is_legal(from_state: str, to_state: str) -> bool:
    """Whether the state machine allows ``from_state -> to_state``."""
    return (from_state, to_state) in LEGAL_TRANSITIONS


class UnknownGroup(ContimgError, LookupError):
    """No group with this id is in the queue."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        super().__init__(f"no group {group_id} in the queue")


class DuplicateSubband(BadInputError):
    """Two different files claim the same subband of one group: re-running cannot choose."""

    def __init__(self, group_id: str, subband: int, existing: str, new: str) -> None:
        self.group_id = group_id
        self.subband = subband
        self.files = (existing, new)
        super().__init__(
            f"group {group_id}: duplicate subband sb{subband:02d}: {existing} and {new}")
        self.path = new


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run one stage of one group; picklable for worker processes."""

    group_id: str
    stage: str
    attempt: int
    files: dict[int, Path]
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileRecord:
    path: Path
    size: int
    mtime: float


# Forward migrations of the 'queue' component. Never edit a shipped entry: append a new one.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE groups (
            id TEXT PRIMARY KEY,
            anchor REAL NOT NULL,
            state TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            not_before REAL NOT NULL DEFAULT 0,
            worker TEXT,
            heartbeat REAL,
            resting_state TEXT,
            flags TEXT NOT NULL DEFAULT '{}',
            n_subbands INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX groups_claimable ON groups(state, not_before, anchor)",
        "CREATE INDEX groups_anchor ON groups(anchor)",
        """CREATE TABLE group_files (
            group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            subband INTEGER NOT NULL,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            UNIQUE (group_id, subband)
        )""",
        """CREATE TABLE stage_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            stage TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            worker TEXT,
            started REAL NOT NULL,
            finished REAL,
            duration_s REAL,
            outcome TEXT CHECK (outcome IN ('ok', 'failed', 'abandoned')),
            error TEXT,
            metrics TEXT
        )""",
        "CREATE INDEX stage_runs_group ON stage_runs(group_id, started)",
    ),
    # v2: why each group is in its state (``state_reason``) and a log of every state change,
    # written by triggers so no code path (nor a hand edit) can change a state unrecorded.
    2: (
        "ALTER TABLE groups ADD COLUMN state_reason TEXT",
        """CREATE TABLE group_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            group_id TEXT NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
            at REAL NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            reason TEXT
        )""",
        "CREATE INDEX group_events_group ON group_events(group_id, at)",
        """INSERT INTO group_events (group_id, at, from_state, to_state, reason)
           SELECT id, updated, NULL, state, 'state when the event log was added (schema v2)'
           FROM groups""",
        """CREATE TRIGGER groups_log_insert AFTER INSERT ON groups BEGIN
             INSERT INTO group_events (group_id, at, from_state, to_state, reason)
             VALUES (NEW.id, NEW.updated, NULL, NEW.state, NEW.state_reason);
           END""",
        """CREATE TRIGGER groups_log_state AFTER UPDATE OF state ON groups
           WHEN NEW.state IS NOT OLD.state BEGIN
             INSERT INTO group_events (group_id, at, from_state, to_state, reason)
             VALUES (NEW.id, NEW.updated, OLD.state, NEW.state, NEW.state_reason);
           END""",
    ),
    # v3: what a stage cost besides wall time, as its worker processes measured it (CPU
    # seconds of the stage and its QA gate, their larger peak RSS in MiB) and the QA gate's
    # own time; NULL for runs recorded before, and where the executor cannot tell.
    3: (
        "ALTER TABLE stage_runs ADD COLUMN cpu_s REAL",
        "ALTER TABLE stage_runs ADD COLUMN peak_rss_mb REAL",
        "ALTER TABLE stage_runs ADD COLUMN qa_s REAL",
    ),
    # Stage results in a group's flags are the stages' typed records (daemon.stages). A
    # calibration flag written before was a summary naming the new set: give it the group id
    # and MS path its record needs, and keep the set's name as new_set_name.
    4: (
        "UPDATE groups SET flags = json_set(flags,"
        " '$.calibration.group_id', id,"
        " '$.calibration.ms_path', json_extract(flags, '$.conversion.ms_path'),"
        " '$.calibration.new_set_name', json_extract(flags, '$.calibration.new_set'),"
        " '$.calibration.new_set', json('null'))"
        " WHERE json_type(flags, '$.calibration') = 'object'"
        " AND json_type(flags, '$.calibration.group_id') IS NULL",
    ),
}
MIGRATIONS[5] = (
    # v5: how many times in a row the group's claim was abandoned (found in flight at the start
    # of a daemon that did not stop cleanly, or left behind and swept); reset when one of its
    # stages completes. A poison group is quarantined instead of crash-looping the daemon.
    "ALTER TABLE groups ADD COLUMN unclean_starts INTEGER NOT NULL DEFAULT 0",
)
SCHEMA_VERSION = max(MIGRATIONS)
COMPONENT = "queue"

_SELECT_GROUP = (
    "SELECT id, anchor, state, created, updated, attempts, last_error, not_before, worker, "
    "heartbeat, resting_state, flags, n_subbands, state_reason, unclean_starts FROM groups"
)
# the oldest group waiting in a resting state whose backoff has passed; groups in an active state
_CLAIMABLE = (_SELECT_GROUP + " WHERE state IN (" + _RESTING_MARKS  # noqa: S608 - placeholders only
              + ") AND not_before <= ? ORDER BY anchor, id LIMIT 1")
_ACTIVE_GROUPS = (_SELECT_GROUP + " WHERE state IN (" + _ACTIVE_MARKS  # noqa: S608 - placeholders only
                  + ") ORDER BY anchor")


# a group's rows in the other tables, moved when the group is renamed (before any stage ran)
_MOVE_GROUP = tuple(f"UPDATE {t} SET group_id = ? WHERE group_id = ?"  # noqa: S608 - literal names
                    for t in ("group_files", "group_events", "stage_runs"))

_KEEP = object()  # "leave this column as it is"


def canonical_time(paths: Iterable[str | Path]) -> datetime | None:
    """A group's canonical time: the timestamp most of its subband files carry (the
    correlator stamps one observation's files alike), the earliest among equally common ones.
    A jittered or stray file that happened to arrive first does not name the group. None
    when no file name carries a timestamp."""
    stamps: Counter[datetime] = Counter()
    for p in paths:
        try:
            stamps[parse_subband_name(Path(p).name).timestamp] += 1
        except InvalidName:
            continue
    return min(stamps, key=lambda t: (-stamps[t], t)) if stamps else None


def _now(now: float | None) -> float:
    return time.time() if now is None else float(now)


def _jsonable(value: Any) -> Any:
    """json.dumps fallback for numpy scalars/arrays, paths and other odd QA metric values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _finite(value: float | None) -> float | None:
    """NULL rather than NaN/inf in a REAL column (SQLite stores NaN as NULL anyway, inf not)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_jsonable, sort_keys=True)


def _group_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["flags"] = json.loads(d["flags"] or "{}")
    return d


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here when the caller was cancelled and cannot see it


def _atomic(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Let a transaction run to its end even when its caller is cancelled (at shutdown).

    All coroutines share one connection, so a transaction abandoned between two statements
    would leak into the next caller's. Shielded, it always commits or rolls back whole; the
    caller still sees CancelledError (a claim committed for a cancelled caller is taken back
    by ``recover_stale``).
    """
    @functools.wraps(method)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(method(*args, **kwargs))
        task.add_done_callback(_consume)
        return await asyncio.shield(task)
    return run


class GroupQueue(SQLiteComponent):
    """The single owner of the queue tables; every public method is one transaction."""

    def __init__(self, db: aiosqlite.Connection, options: QueueOptions, path: Path) -> None:
        super().__init__(db, path)
        self.options = options

    @classmethod
    async def open(cls, db_path: Path, options: QueueOptions,
                   busy_timeout_s: float = 30.0) -> GroupQueue:
        """Open (creating if needed) and migrate the database; WAL so readers never block."""
        return await cls._open(db_path, busy_timeout_s, lambda db, p: cls(db, options, p),
                               COMPONENT, SCHEMA_VERSION, MIGRATIONS)

    async def _group(self, db: aiosqlite.Connection, group_id: str) -> sqlite3.Row:
        row = await _one(db, _SELECT_GROUP + " WHERE id = ?", (group_id,))
        if row is None:
            raise UnknownGroup(group_id)
        return row

    async def _change(self, db: aiosqlite.Connection, row: sqlite3.Row, to_state: str,
                      now: float, reason: str | None, *, attempts: int | None = None,
                      last_error: Any = _KEEP, not_before: float = 0.0,
                      worker: str | None = None, heartbeat: float | None = None,
                      resting_state: str | None = None) -> None:
        """Move one group, already read in this transaction, to ``to_state`` and log it."""
        from_state = row["state"]
        if not is_legal(from_state, to_state):
            raise IllegalTransition(f"group {row['id']}: {from_state} -> {to_state} is not allowed")
        cur = await db.execute(
            "UPDATE groups SET state = ?, updated = ?, attempts = ?, last_error = ?, "
            "not_before = ?, worker = ?, heartbeat = ?, resting_state = ?, state_reason = ? "
            "WHERE id = ? AND state = ?",
            (to_state, now, row["attempts"] if attempts is None else attempts,
             row["last_error"] if last_error is _KEEP else last_error, not_before, worker,
             heartbeat, resting_state, reason, row["id"], from_state))
        if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; refuse rather than guess
            raise IllegalTransition(f"group {row['id']} changed under us")
        # the groups_log_state trigger has written the group_events row

    async def _close_run(self, db: aiosqlite.Connection, group_id: str, now: float,
                         outcome: str, error: str | None, duration_s: float | None = None,
                         metrics: Mapping[str, Any] | None = None,
                         usage: Mapping[str, float | None] | None = None) -> None:
        duration_s = _finite(duration_s)
        u = {k: _finite((usage or {}).get(k)) for k in ("cpu_s", "peak_rss_mb", "qa_s")}
        await db.execute(
            "UPDATE stage_runs SET finished = ?1, duration_s = coalesce(?2, max(0.0, ?1 - started)), "
            "outcome = ?3, error = ?4, metrics = ?5, cpu_s = ?7, peak_rss_mb = ?8, qa_s = ?9 "
            "WHERE id = (SELECT max(id) FROM stage_runs WHERE group_id = ?6 AND finished IS NULL)",
            (now, duration_s, outcome, error,
             None if metrics is None else _dumps(dict(metrics)), group_id,
             u["cpu_s"], u["peak_rss_mb"], u["qa_s"]))

    @staticmethod
    def _require_claim(row: sqlite3.Row, worker_id: str) -> None:
        if row["state"] not in _ACTIVE or row["worker"] != worker_id:
            holder = f" by {row['worker']}" if row["worker"] else ""
            raise IllegalTransition(
                f"group {row['id']} is {row['state']}{holder}, not claimed by {worker_id}")

    # ----------------------------------------------------------------- ingest side
    @_atomic
    async def create_group(self, group_id: str, now: float | None = None) -> bool:
        """Start collecting a group; idempotent so a restart re-finds the same group."""
        group_id = validate_group_id(group_id)
        now = _now(now)
        anchor = group_time(group_id).timestamp()
        async with self._write() as db:
            cur = await db.execute(
                "INSERT INTO groups (id, anchor, state, created, updated, state_reason) "
                "VALUES (?, ?, 'collecting', ?, ?, 'first file seen') ON CONFLICT(id) DO NOTHING",
                (group_id, anchor, now, now))
            created = cur.rowcount == 1
        return created

    async def find_group_for(self, timestamp: datetime | float, tolerance_s: float) -> str | None:
        """The group whose anchor is nearest ``timestamp`` within the tolerance (any state)."""
        ts = timestamp.timestamp() if isinstance(timestamp, datetime) else float(timestamp)
        async with self._lock:
            row = await _one(
                self._db,
                "SELECT id FROM groups WHERE anchor BETWEEN ? AND ? "
                "ORDER BY abs(anchor - ?), anchor LIMIT 1",
                (ts - tolerance_s, ts + tolerance_s, ts))
        return None if row is None else row["id"]

    @_atomic
    async def record_file(self, group_id: str, subband: int, path: Path | str, size: int,
                          mtime: float) -> None:
        """Attach a file to a collecting group, or refresh its size/mtime if already attached.

        A different path for a subband the group already has raises :class:`DuplicateSubband`.
        """
        path_s = str(path)
        async with self._write() as db:
            row = await self._group(db, group_id)
            if row["state"] != "collecting":
                raise IllegalTransition(
                    f"group {group_id} is {row['state']}; files join only while collecting")
            existing = await _one(db, "SELECT path FROM group_files WHERE group_id = ? AND "
                                      "subband = ?", (group_id, subband))
            if existing is not None and existing["path"] != path_s:
                raise DuplicateSubband(group_id, subband, existing["path"], path_s)
            await db.execute(
                "INSERT INTO group_files (group_id, subband, path, size, mtime) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(group_id, subband) DO UPDATE SET "
                "size = excluded.size, mtime = excluded.mtime",
                (group_id, int(subband), path_s, int(size), float(mtime)))
            await db.execute(
                "UPDATE groups SET n_subbands = (SELECT count(*) FROM group_files "
                "WHERE group_id = ?), updated = ? WHERE id = ?", (group_id, time.time(), group_id))

    @_atomic
    async def remove_file(self, group_id: str, subband: int) -> None:
        """Drop a file that vanished or never completed from a collecting group."""
        async with self._write() as db:
            row = await self._group(db, group_id)
            if row["state"] != "collecting":
                raise IllegalTransition(
                    f"group {group_id} is {row['state']}; files leave only while collecting")
            await db.execute("DELETE FROM group_files WHERE group_id = ? AND subband = ?",
                             (group_id, int(subband)))
            await db.execute(
                "UPDATE groups SET n_subbands = (SELECT count(*) FROM group_files "
                "WHERE group_id = ?), updated = ? WHERE id = ?", (group_id, time.time(), group_id))

    @_atomic
    async def mark_ready(self, group_id: str, reason: str | None = None,
                         now: float | None = None) -> str:
        """collecting -> pending; ``reason`` notes why a group goes ahead incomplete.

        The group is named by its canonical time (:func:`canonical_time`), not by whichever
        file arrived first: when they differ it is renamed here, before anything is made
        from it. Returns the group's id from now on."""
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            if row["state"] != "collecting":
                raise IllegalTransition(
                    f"group {group_id} is {row['state']}; only a collecting group becomes ready")
            if await _one(db, "SELECT 1 FROM group_files WHERE group_id = ?", (group_id,)) is None:
                raise IllegalTransition(f"group {group_id} has no files to process")
            row = await self._canonical(db, row, now)
            await self._change(db, row, "pending", now, reason or "all subbands complete",
                               attempts=0)
        if row["id"] != group_id:
            log.info("queue.group_renamed", group_id=row["id"], was=group_id,
                     reason="named by its canonical time, not its first file")
        return str(row["id"])

    async def _canonical(self, db: aiosqlite.Connection, row: sqlite3.Row,
                         now: float) -> sqlite3.Row:
        """The collecting group renamed to its canonical time when that differs (and is free)."""
        paths = [r["path"] for r in await _all(
            db, "SELECT path FROM group_files WHERE group_id = ?", (row["id"],))]
        when = canonical_time(paths)
        canonical = row["id"] if when is None else group_id_for(when)
        if canonical == row["id"] or await _one(
                db, "SELECT 1 FROM groups WHERE id = ?", (canonical,)) is not None:
            return row
        return await self._rename(db, row, canonical, now)

    async def _rename(self, db: aiosqlite.Connection, row: sqlite3.Row, new_id: str,
                      now: float) -> sqlite3.Row:
        """Give a collecting group a new id, its files and history with it."""
        old = row["id"]
        await db.execute(
            "INSERT INTO groups (id, anchor, state, created, updated, attempts, last_error, "
            "not_before, worker, heartbeat, resting_state, flags, n_subbands, state_reason, "
            "unclean_starts) SELECT ?, ?, state, created, ?, attempts, last_error, not_before, "
            "worker, heartbeat, resting_state, flags, n_subbands, ?, unclean_starts "
            "FROM groups WHERE id = ?",
            (new_id, group_time(new_id).timestamp(), now, f"renamed from {old}: its "
             "canonical time", old))
        for sql in _MOVE_GROUP:
            await db.execute(sql, (new_id, old))
        await db.execute("DELETE FROM groups WHERE id = ?", (old,))
        return await self._group(db, new_id)

    @_atomic
    async def quarantine(self, group_id: str, reason: str, worker_id: str | None = None,
                         now: float | None = None) -> str:
        """Park a group whose data cannot succeed; from an active state the run closes failed.

        ``worker_id``, when given, must hold the claim (the scheduler quarantining its own
        claim); without it ingest or an operator may quarantine any group not yet done. A
        group stopped while collecting is named by its canonical time first, as
        :meth:`mark_ready` does. Returns the group's id from now on.
        """
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            if worker_id is not None:
                self._require_claim(row, worker_id)
            if row["state"] == "collecting":
                row = await self._canonical(db, row, now)
            if row["state"] in _ACTIVE:
                await self._close_run(db, group_id, now, "failed", reason)
            await self._change(db, row, "quarantined", now, reason, last_error=reason,
                               resting_state=_ACTIVE.get(row["state"], (row["state"],))[0])
        log.warning("queue.quarantined", group_id=row["id"], reason=reason,
                    **({"first_named": group_id} if row["id"] != group_id else {}))
        return str(row["id"])

    async def files_of(self, group_id: str) -> dict[int, Path]:
        return {sb: rec.path for sb, rec in (await self.file_records(group_id)).items()}

    async def file_records(self, group_id: str) -> dict[int, FileRecord]:
        async with self._lock:
            rows = await _all(self._db, "SELECT subband, path, size, mtime FROM group_files "
                                        "WHERE group_id = ? ORDER BY subband", (group_id,))
        return {r["subband"]: FileRecord(Path(r["path"]), r["size"], r["mtime"]) for r in rows}

    async def group_state(self, group_id: str) -> str | None:
        async with self._lock:
            row = await _one(self._db, "SELECT state FROM groups WHERE id = ?", (group_id,))
        return None if row is None else row["state"]

    # ----------------------------------------------------------------- scheduler side
    @_atomic
    async def claim(self, worker_id: str, now: float | None = None) -> Claim | None:
        """Take the oldest group waiting in a resting state whose backoff has passed."""
        now = _now(now)
        async with self._write() as db:
            row = await _one(
                db, _CLAIMABLE, (*RESTING_STATES, now))
            if row is None:
                return None
            active, stage = _CLAIMS[row["state"]]
            await self._change(db, row, active, now, f"claimed by {worker_id}",
                               worker=worker_id, heartbeat=now, resting_state=row["state"])
            attempt = row["attempts"] + 1
            await db.execute(
                "INSERT INTO stage_runs (group_id, stage, attempt, worker, started) "
                "VALUES (?, ?, ?, ?, ?)", (row["id"], stage, attempt, worker_id, now))
            files = await _all(db, "SELECT subband, path FROM group_files WHERE group_id = ? "
                                   "ORDER BY subband", (row["id"],))
        return Claim(row["id"], stage, attempt, {f["subband"]: Path(f["path"]) for f in files},
                     json.loads(row["flags"] or "{}"))

    async def heartbeat(self, group_id: str, worker_id: str, now: float | None = None) -> bool:
        """Refresh a claim; False means the claim was lost (taken back as stale) and the
        worker's result will be refused."""
        async with self._lock:
            cur = await self._db.execute(
                _HEARTBEAT, (_now(now), group_id, worker_id, *ACTIVE_STATES))
        return cur.rowcount == 1

    @_atomic
    async def complete(self, group_id: str, worker_id: str, duration_s: float,
                       metrics: Mapping[str, Any] | None = None,
                       now: float | None = None, *, cpu_s: float | None = None,
                       peak_rss_mb: float | None = None, qa_s: float | None = None) -> str:
        """Close a successful stage; returns the new state (``done`` after imaging).

        ``cpu_s``/``peak_rss_mb`` are the stage's worker usage, ``qa_s`` its QA gate's time."""
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            self._require_claim(row, worker_id)
            after = _ACTIVE[row["state"]][1]
            await self._close_run(db, group_id, now, "ok", None, duration_s, metrics or {},
                                  {"cpu_s": cpu_s, "peak_rss_mb": peak_rss_mb, "qa_s": qa_s})
            await self._change(db, row, after, now, f"{_ACTIVE[row['state']][2]} ok",
                               attempts=0, last_error=None)
            await db.execute("UPDATE groups SET unclean_starts = 0 WHERE id = ?", (group_id,))
        return after

    @_atomic
    async def fail(self, group_id: str, worker_id: str, error: str, retry: bool = True, *,
                   duration_s: float | None = None, metrics: Mapping[str, Any] | None = None,
                   now: float | None = None) -> str:
        """Record a failed attempt: back to resting after a backoff, or ``failed`` once
        ``max_attempts`` tries are used or the error cannot pass (``retry=False``)."""
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            self._require_claim(row, worker_id)
            resting = _ACTIVE[row["state"]][0]
            attempts = row["attempts"] + 1
            await self._close_run(db, group_id, now, "failed", error, duration_s, metrics)
            if not retry or attempts >= self.options.max_attempts:
                why = "not retryable" if not retry else f"{attempts} attempts used"
                await self._change(db, row, "failed", now, f"{why}: {error}", attempts=attempts,
                                   last_error=error, resting_state=resting)
                new_state = "failed"
            else:
                delay = min(self.options.backoff_base_s * 2 ** (attempts - 1),
                            self.options.backoff_max_s)
                await self._change(db, row, resting, now, f"retry in {delay:.0f} s: {error}",
                                   attempts=attempts, last_error=error, not_before=now + delay)
                new_state = resting
        log.warning("queue.stage_failed", group_id=group_id, attempt=attempts, error=error,
                    state=new_state)
        return new_state

    @_atomic
    async def defer(self, group_id: str, worker_id: str, until_ts: float, reason: str,
                    now: float | None = None, ran: bool = False) -> None:
        """Put a claim back until ``until_ts`` without using an attempt: no calibration yet
        (the stage never ran: its open run row is dropped, the event keeps the reason), or
        with ``ran`` a stage stopped by something that was not its fault, e.g. a full disk
        (the run is recorded abandoned with the reason)."""
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            self._require_claim(row, worker_id)
            if ran:
                await self._close_run(db, group_id, now, "abandoned", reason)
            else:
                await db.execute("DELETE FROM stage_runs WHERE group_id = ? AND finished IS NULL",
                                 (group_id,))
            await self._change(db, row, _ACTIVE[row["state"]][0], now, f"deferred: {reason}",
                               not_before=float(until_ts))

    @_atomic
    async def release(self, group_id: str, worker_id: str, now: float | None = None) -> None:
        """Give a claim back at shutdown; the run is recorded abandoned, no attempt used."""
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            self._require_claim(row, worker_id)
            await self._close_run(db, group_id, now, "abandoned", "released at shutdown")
            await self._change(db, row, _ACTIVE[row["state"]][0], now, "released at shutdown")

    @_atomic
    async def reconvert(self, group_id: str, worker_id: str, reason: str,
                        now: float | None = None) -> None:
        """Send a claimed group back to conversion because its MS is gone (a reboot emptied
        tmpfs). The run is recorded abandoned; no attempt is used: nothing failed."""
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            self._require_claim(row, worker_id)
            await self._close_run(db, group_id, now, "abandoned", reason)
            await self._change(db, row, "pending", now, f"convert again: {reason}")
        log.warning("queue.reconvert", group_id=group_id, reason=reason)

    @_atomic
    async def recover_stale(self, now: float | None = None, all_active: bool = False,
                            exclude: Iterable[str] = ()) -> list[str]:
        """Take back claims whose heartbeat stopped (or, with ``all_active``, every claim: at
        start-up they belong to a daemon that did not stop cleanly); ``exclude`` the groups a
        running daemon still has in flight.

        No attempt is charged: a worker that dies is a stage failure, charged where it is seen;
        what leaves a claim behind is the daemon (a crash, a lost database write, a group task
        that crashed). Instead each abandoned claim counts (``unclean_starts``, reset when a
        stage of the group completes), and a group whose claim was abandoned ``poison_starts``
        times in a row is quarantined as a suspected poison group, so it can neither
        crash-loop the daemon nor be swept and re-run forever.
        """
        now = _now(now)
        cutoff = now - self.options.claim_timeout_s
        skip = set(exclude)
        taken: list[str] = []
        poisoned: list[str] = []
        async with self._write() as db:
            rows = await _all(db, _ACTIVE_GROUPS, ACTIVE_STATES)
            for row in rows:
                if row["id"] in skip or (not all_active and (row["heartbeat"] or 0.0) >= cutoff):
                    continue
                why = (f"claim by {row['worker']} abandoned "
                       f"(last heartbeat {now - (row['heartbeat'] or now):.0f} s ago)")
                await self._close_run(db, row["id"], now, "abandoned", why)
                resting = _ACTIVE[row["state"]][0]
                starts = row["unclean_starts"] + 1
                await db.execute("UPDATE groups SET unclean_starts = ? WHERE id = ?",
                                 (starts, row["id"]))
                if starts >= self.options.poison_starts:
                    why = (f"suspected poison group: its claim was abandoned {starts} times in a "
                           f"row (unclean daemon stops, or claims left behind) ({why})")
                    await self._change(db, row, "quarantined", now, why, last_error=why,
                                       resting_state=resting)
                    poisoned.append(row["id"])
                else:
                    await self._change(db, row, resting, now, why)
                taken.append(row["id"])
        if taken:
            log.warning("queue.recovered_stale_claims", groups=taken, all_active=all_active,
                        quarantined=poisoned)
        return taken

    @_atomic
    async def requeue(self, group_id: str, now: float | None = None,
                      expected_subbands: int | None = None) -> str:
        """Operator retry: failed/quarantined -> pending with fresh attempts; returns the new
        state. A group stopped at ingest (no stage ever ran) with fewer files than expected
        goes back to ``collecting`` instead, so ingest looks for its files again (an input
        mount that was away, files that came late)."""
        now = _now(now)
        async with self._write() as db:
            row = await self._group(db, group_id)
            if row["state"] not in ("failed", "quarantined"):
                raise IllegalTransition(
                    f"group {group_id} is {row['state']}; only failed or quarantined groups "
                    "can be requeued")
            ran = await _one(db, "SELECT 1 FROM stage_runs WHERE group_id = ? LIMIT 1",
                             (group_id,))
            files = await _one(db, "SELECT count(*) AS n FROM group_files WHERE group_id = ?",
                               (group_id,))
            short = files is not None and files["n"] < (expected_subbands or 0)
            to = "collecting" if row["state"] == "quarantined" and ran is None and short else "pending"
            await self._change(db, row, to, now,
                               f"requeued (was {row['state']}: {row['last_error']})", attempts=0)
            # collecting again: its timeout counts from now, so late files have time to come
            await db.execute("UPDATE groups SET unclean_starts = 0, created = CASE WHEN ? "
                             "THEN ? ELSE created END WHERE id = ?",
                             (to == "collecting", now, group_id))
        log.info("queue.requeued", group_id=group_id, was=row["state"], to=to)
        return to

    @_atomic
    async def wake_flagged(self, key: str, now: float | None = None) -> list[str]:
        """Make resting groups carrying flag ``key`` claimable now and drop the flag.

        Used when what they waited for arrived (a new calibration set for held groups)."""
        now = _now(now)
        woken = []
        async with self._write() as db:
            rows = await _all(db, _FLAGGED_RESTING, (*RESTING_STATES, key))
            for r in rows:
                flags = json.loads(r["flags"] or "{}")
                flags.pop(key, None)
                await db.execute("UPDATE groups SET flags = ?, not_before = ?, updated = ? "
                                 "WHERE id = ?", (_dumps(flags), now, now, r["id"]))
                woken.append(r["id"])
        return woken

    @_atomic
    async def set_flag(self, group_id: str, key: str, value: Any) -> None:
        """Attach a note the later stages read (e.g. ``calibration='uncalibrated'``)."""
        async with self._write() as db:
            row = await self._group(db, group_id)
            flags = json.loads(row["flags"] or "{}")
            flags[str(key)] = value
            await db.execute("UPDATE groups SET flags = ?, updated = ? WHERE id = ?",
                             (_dumps(flags), time.time(), group_id))

    # ----------------------------------------------------------------- reporting
    async def counts(self) -> dict[str, int]:
        """Groups per state, every state present (zeros included) so dashboards stay stable."""
        async with self._lock:
            rows = await _all(self._db, "SELECT state, count(*) AS n FROM groups GROUP BY state")
        out = dict.fromkeys(STATES, 0)
        out.update({r["state"]: r["n"] for r in rows})
        return out

    async def list_groups(self, states: Iterable[str] | None = None,
                          limit: int = 200) -> list[dict[str, Any]]:
        """Newest groups first, optionally only those in ``states``."""
        wanted = None if states is None else list(states)
        unknown = set(wanted or ()) - set(STATES)
        if unknown:
            raise ValueError(f"unknown state(s): {', '.join(sorted(unknown))}")
        async with self._lock:
            rows = await _all(
                self._db,
                "SELECT id, anchor, state, created, updated, attempts, last_error, not_before, "
                "worker, heartbeat, resting_state, flags, n_subbands, state_reason FROM groups "
                "WHERE ?1 IS NULL OR state IN (SELECT value FROM json_each(?1)) "
                "ORDER BY anchor DESC LIMIT ?2",
                (None if wanted is None else json.dumps(wanted), int(limit)))
        return [_group_dict(r) for r in rows]

    @_atomic
    async def get_group(self, group_id: str) -> dict[str, Any]:
        """Everything known about one group: row, files, stage runs and state events."""
        async with self._read() as db:
            out = _group_dict(await self._group(db, group_id))
            out["files"] = [dict(r) for r in await _all(
                db, "SELECT subband, path, size, mtime FROM group_files WHERE group_id = ? "
                    "ORDER BY subband", (group_id,))]
            runs = await _all(
                db, "SELECT stage, attempt, worker, started, finished, duration_s, cpu_s, "
                    "peak_rss_mb, qa_s, outcome, error, metrics FROM stage_runs "
                    "WHERE group_id = ? ORDER BY id", (group_id,))
            out["stage_runs"] = [
                {**dict(r), "metrics": None if r["metrics"] is None else json.loads(r["metrics"])}
                for r in runs]
            out["events"] = [dict(r) for r in await _all(
                db, "SELECT at, from_state, to_state, reason FROM group_events "
                    "WHERE group_id = ? ORDER BY id", (group_id,))]
        return out


async def _one(db: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
    rows = await db.execute_fetchall(sql, tuple(params))  # one thread hop, not three
    return next(iter(rows), None)


async def _all(db: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
    return list(await db.execute_fetchall(sql, tuple(params)))
