"""What every SQLite owner (queue, calibration registry, image catalogue) shares.

They keep their own tables in one database file: each opens its own aiosqlite connection the
same way and migrates its own component's schema, recorded in ``schema_versions``.
"""

from __future__ import annotations

import asyncio
import sqlite3
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
        db = await connect(db_path, busy_timeout_s)
        try:
            owner = make(db, db_path)
            async with owner._write() as wdb:
                await migrate_component(wdb, component, version, migrations, db_path)
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
