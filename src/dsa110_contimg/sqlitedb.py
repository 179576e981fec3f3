"""What every SQLite owner (queue, calibration registry, image catalogue) shares.

They keep their own tables in one database file: each opens its own aiosqlite connection the
same way and migrates its own component's schema, recorded in ``schema_versions``. A file
that SQLite cannot read at open time (corrupt, not a database, unreadable) is a
:class:`ConfigError`: one line naming the file, never a traceback. The blocking helpers at
the end (:func:`check_integrity`, :func:`backup_to`, :func:`wal_dropped_commits`) are what the
daemon's database guard builds on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import aiosqlite
import structlog

from .errors import ConfigError

log = structlog.get_logger(__name__)


async def connect(db_path: Path, busy_timeout_s: float = 30.0) -> aiosqlite.Connection:
    """WAL (readers never block the writer), a busy timeout, rows as mappings.

    synchronous=NORMAL in WAL mode: a process crash loses nothing; a power cut may drop the
    last commits but never corrupts, and each transition is not an fsync."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = await aiosqlite.connect(str(db_path), isolation_level=None, timeout=busy_timeout_s)
    try:
        db.row_factory = sqlite3.Row
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()
        raise
    return db


async def migrate_component(db: aiosqlite.Connection, component: str, target: int,
                            migrations: Mapping[int, Sequence[str]], path: Path) -> int:
    """Bring ``component``'s tables to ``target``; call inside an open write transaction.

    Never touches other components' tables; refuses a database from newer software."""
    await db.execute("CREATE TABLE IF NOT EXISTS schema_versions ("
                     "component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    async with db.execute("SELECT version FROM schema_versions WHERE component = ?",
                          (component,)) as cur:
        row = await cur.fetchone()
    current = int(row["version"]) if row else 0
    if current > target:
        raise ConfigError(f"CONTIMG_STATE_DIR: {path} has {component} schema v{current}, newer "
                          f"than this software (v{target}); upgrade dsa110-contimg")
    for version in range(current + 1, target + 1):
        for statement in migrations[version]:
            await db.execute(statement)
    if current < target:
        await db.execute("INSERT INTO schema_versions (component, version) VALUES (?, ?) "
                         "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                         (component, target))
        log.info("schema_migrated", component=component, path=str(path),
                 from_version=current, to_version=target)
    return current


class SQLiteComponent:
    """One component's connection: opening with migration, transactions, closing.

    Subclasses call ``_open`` from their own ``open`` with their component name and module-level
    migrations (the SQL stays literal, as the fault suite's taint scan checks). All coroutines
    of a process share the one aiosqlite connection, so the lock keeps one coroutine's
    statements out of another's open transaction.
    """

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._lock = asyncio.Lock()

    @classmethod
    async def _open(cls, db_path: Path, busy_timeout_s: float,
                    make: Callable[[aiosqlite.Connection, Path], Any], component: str,
                    version: int, migrations: Mapping[int, Sequence[str]]) -> Any:
        """Connect, build with ``make(db, path)``, migrate; the connection is closed on failure."""
        db_path = Path(db_path)
        try:
            db = await connect(db_path, busy_timeout_s)
        except sqlite3.DatabaseError as exc:
            raise unusable_database(db_path, exc) from None
        try:
            owner = make(db, db_path)
            async with owner._write() as wdb:
                await migrate_component(wdb, component, version, migrations, db_path)
        except sqlite3.DatabaseError as exc:
            await db.close()
            raise unusable_database(db_path, exc) from None
        except BaseException:
            await db.close()
            raise
        return owner

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so read-then-update cannot race."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """A consistent snapshot for multi-statement reads."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN")
                yield self._db
            finally:
                await self._rollback()

    async def _rollback(self) -> None:
        # Unconditional and in statement order: a BEGIN still queued in aiosqlite's thread
        # runs first, so no transaction is ever left open on the shared connection.
        try:
            await self._db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass  # no transaction was active (BEGIN failed, or COMMIT already ended it)


def unusable_database(path: Path, exc: sqlite3.DatabaseError) -> ConfigError:
    """The one-line error for a database file SQLite refuses at open time.

    Corruption (``DatabaseError`` proper: "file is not a database", "database disk image is
    malformed") points at the restore `contimg run` does from the backups; an operational
    error (locked, unreadable, disk I/O) is reported as it is."""
    what = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, sqlite3.OperationalError):
        return ConfigError(f"CONTIMG_STATE_DIR: cannot open the database {path}: {what}")
    return ConfigError(f"CONTIMG_STATE_DIR: the database {path} is corrupt ({what}); "
                       f"`contimg run` restores it from {path.parent / 'backups'} at start-up, "
                       "or move it aside to start with an empty queue")


