"""The caltable registry: which calibration sets exist, their validity, and which one applies.

Lives in the daemon's SQLite file beside the queue (own tables ``cal_sets`` and ``cal_tables``,
own row in ``schema_versions``; unknown tables are never touched), WAL so the status API can
read while the scheduler writes. Every statement is parameterised.

Validity: a table is valid at a group's mid-time when that time lies inside the window it was
registered with (``valid_start_mjd``..``valid_end_mjd``, from the options of the run that
solved it) *and* within the window configured now (``bp_validity_h`` / ``g_validity_h``
either side of the set's mid-time), so tightening a window by configuration takes effect
at once. A bandpass (with the delay table solved beside it) is instrumental: by default it
applies at any declination; ``bp_max_dec_offset_deg`` > 0 restricts it to sets solved within
that offset of the group's pointing. ``find_valid`` combines the newest valid bandpass with the
newest valid gain, possibly from different sets (a field solution registers its gain only);
``find_bandpass`` returns the calibrator solution a field solve takes K, BP and its flux scale
from.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from ..calibration.calset import BANDPASS_KINDS, FIELD_CALIBRATOR, KINDS, CalSet, CalTable
from ..calibration.options import CalibrationOptions
from ..errors import ContimgError
from ..products import jsonable
from ..sqlitedb import SQLiteComponent

log = structlog.get_logger(__name__)

COMPONENT = "calibration_registry"
SCHEMA_VERSION = 1
STATUSES: tuple[str, ...] = ("active", "retired", "failed")

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS cal_sets ("
        " name TEXT PRIMARY KEY,"
        " refant TEXT NOT NULL,"
        " calibrator TEXT NOT NULL,"
        " mid_mjd REAL NOT NULL,"
        " dec_deg REAL NOT NULL,"
        " status TEXT NOT NULL CHECK (status IN ('active', 'retired', 'failed')),"
        " reason TEXT,"
        " params_json TEXT NOT NULL DEFAULT '{}',"
        " qa_json TEXT NOT NULL DEFAULT '{}',"
        " created REAL NOT NULL,"
        " updated REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS cal_tables ("
        " set_name TEXT NOT NULL REFERENCES cal_sets(name) ON DELETE CASCADE,"
        " kind TEXT NOT NULL,"
        " path TEXT NOT NULL,"
        " valid_start_mjd REAL NOT NULL,"
        " valid_end_mjd REAL NOT NULL,"
        " PRIMARY KEY (set_name, kind))",
        "CREATE INDEX IF NOT EXISTS cal_tables_kind_window"
        " ON cal_tables (kind, valid_start_mjd, valid_end_mjd)",
        "CREATE INDEX IF NOT EXISTS cal_sets_status_mid ON cal_sets (status, mid_mjd)",
    ),
}

# The newest active set holding a table of kind ?, valid at ?, within the configured window.
_NEWEST_VALID = (
    "SELECT s.name FROM cal_tables t JOIN cal_sets s ON s.name = t.set_name"
    " WHERE s.status = 'active' AND t.kind = ?"
    " AND t.valid_start_mjd <= ? AND t.valid_end_mjd >= ?"
    " AND abs(s.mid_mjd - ?) <= ?"
    " AND abs(s.dec_deg - ?) <= ?"
    " ORDER BY s.mid_mjd DESC, s.created DESC LIMIT 1"
)
# The newest active field solution of bandpass set ? whose residual-bandpass check ran, near
# (mid, dec).
_CHECKED_BANDPASS = (
    "SELECT name FROM cal_sets WHERE status = 'active' AND calibrator = ?"
    " AND json_extract(params_json, '$.bandpass_set') = ?"
    " AND json_extract(params_json, '$.bandpass_residual.available') = 1"
    " AND coalesce(json_extract(params_json, '$.bandpass_residual.noise_phase_rms_deg'), 0)"
    " <= ?"
    " AND abs(mid_mjd - ?) <= ? AND abs(dec_deg - ?) <= ?"
    " ORDER BY mid_mjd DESC, created DESC LIMIT 1"
)
NO_DEC_LIMIT = 180.0  # bp_max_dec_offset_deg = 0: a bandpass applies at any declination


class RegistryError(ContimgError):
    """A registry call was given something it cannot store (unknown status or table kind)."""


class CalRegistry(SQLiteComponent):
    """One owner of the registry tables; each public method is one transaction."""

    def __init__(self, db: aiosqlite.Connection, path: Path,
                 options: CalibrationOptions | None = None) -> None:
        super().__init__(db, path)
        self.options = options or CalibrationOptions()

    @classmethod
    async def open(cls, db_path: Path, options: CalibrationOptions | None = None,
                   busy_timeout_s: float = 30.0) -> CalRegistry:
        """Open (creating if needed) and migrate; ``options`` is the default for find_valid."""
        return await cls._open(db_path, busy_timeout_s, lambda db, p: cls(db, p, options),
                               COMPONENT, SCHEMA_VERSION, MIGRATIONS)

    # ------------------------------------------------------------------ writes
    async def register(self, calset: CalSet, status: str = "active") -> None:
        """Insert or replace ``calset`` (re-registering the same name is idempotent)."""
        if status not in STATUSES:
            raise RegistryError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        bad = [t.kind for t in calset.tables if t.kind not in KINDS]
        if bad:
            raise RegistryError(f"unknown table kind(s) {bad}; known: {', '.join(KINDS)}")
        if len({t.kind for t in calset.tables}) != len(calset.tables):
            raise RegistryError(f"set {calset.name} lists a table kind twice")
        now = time.time()
        async with self._write() as db:
            await db.execute(
                "INSERT INTO cal_sets (name, refant, calibrator, mid_mjd, dec_deg, status, reason,"
                " params_json, qa_json, created, updated) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET refant = excluded.refant,"
                " calibrator = excluded.calibrator, mid_mjd = excluded.mid_mjd,"
                " dec_deg = excluded.dec_deg, status = excluded.status, reason = NULL,"
                " params_json = excluded.params_json, qa_json = excluded.qa_json,"
                " updated = excluded.updated",
                (calset.name, calset.refant, calset.calibrator, float(calset.mid_mjd),
                 float(calset.dec_deg), status, _dumps(calset.params), _dumps(calset.qa), now, now))
            await db.execute("DELETE FROM cal_tables WHERE set_name = ?", (calset.name,))
            await db.executemany(
                "INSERT INTO cal_tables (set_name, kind, path, valid_start_mjd, valid_end_mjd)"
                " VALUES (?, ?, ?, ?, ?)",
                [(calset.name, t.kind, str(t.path), float(t.valid_start_mjd),
                  float(t.valid_end_mjd)) for t in calset.tables])
        log.info("calset.registered", name=calset.name, status=status, calibrator=calset.calibrator,
                 kinds=[t.kind for t in calset.tables])

    async def _set_status(self, name: str, status: str, reason: str | None) -> bool:
        async with self._write() as db:
            cur = await db.execute("UPDATE cal_sets SET status = ?, reason = ?, updated = ?"
                                   " WHERE name = ?", (status, reason, time.time(), name))
            changed = cur.rowcount > 0
        if changed:
            log.info("calset.status", name=name, status=status, reason=reason)
        else:
            log.warning("calset.unknown", name=name, status=status, reason=reason)
        return changed

    async def retire(self, name: str, reason: str | None = None) -> bool:
        """Stop using a set (kept for the record). False if no such set is registered."""
        return await self._set_status(name, "retired", reason)

    async def mark_failed(self, name: str, reason: str) -> bool:
        """Mark a set failed (never applied). False if no such set is registered."""
        return await self._set_status(name, "failed", reason)

    # ------------------------------------------------------------------ reads
    async def get_set(self, name: str) -> CalSet | None:
        async with self._read() as db:
            return await _load_set(db, name)

    async def status_of(self, name: str) -> str | None:
        async with self._read() as db:
            row = await _one(db, "SELECT status FROM cal_sets WHERE name = ?", (name,))
        return str(row["status"]) if row else None

    async def find_valid(self, mid_mjd: float, dec_deg: float,
                         options: CalibrationOptions | None = None) -> CalSet | None:
        """Newest valid bandpass (+ its delay) and newest valid gain as one set, else None."""
        o = options or self.options
        mid, dec = float(mid_mjd), float(dec_deg)
        async with self._read() as db:
            bp = await _one(db, _NEWEST_VALID, _bp_args(mid, dec, o))
            g = await _one(db, _NEWEST_VALID, ("G", mid, mid, mid, o.g_validity_h / 24.0,
                                               dec, NO_DEC_LIMIT))
            if bp is None or g is None:
                return None
            bp_set = await _load_set(db, bp["name"])
            g_set = await _load_set(db, g["name"])
        if bp_set is None or g_set is None:  # cannot happen inside one snapshot; be safe
            return None
        if bp_set.name == g_set.name:
            return bp_set
        tables = tuple(t for t in bp_set.tables if t.kind in BANDPASS_KINDS) + tuple(
            t for t in g_set.tables if t.kind not in BANDPASS_KINDS)
        return CalSet(name=f"{bp_set.name}+{g_set.name}", tables=tables, refant=g_set.refant,
                      calibrator=g_set.calibrator, mid_mjd=g_set.mid_mjd, dec_deg=bp_set.dec_deg,
                      params={"bp_set": bp_set.name, "g_set": g_set.name,
                              "bp_params": bp_set.params, "g_params": g_set.params},
                      qa={"bp_set": bp_set.qa, "g_set": g_set.qa})

    async def find_bandpass(self, mid_mjd: float, dec_deg: float,
                            options: CalibrationOptions | None = None) -> CalSet | None:
        """The calibrator solution holding the newest valid bandpass, whole (K, BP and the G
        whose amplitudes carry the flux scale), else None."""
        o = options or self.options
        async with self._read() as db:
            bp = await _one(db, _NEWEST_VALID, _bp_args(float(mid_mjd), float(dec_deg), o))
            return None if bp is None else await _load_set(db, bp["name"])

    async def bandpass_checked(self, bandpass_set: str, mid_mjd: float, dec_deg: float,
                               within_h: float, dec_tolerance_deg: float = 0.5,
                               max_noise_deg: float = 180.0) -> str | None:
        """The newest active field solution within ``within_h`` hours of ``mid_mjd`` and
        ``dec_tolerance_deg`` of ``dec_deg`` whose residual-bandpass check of ``bandpass_set``
        ran, could tell (noise at most ``max_noise_deg`` per block) and passed its gate (a set
        is registered only after its gate passed), else None."""
        if within_h <= 0:
            return None
        async with self._read() as db:
            row = await _one(db, _CHECKED_BANDPASS, (FIELD_CALIBRATOR, bandpass_set,
                                                     float(max_noise_deg),
                                                     float(mid_mjd), within_h / 24.0,
                                                     float(dec_deg), dec_tolerance_deg))
        return None if row is None else str(row["name"])

    async def list_sets(self, active_only: bool = False, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first, as JSON-able rows (status, reason, created time and the set itself)."""
        sql = "SELECT name, status, reason, created, updated FROM cal_sets"
        args: tuple[Any, ...] = ()
        if active_only:
            sql += " WHERE status = ?"
            args = ("active",)
        sql += " ORDER BY mid_mjd DESC, created DESC LIMIT ?"
        args += (int(limit),)
        out = []
        async with self._read() as db:
            rows = await _all(db, sql, args)
            for r in rows:
                cs = await _load_set(db, r["name"])
                if cs is None:
                    continue
                out.append({**jsonable(cs.as_dict()), "status": r["status"], "reason": r["reason"],
                            "created": r["created"], "updated": r["updated"]})
        return out

    async def newest_age_hours(self, now_mjd: float) -> float | None:
        """Hours since the newest active set's mid-time (None when there is none)."""
        async with self._read() as db:
            row = await _one(db, "SELECT max(mid_mjd) AS m FROM cal_sets WHERE status = 'active'", ())
        if row is None or row["m"] is None:
            return None
        return (float(now_mjd) - float(row["m"])) * 24.0


