"""The queue database's guard: a check before the daemon opens it, periodic backups, and the
restore (with reconciliation against the products on disk) when the check fails.

One SQLite file (``STATE_DIR/contimg.sqlite``, WAL) holds the queue, the calibration registry
and the image catalogue. The pieces, all blocking work in threads:

- **Start-up check** (:func:`guard_database`, before any component opens the file): a WAL
  whose checksum chain breaks before later commits (SQLite would silently drop those commits,
  :func:`~dsa110_contimg.sqlitedb.wal_dropped_commits`), a file SQLite cannot read ("file is
  not a database", "database disk image is malformed", a truncated file) or a failed
  ``PRAGMA integrity_check`` (``quick_check`` with ``CONTIMG_DB_STARTUP_CHECK=quick``) all
  count as corruption.
- **Restore**: the corrupt file and its ``-wal``/``-shm`` are renamed aside to
  ``contimg.sqlite.corrupt-<UTC stamp>`` (kept for forensics, never deleted), and the newest
  backup that passes ``integrity_check`` is copied in (temp file, fsync, rename, fsync of the
  directory). No sound backup: :class:`ConfigError`, one line naming the file and what to do;
  nothing is moved.
- **Backups** (:func:`backup_loop`, :func:`take_backup`): SQLite's online backup API copies a
  consistent snapshot while the daemon keeps writing, into ``STATE_DIR/backups/.<name>.tmp``;
  the copy must pass ``integrity_check``, is fsynced and renamed to
  ``contimg-YYYYMMDDTHHMMSSZ.sqlite`` (names sort by time), the directory fsynced; then all
  but the newest ``CONTIMG_DB_BACKUP_KEEP`` are deleted.

**Reconciliation after a restore** (:func:`reconcile_products`). The restored database is the
queue as it was at the backup; what happened since is found again on disk:

- Groups that arrived since are found by the watcher's start-up scan of the input directory
  and collected again (``create_group`` is ``ON CONFLICT DO NOTHING``, ``record_file`` an
  upsert on (group, subband)), so they are neither lost nor doubled.
- Groups that *finished* since would be processed again and their products overwritten. A
  finished group leaves ``OUTPUT_DIR/<day>/<group>/`` with the imaging record
  ``<stem>.imaging.json`` (published last, after every image file) and a ``qa.json`` whose
  ``stages.imaging`` passed. Every such directory of a day from one day before the earlier
  of the backup and the oldest unfinished group in it onwards, or of an older day whose
  directory changed since then (a group of old data, e.g. a backlog, began there after the
  backup), is taken as the truth: a
  group the database does not know is inserted as ``done``; a group it holds in any other
  state is moved to ``done`` (an open stage run is closed ``abandoned``; the ``group_events``
  trigger logs the change with the reason); its subband files still in the input directory
  are attached to it (the nearest group within the grouping tolerance, as ingest matches),
  so the watcher's scan sees them as already queued rather than as late files; and the image
  catalogue gets the group's row from the record unless it has one (``images.image_path`` is
  unique, and the owner's ``record`` is an upsert). A group id is the table's primary key, so
  a group is in one state only; a catalogue row is added only where none exists for the group.
- Not recovered: calibration sets registered since the backup (later groups solve or wait
  again as the registry decides), and the history (stage runs, events) of groups finished
  since, of which the record and ``qa.json`` on disk keep the essentials.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ..alerting.alert import Alert, Severity
from ..config import DatabaseOptions, QueueOptions
from ..errors import ConfigError, ContimgError
from ..products import (
    InvalidName,
    fsync_dir,
    group_time,
    parse_subband_name,
    product_dir,
    publish_file,
    validate_group_id,
)
from ..sqlitedb import backup_to, check_integrity, wal_dropped_commits

log = structlog.get_logger(__name__)

BACKUP_PREFIX = "contimg-"
BACKUP_SUFFIX = ".sqlite"
_STAMP = "%Y%m%dT%H%M%SZ"
_DAY_S = 86400.0
_SIDE_FILES = ("-wal", "-shm")


class BackupFailed(ContimgError):
    """A backup could not be written or did not pass its integrity check."""


@dataclass
class ReconcileReport:
    """What :func:`reconcile_products` changed; group ids in each list."""

    inserted: list[str] = field(default_factory=list)
    advanced: dict[str, str] = field(default_factory=dict)  # group -> state it was in
    images_added: list[str] = field(default_factory=list)
    files_attached: int = 0

    def summary(self) -> str:
        return (f"{len(self.inserted)} finished group(s) added, {len(self.advanced)} moved to "
                f"done, {len(self.images_added)} catalogue row(s) added, "
                f"{self.files_attached} input file(s) attached")


@dataclass
class RecoveryReport:
    """A start-up restore: what was wrong, where the corrupt files went, what replaced them."""

    db_path: Path
    problems: list[str]
    moved_aside: list[Path]
    restored_from: Path
    backup_time: float
    reconciled: ReconcileReport | None = None

    def alert(self) -> Alert:
        """The CRITICAL alert the service raises once its router runs."""
        age_h = (time.time() - self.backup_time) / 3600.0
        text = (f"{self.db_path} was corrupt ({self.problems[0]}); moved aside to "
                f"{self.moved_aside[0].name} and restored from {self.restored_from.name} "
                f"({age_h:.1f} h old).")
        if self.reconciled is not None:
            text += f" From the products on disk: {self.reconciled.summary()}."
        text += " Calibration sets registered after the backup are not restored."
        return Alert(Severity.CRITICAL, "database.restored",
                     "Queue database was corrupt: restored from backup", text,
                     {"db": str(self.db_path), "problems": self.problems[:5],
                      "moved_aside": [str(p) for p in self.moved_aside],
                      "backup": str(self.restored_from), "backup_age_h": round(age_h, 2),
                      "reconciled": None if self.reconciled is None else {
                          "inserted": self.reconciled.inserted,
                          "advanced": self.reconciled.advanced,
                          "images_added": self.reconciled.images_added,
                          "files_attached": self.reconciled.files_attached}})


# ------------------------------------------------------------------------------ backups
def backup_name(when: float) -> str:
    return f"{BACKUP_PREFIX}{datetime.fromtimestamp(when, UTC).strftime(_STAMP)}{BACKUP_SUFFIX}"


def backup_time(path: Path) -> float | None:
    """The time a backup's name records, or None for a file that is not one of ours."""
    name = Path(path).name
    if not (name.startswith(BACKUP_PREFIX) and name.endswith(BACKUP_SUFFIX)):
        return None
    try:
        stamp = datetime.strptime(name[len(BACKUP_PREFIX):-len(BACKUP_SUFFIX)], _STAMP)
    except ValueError:
        return None
    return stamp.replace(tzinfo=UTC).timestamp()