# ----------------------------------------------------------------- blocking maintenance helpers
def check_integrity(path: Path, quick: bool = False) -> list[str]:
    """Problems ``PRAGMA integrity_check`` (or ``quick_check``) finds in ``path``; [] when sound.

    A file SQLite cannot read at all ("file is not a database", "database disk image is
    malformed" raised while reading) is one problem named by the error. Blocking: run it in
    a thread. Opening replays the file's WAL, as any connection would."""
    pragma = "quick_check" if quick else "integrity_check"
    try:
        con = sqlite3.connect(f"file:{Path(path)}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return [f"{type(exc).__name__}: {exc}"]
    try:
        rows = con.execute(f"PRAGMA {pragma}").fetchall()
        con.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.Error as exc:
        return [f"{type(exc).__name__}: {exc}"]
    finally:
        con.close()
    found = [str(r[0]) for r in rows]
    return [] if found == ["ok"] else found


def backup_to(source: Path, dest: Path) -> None:
    """Copy ``source`` into the new file ``dest`` with SQLite's online backup API.

    One step under one read transaction: a consistent snapshot of the last commit, taken while
    other connections keep writing (WAL: the reader blocks no writer). ``dest`` is written
    with journal_mode=DELETE so it is a single self-contained file; not fsynced here."""
    src = sqlite3.connect(f"file:{Path(source)}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(str(dest))
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
    finally:
        src.close()


_WAL_MAGIC = (0x377F0682, 0x377F0683)


def _wal_checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum (Fletcher-like over 32-bit words) continuing from (s0, s1)."""
    fmt = ">" if big_endian else "<"
    words = struct.unpack(f"{fmt}{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & mask
        s1 = (s1 + words[i + 1] + s0) & mask
    return s0, s1


def wal_dropped_commits(path: Path) -> int:
    """Committed transactions in ``path``'s WAL that SQLite would silently skip; 0 if none.

    SQLite replays a WAL up to the first frame whose checksum chain breaks and ignores the
    rest without an error, so a damaged WAL loses commits quietly. This walks the chain as
    SQLite does and counts the commit frames of the current WAL generation (same salts as
    the header) found after the break. A torn final transaction (a crash mid-write) has no
    commit frame after the break and counts 0; frames left from an earlier generation have
    other salts and are ignored. A WAL whose header is damaged while frames follow counts
    each of those frames' commits. Read before any connection opens the database."""
    wal = Path(f"{path}-wal")
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < 32:
        return 0
    magic, _, page_size, _, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:32])
    if magic not in _WAL_MAGIC or _wal_checksum(data[:24], magic & 1 == 1) != (c0, c1) \
            or not 512 <= page_size <= 65536:
        # header damaged: SQLite ignores every frame; the page size comes from the database
        page_size = _db_page_size(path)
        if page_size is None:
            return 0
        frame = 24 + page_size
        return sum(1 for off in range(32, len(data) - frame + 1, frame)
                   if struct.unpack(">I", data[off + 4:off + 8])[0])
    frame = 24 + page_size
    big = magic & 1 == 1
    s0, s1 = c0, c1
    off, broken, dropped = 32, False, 0
    while off + frame <= len(data):
        head = data[off:off + 24]
        pgno, commit, f1, f2, k0, k1 = struct.unpack(">6I", head)
        same_gen = (f1, f2) == (salt1, salt2)
        if not broken:
            n0, n1 = _wal_checksum(head[:8], big, s0, s1)
            n0, n1 = _wal_checksum(data[off + 24:off + frame], big, n0, n1)
            if same_gen and pgno and (n0, n1) == (k0, k1):
                s0, s1 = n0, n1
            else:
                broken = True
        if broken and same_gen and commit:
            dropped += 1
        off += frame
    return dropped


def _db_page_size(path: Path) -> int | None:
    """The page size in a database file's header, or None when it has none."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(18)
    except OSError:
        return None
    if len(head) < 18 or not head.startswith(b"SQLite format 3\0"):
        return None
    size = struct.unpack(">H", head[16:18])[0]
    return 65536 if size == 1 else size
