"""The images table: one row per published image, in the daemon's SQLite file.

Lives in the same database as the queue (the lead passes the path) but owns only its table
and its ``schema_versions`` row (component 'images'); it never touches or drops anything
else. WAL so the status API can read while the scheduler writes; parameterised SQL only.
Re-recording an image (a requeued group re-imaged into the same path) updates its row.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ..products import jsonable
from ..qa.result import QAResult
from ..sqlitedb import SQLiteComponent

log = structlog.get_logger(__name__)

COMPONENT = "images"
SCHEMA_VERSION = 1

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS images (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            group_id TEXT NOT NULL,
            image_path TEXT NOT NULL UNIQUE,
            pbcor_path TEXT,
            quicklook_path TEXT,
            residual_path TEXT,
            recorded_at TEXT NOT NULL,
            freq_hz REAL,
            centre_ra_deg REAL,
            centre_dec_deg REAL,
            imsize INTEGER,
            cell_arcsec REAL,
            bmaj_arcsec REAL,
            bmin_arcsec REAL,
            bpa_deg REAL,
            rms_jy REAL,
            peak_jy REAL,
            dynamic_range REAL,
            tier TEXT,
            duration_s REAL,
            qa_passed INTEGER,
            qa_reason TEXT,
            qa_json TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS images_group ON images (group_id)",
        "CREATE INDEX IF NOT EXISTS images_recorded ON images (recorded_at)",
    ),
}

_COLUMNS = ("group_id", "image_path", "pbcor_path", "quicklook_path", "residual_path",
            "recorded_at", "freq_hz", "centre_ra_deg", "centre_dec_deg", "imsize", "cell_arcsec",
            "bmaj_arcsec", "bmin_arcsec", "bpa_deg", "rms_jy", "peak_jy", "dynamic_range", "tier",
            "duration_s", "qa_passed", "qa_reason", "qa_json")


def _finite(x: Any) -> Any:
    """NaN/Inf become NULL (SQLite would store NaN as NULL anyway, Inf as a float)."""
    return jsonable(x)


class ImageCatalog(SQLiteComponent):
    """Async access to the images table (one connection per owner)."""

    @classmethod
    async def open(cls, db_path: Path, busy_timeout_s: float = 30.0) -> ImageCatalog:
        return await cls._open(db_path, busy_timeout_s, cls, COMPONENT, SCHEMA_VERSION, MIGRATIONS)

    async def record(self, result: Any, qa: QAResult | None = None) -> int:
        """Insert (or update, by image path) the row for an ``ImagingResult``; returns its id."""
        values = {
            "group_id": result.group_id,
            "image_path": str(result.image_fits),
            "pbcor_path": str(result.pbcor_fits) if result.pbcor_fits else None,
            "quicklook_path": str(result.quicklook_png) if result.quicklook_png else None,
            "residual_path": str(getattr(result, "residual_fits", None) or "") or None,
            "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "freq_hz": _finite(result.freq_hz),
            "centre_ra_deg": _finite(result.centre_ra_deg),
            "centre_dec_deg": _finite(result.centre_dec_deg),
            "imsize": int(result.imsize),
            "cell_arcsec": _finite(result.cell_arcsec),
            "bmaj_arcsec": _finite(result.bmaj_arcsec),
            "bmin_arcsec": _finite(result.bmin_arcsec),
            "bpa_deg": _finite(result.bpa_deg),
            "rms_jy": _finite(result.rms_jy),
            "peak_jy": _finite(result.peak_jy),
            "dynamic_range": _finite(result.dynamic_range),
            "tier": getattr(result, "tier", None),
            "duration_s": _finite(result.duration_s),
            "qa_passed": None if qa is None else int(qa.passed),
            "qa_reason": None if qa is None else qa.reason,
            "qa_json": None if qa is None else json.dumps(qa.as_dict()),
        }
        cols = ", ".join(_COLUMNS)
        marks = ", ".join("?" for _ in _COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "image_path")
        sql = (f"INSERT INTO images ({cols}) VALUES ({marks}) "  # noqa: S608 - fixed column names
               f"ON CONFLICT(image_path) DO UPDATE SET {updates}")
        async with self._write() as db:
            await db.execute(sql, tuple(values[c] for c in _COLUMNS))
            async with db.execute("SELECT id FROM images WHERE image_path = ?",
                                  (values["image_path"],)) as cur:
                row = await cur.fetchone()
        log.info("images.recorded", group_id=result.group_id, image=values["image_path"],
                 qa_passed=values["qa_passed"])
        return int(row["id"])

    async def list_images(self, group_id: str | None = None, since: str | None = None,
                          until: str | None = None, qa_passed: bool | None = None,
                          limit: int = 100) -> list[dict[str, Any]]:
        """Rows, newest first, filtered by group, recorded_at range (ISO text) and QA outcome."""
        where, args = [], []
        if group_id is not None:
            where.append("group_id = ?")
            args.append(group_id)
        if since is not None:
            where.append("recorded_at >= ?")
            args.append(since)
        if until is not None:
            where.append("recorded_at < ?")
            args.append(until)
        if qa_passed is not None:
            where.append("qa_passed = ?")
            args.append(int(qa_passed))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = f"SELECT * FROM images {clause} ORDER BY recorded_at DESC, id DESC LIMIT ?"  # noqa: S608 - clause built from fixed strings
        args.append(int(limit))
        async with self._read() as db, db.execute(sql, tuple(args)) as cur:
            rows = await cur.fetchall()
        return [_row(r) for r in rows]

    async def latest(self, n: int = 10) -> list[dict[str, Any]]:
        return await self.list_images(limit=n)


def _row(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    if d.get("qa_json"):
        d["qa"] = json.loads(d.pop("qa_json"))
    else:
        d.pop("qa_json", None)
        d["qa"] = None
    if d.get("qa_passed") is not None:
        d["qa_passed"] = bool(d["qa_passed"])
    return d