# ---------------------------------------------------------------------- helpers
def _bp_args(mid: float, dec: float, o: CalibrationOptions) -> tuple[Any, ...]:
    limit = o.bp_max_dec_offset_deg if o.bp_max_dec_offset_deg > 0 else NO_DEC_LIMIT
    return ("BP", mid, mid, mid, o.bp_validity_h / 24.0, dec, limit)


def _dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), sort_keys=True, allow_nan=False)


async def _one(db: aiosqlite.Connection, sql: str, args: Iterable[Any]) -> sqlite3.Row | None:
    async with db.execute(sql, tuple(args)) as cur:
        return await cur.fetchone()


async def _all(db: aiosqlite.Connection, sql: str, args: Iterable[Any]) -> list[sqlite3.Row]:
    async with db.execute(sql, tuple(args)) as cur:
        return list(await cur.fetchall())


async def _load_set(db: aiosqlite.Connection, name: str) -> CalSet | None:
    row = await _one(db, "SELECT * FROM cal_sets WHERE name = ?", (name,))
    if row is None:
        return None
    trows = await _all(db, "SELECT kind, path, valid_start_mjd, valid_end_mjd FROM cal_tables"
                           " WHERE set_name = ?", (name,))
    order = {k: i for i, k in enumerate(KINDS)}
    tables = tuple(sorted((CalTable(r["kind"], Path(r["path"]), float(r["valid_start_mjd"]),
                                    float(r["valid_end_mjd"])) for r in trows),
                          key=lambda t: order.get(t.kind, len(order))))
    return CalSet(name=row["name"], tables=tables, refant=row["refant"],
                  calibrator=row["calibrator"], mid_mjd=float(row["mid_mjd"]),
                  dec_deg=float(row["dec_deg"]), params=json.loads(row["params_json"] or "{}"),
                  qa=json.loads(row["qa_json"] or "{}"))