def list_backups(backup_dir: Path) -> list[Path]:
    """Our backups in ``backup_dir``, newest first."""
    try:
        found = [p for p in Path(backup_dir).iterdir() if backup_time(p) is not None]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda p: p.name, reverse=True)


def rotate_backups(backup_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups; returns what was deleted."""
    removed = []
    for old in list_backups(backup_dir)[max(1, keep):]:
        old.unlink(missing_ok=True)
        removed.append(old)
    return removed


def take_backup(db_path: Path, backup_dir: Path, keep: int, now: float | None = None) -> Path:
    """Write one checked backup of ``db_path`` and rotate; blocking (run it in a thread).

    Raises :class:`BackupFailed` when the copy fails or is not sound; nothing half-written
    is left under a backup's name."""
    backup_dir = Path(backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)
    final = backup_dir / backup_name(time.time() if now is None else now)
    tmp = backup_dir / f".{final.name}.{os.getpid()}.tmp"
    started = time.monotonic()
    for stale in backup_dir.glob(f".{BACKUP_PREFIX}*.tmp*"):  # a backup cut short by a crash
        stale.unlink(missing_ok=True)
    try:
        backup_to(db_path, tmp)
        problems = check_integrity(tmp)
        if problems:
            raise BackupFailed(f"backup of {db_path} failed its integrity check: {problems[0]}")
        publish_file(tmp, final)
        fsync_dir(backup_dir)
    except sqlite3.Error as exc:
        raise BackupFailed(f"backup of {db_path} failed: {type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise BackupFailed(f"backup of {db_path} to {backup_dir} failed: "
                           f"{exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}-journal").unlink(missing_ok=True)
    removed = rotate_backups(backup_dir, keep)
    log.info("db_backup_written", backup=str(final), bytes=final.stat().st_size,
             seconds=round(time.monotonic() - started, 2), removed=[p.name for p in removed])
    return final


async def backup_loop(db_path: Path, backup_dir: Path, options: DatabaseOptions,
                      stop: asyncio.Event, emit: Callable[[Alert], None] | None = None,
                      first_delay_s: float = 60.0) -> None:
    """Back the database up every ``backup_interval_s`` until ``stop`` is set; never raises.

    The first backup is due ``backup_interval_s`` after the newest one on disk (at least
    ``first_delay_s`` after start-up), so restarts do not multiply backups. A failed backup
    is logged and raises one ERROR alert; the next success clears it with an INFO one."""
    newest = list_backups(backup_dir)
    last = backup_time(newest[0]) if newest else None
    due = options.backup_interval_s - (time.time() - last) if last else 0.0
    delay = max(first_delay_s, due)
    failing = False
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return
        except TimeoutError:
            pass
        delay = options.backup_interval_s
        try:
            path = await asyncio.to_thread(take_backup, db_path, backup_dir, options.backup_keep)
        except Exception as exc:  # noqa: BLE001 - a failed backup must not stop the daemon
            log.error("db_backup_failed", db=str(db_path), error=str(exc))
            if not failing and emit is not None:
                emit(Alert(Severity.ERROR, "database.backup", "Database backup failed",
                           str(exc), {"db": str(db_path), "backup_dir": str(backup_dir)}))
            failing = True
            continue
        if failing and emit is not None:
            emit(Alert(Severity.INFO, "database.backup", "Cleared: database backups work again",
                       f"wrote {path}", {"backup": str(path)}))
        failing = False


# ------------------------------------------------------------------------------ start-up check
def _stamp_now() -> str:
    return datetime.now(UTC).strftime(_STAMP)


def database_problems(db_path: Path, quick: bool = False) -> list[str]:
    """What is wrong with ``db_path``; [] when sound (or absent: a first start)."""
    db_path = Path(db_path)
    if not db_path.exists():
        return []
    dropped = wal_dropped_commits(db_path)
    if dropped:  # check before opening: an open would replay the prefix and drop the rest
        return [f"its WAL is damaged: {dropped} committed transaction(s) cannot be replayed"]
    return check_integrity(db_path, quick=quick)


def _copy_durably(source: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.restore.{os.getpid()}.tmp")
    try:
        shutil.copyfile(source, tmp)
        publish_file(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def check_and_restore(db_path: Path, backup_dir: Path, quick: bool = False) -> RecoveryReport | None:
    """Check ``db_path``; when it is corrupt, move it aside and restore the newest sound backup.

    Returns None when the database is sound (or absent). Raises :class:`ConfigError` (one
    line) when it is corrupt and no backup passes ``integrity_check``. Blocking."""
    db_path = Path(db_path)
    started = time.monotonic()
    problems = database_problems(db_path, quick)
    log.info("db_checked", db=str(db_path), check="quick_check" if quick else "integrity_check",
             ok=not problems, seconds=round(time.monotonic() - started, 2))
    if not problems:
        return None
    log.critical("db_corrupt", db=str(db_path), problems=problems[:10])
    good: Path | None = None
    for candidate in list_backups(backup_dir):
        bad = check_integrity(candidate)
        if not bad:
            good = candidate
            break
        log.error("db_backup_unsound", backup=str(candidate), problems=bad[:5])
    if good is None:
        raise ConfigError(
            f"CONTIMG_STATE_DIR: the database {db_path} is corrupt ({problems[0]}) and "
            f"{backup_dir} holds no sound backup; move {db_path.name} and its -wal/-shm "
            "aside to start with an empty queue (groups still in the input directory are "
            "ingested again)")
    aside = db_path.with_name(f"{db_path.name}.corrupt-{_stamp_now()}")
    moved = []
    for suffix in ("", *_SIDE_FILES):
        src = Path(f"{db_path}{suffix}")
        if src.exists():
            dest = Path(f"{aside}{suffix}")
            os.replace(src, dest)
            moved.append(dest)
    fsync_dir(db_path.parent)
    _copy_durably(good, db_path)
    when = backup_time(good) or good.stat().st_mtime
    log.critical("db_restored", db=str(db_path), backup=str(good),
                 moved_aside=[str(p) for p in moved])
    return RecoveryReport(db_path, problems, moved, good, when)


async def guard_database(db_path: Path, backup_dir: Path, options: DatabaseOptions,
                         output_dir: Path, input_dir: Path,
                         group_tolerance_s: float) -> RecoveryReport | None:
    """The start-up entry point: check, restore if needed, and reconcile a restored database
    with the products on disk. None when the database was sound; raises ``ConfigError``
    when it is corrupt with no sound backup. Call before any component opens the file."""
    report = await asyncio.to_thread(check_and_restore, db_path, backup_dir,
                                     options.startup_check == "quick")
    if report is not None:
        report.reconciled = await reconcile_products(db_path, output_dir, input_dir,
                                                     group_tolerance_s, report.backup_time)
    return report


# ------------------------------------------------------------------------------ reconciliation
@dataclass(frozen=True)
class FinishedGroup:
    """A group whose product directory shows it finished: the imaging record and the
    imaging QA verdict from qa.json."""

    group_id: str
    record_path: Path
    result: dict[str, Any]
    qa: dict[str, Any]


def finished_group(directory: Path) -> FinishedGroup | None:
    """The finished group in one product directory, or None if it did not finish."""
    from ..imaging.stage import product_names

    try:
        gid = validate_group_id(directory.name)
    except InvalidName:
        return None
    record = product_names(directory, gid)["record"]
    try:
        result = json.loads(record.read_text())["result"]
        qa = json.loads((directory / "qa.json").read_text())["stages"]["imaging"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(result, dict) or not isinstance(qa, dict) or qa.get("passed") is not True:
        return None
    return FinishedGroup(gid, record, result, qa)


def find_finished(output_dir: Path, since: float) -> list[FinishedGroup]:
    """Finished groups in the day directories of ``output_dir`` dated on or after ``since``,
    or modified since then (a group directory created there: old data processed lately)."""
    first_day = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
    found = []
    try:
        days = sorted(p for p in Path(output_dir).iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    for day in days:
        if len(day.name) != 10 or (day.name < first_day and not _modified_since(day, since)):
            continue
        for d in sorted(day.iterdir()):
            if d.is_dir() and d.name[:10] == day.name:
                got = finished_group(d)
                if got is not None and product_dir(output_dir, got.group_id) == d:
                    found.append(got)
    return found


def _modified_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _scan_input(input_dir: Path) -> list[tuple[Path, int, float, int, float]]:
    """(path, subband, timestamp, size, mtime) of every subband file in ``input_dir``."""
    out = []
    try:
        entries = list(os.scandir(input_dir))
    except OSError:
        return []
    for e in entries:
        try:
            name = parse_subband_name(e.name)
            st = e.stat()
        except (InvalidName, OSError):
            continue
        out.append((Path(input_dir) / e.name, name.subband, name.timestamp.timestamp(),
                    st.st_size, st.st_mtime))
    return out


def _reconcile_since(db_path: Path, backup_ts: float) -> float:
    """One day before the earlier of the backup and the oldest unfinished group in it."""
    con = sqlite3.connect(str(db_path))
    try:
        row = con.execute("SELECT min(anchor) FROM groups WHERE state != 'done'").fetchone()
    finally:
        con.close()
    oldest = row[0] if row and row[0] is not None else backup_ts
    return min(backup_ts, float(oldest)) - _DAY_S


def _mark_done(db_path: Path, finished: list[FinishedGroup], input_dir: Path,
               tolerance_s: float, now: float) -> ReconcileReport:
    """Insert or advance the finished groups to ``done`` and attach their input files; one
    transaction. Runs before the queue owner opens the file (the schema is migrated)."""
    report = ReconcileReport()
    con = sqlite3.connect(str(db_path), isolation_level=None, timeout=30)
    try:
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("BEGIN IMMEDIATE")
        targets = set()
        for f in finished:
            why = f"finished on disk ({f.record_path.name}); recovered after a database restore"
            row = con.execute("SELECT state FROM groups WHERE id = ?", (f.group_id,)).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO groups (id, anchor, state, created, updated, state_reason) "
                    "VALUES (?, ?, 'done', ?, ?, ?)",
                    (f.group_id, group_time(f.group_id).timestamp(), now, now, why))
                report.inserted.append(f.group_id)
            elif row[0] != "done":
                con.execute(
                    "UPDATE stage_runs SET finished = ?1, duration_s = max(0.0, ?1 - started), "
                    "outcome = 'abandoned', error = ?2 WHERE group_id = ?3 AND finished IS NULL",
                    (now, why, f.group_id))
                con.execute(
                    "UPDATE groups SET state = 'done', updated = ?, worker = NULL, "
                    "heartbeat = NULL, not_before = 0, last_error = NULL, resting_state = NULL, "
                    "state_reason = ? WHERE id = ?", (now, why, f.group_id))
                report.advanced[f.group_id] = row[0]
            else:
                continue
            targets.add(f.group_id)
        for path, subband, ts, size, mtime in _scan_input(input_dir) if targets else ():
            near = con.execute(
                "SELECT id FROM groups WHERE anchor BETWEEN ? AND ? "
                "ORDER BY abs(anchor - ?), anchor LIMIT 1",
                (ts - tolerance_s, ts + tolerance_s, ts)).fetchone()
            if near is None or near[0] not in targets:
                continue
            cur = con.execute(
                "INSERT INTO group_files (group_id, subband, path, size, mtime) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(group_id, subband) DO NOTHING",
                (near[0], subband, str(path), size, mtime))
            report.files_attached += max(0, cur.rowcount)
        for gid in targets:
            con.execute("UPDATE groups SET n_subbands = (SELECT count(*) FROM group_files "
                        "WHERE group_id = ?1) WHERE id = ?1", (gid,))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return report


async def reconcile_products(db_path: Path, output_dir: Path, input_dir: Path,
                             group_tolerance_s: float, backup_ts: float) -> ReconcileReport:
    """Bring a restored database up to what the products directory records (module doc)."""
    from ..imaging.stage import ImagingResult
    from ..qa.result import QAResult
    from .calregistry import CalRegistry
    from .imagecatalog import ImageCatalog
    from .queue import GroupQueue

    # the owners migrate a backup written by older software before anything is changed
    for opened in (GroupQueue.open(db_path, QueueOptions()), CalRegistry.open(db_path)):
        await (await opened).close()
    since = await asyncio.to_thread(_reconcile_since, db_path, backup_ts)
    finished = await asyncio.to_thread(find_finished, output_dir, since)
    report = await asyncio.to_thread(_mark_done, db_path, finished, input_dir,
                                     group_tolerance_s, time.time())
    async with await ImageCatalog.open(db_path) as catalog:
        for f in finished:
            if await catalog.list_images(group_id=f.group_id, limit=1):
                continue
            try:
                result = ImagingResult.from_dict(f.result)
                q = f.qa
                qa = QAResult(str(q.get("gate", "image")), True, dict(q.get("metrics") or {}),
                              tuple(q.get("failures") or ()), tuple(q.get("warnings") or ()),
                              float(q.get("duration_s") or 0.0))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("db_reconcile_record_unreadable", group_id=f.group_id,
                          record=str(f.record_path), error=str(exc))
                continue
            await catalog.record(result, qa)
            report.images_added.append(f.group_id)
    log.warning("db_reconciled", since=datetime.fromtimestamp(since, UTC).isoformat(),
                inserted=report.inserted, advanced=report.advanced,
                images_added=report.images_added, files_attached=report.files_attached)
    return report
