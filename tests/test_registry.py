"""The caltable registry: validity windows, combination of BP and G, status, schema (no CASA)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dsa110_contimg.calibration.calset import CalSet, CalTable
from dsa110_contimg.calibration.options import CalibrationOptions
from dsa110_contimg.config import QueueOptions
from dsa110_contimg.daemon.calregistry import (
    COMPONENT,
    SCHEMA_VERSION,
    CalRegistry,
    RegistryError,
)
from dsa110_contimg.daemon.queue import GroupQueue
from dsa110_contimg.errors import ConfigError

OPT = CalibrationOptions()  # BP +-24 h within 1 deg, G +-1 h


def make_set(name: str, mid: float, dec: float, refant: str = "24", opt: CalibrationOptions = OPT,
             root: Path = Path("/cal")) -> CalSet:
    bp, g = opt.bp_validity_h / 24, opt.g_validity_h / 24
    tables = (CalTable("K", root / f"{name}.K", mid - bp, mid + bp),
              CalTable("BP", root / f"{name}.B", mid - bp, mid + bp),
              CalTable("G", root / f"{name}.G", mid - g, mid + g),
              CalTable("Gp", root / f"{name}.Gp", mid - g, mid + g))
    return CalSet(name, tables, refant, "3C286", mid, dec,
                  params={"uvrange": "", "min_snr": np.float32(3.0)},
                  qa={"median_snr": np.float64(40.0), "bad": float("nan")})


@pytest.fixture
async def reg(tmp_path):
    r = await CalRegistry.open(tmp_path / "contimg.sqlite", OPT)
    yield r
    await r.close()


async def test_round_trip_and_idempotent_register(reg):
    a = make_set("A", 100.0, 30.0)
    await reg.register(a)
    await reg.register(a)  # same name again: replaced, not duplicated
    got = await reg.get_set("A")
    assert got.name == "A" and got.refant == "24" and got.dec_deg == 30.0
    assert [t.kind for t in got.tables] == ["K", "BP", "G", "Gp"]
    assert got.tables == a.tables
    assert got.params == {"uvrange": "", "min_snr": 3.0}
    assert got.qa == {"median_snr": 40.0, "bad": None}  # NaN stored as null, never as invalid JSON
    assert [t.kind for t in got.applied_tables()] == ["K", "BP", "G"]
    assert len(await reg.list_sets()) == 1


async def test_validity_windows(reg):
    await reg.register(make_set("A", 100.0, 30.0))
    h = 1 / 24
    assert (await reg.find_valid(100.0 + 0.5 * h, 30.5, OPT)).name == "A"
    assert (await reg.find_valid(100.0 - 0.9 * h, 29.2, OPT)).name == "A"
    assert await reg.find_valid(100.0 + 1.2 * h, 30.0, OPT) is None, "G expired after 1 h"
    # the bandpass is instrumental: by default it serves any declination
    assert (await reg.find_valid(100.0 + 0.5 * h, 31.5, OPT)).name == "A"
    limited = replace(OPT, bp_max_dec_offset_deg=1.0)
    assert await reg.find_valid(100.0 + 0.5 * h, 31.5, limited) is None, "BP only within 1 deg"
    # A set solved at another declination: its gain serves; with the limit the bandpass must
    # come from A, without it B's newer bandpass is used.
    await reg.register(make_set("B", 100.5, 36.0, refant="25"))
    assert (await reg.find_valid(100.5 + 0.2 * h, 30.0, OPT)).name == "B"
    both = await reg.find_valid(100.5 + 0.2 * h, 30.0, limited)
    assert both.name == "A+B" and both.refant == "25"
    assert {t.kind: t.path.name for t in both.tables} == {"K": "A.K", "BP": "A.B", "G": "B.G",
                                                         "Gp": "B.Gp"}
    assert [t.kind for t in both.applied_tables()] == ["K", "BP", "G"]
    assert both.params["bp_set"] == "A" and both.params["g_set"] == "B"
    # At B's own declination its own bandpass is the newest valid one.
    assert (await reg.find_valid(100.5, 36.2, OPT)).name == "B"
    # 25 h later nothing is valid.
    assert await reg.find_valid(101.05, 30.0, OPT) is None


async def test_newest_wins_and_status_changes(reg):
    await reg.register(make_set("A", 100.0, 30.0))
    await reg.register(make_set("C", 100.01, 30.1))
    at = 100.02
    assert (await reg.find_valid(at, 30.0, OPT)).name == "C"
    assert await reg.retire("C", "operator")
    assert (await reg.find_valid(at, 30.0, OPT)).name == "A"
    assert await reg.mark_failed("A", "QA failed: SNR")
    assert await reg.find_valid(at, 30.0, OPT) is None
    assert not await reg.mark_failed("nope", "never registered")
    assert await reg.status_of("A") == "failed"
    rows = await reg.list_sets()
    assert {r["name"]: (r["status"], r["reason"]) for r in rows} == {
        "A": ("failed", "QA failed: SNR"), "C": ("retired", "operator")}
    assert await reg.list_sets(active_only=True) == []
    await reg.register(make_set("A", 100.0, 30.0))  # re-registered: active again, reason cleared
    assert [r["name"] for r in await reg.list_sets(active_only=True)] == ["A"]


async def test_configured_window_tightens_stored_one(reg):
    await reg.register(make_set("A", 100.0, 30.0))
    assert await reg.find_valid(100.02, 30.0, OPT) is not None
    tight = replace(OPT, g_validity_h=0.25)
    assert await reg.find_valid(100.02, 30.0, tight) is None  # 0.48 h > 0.25 h
    assert await reg.find_valid(100.005, 30.0, tight) is not None
    narrow = replace(OPT, bp_max_dec_offset_deg=0.1)
    assert await reg.find_valid(100.005, 30.3, narrow) is None


async def test_newest_age_hours(reg):
    assert await reg.newest_age_hours(200.0) is None
    await reg.register(make_set("A", 100.0, 30.0))
    await reg.register(make_set("B", 100.5, 30.0))
    assert await reg.newest_age_hours(101.0) == pytest.approx(12.0)
    await reg.retire("B")
    assert await reg.newest_age_hours(101.0) == pytest.approx(24.0)


async def test_rejects_unknown_status_and_kind(reg):
    a = make_set("A", 100.0, 30.0)
    with pytest.raises(RegistryError, match="status"):
        await reg.register(a, status="maybe")
    bad = replace(a, tables=a.tables + (CalTable("X", Path("/x"), 0, 1),))
    with pytest.raises(RegistryError, match="kind"):
        await reg.register(bad)
    assert await reg.get_set("A") is None, "a refused set leaves nothing behind"


async def test_shares_the_queue_database(tmp_path):
    db = tmp_path / "contimg.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE someone_elses (x INTEGER)")
    con.execute("INSERT INTO someone_elses VALUES (7)")
    con.commit()
    con.close()
    queue = await GroupQueue.open(db, QueueOptions())
    reg = await CalRegistry.open(db)
    try:
        await reg.register(make_set("A", 100.0, 30.0))
        assert (await reg.find_valid(100.0, 30.0)).name == "A"  # options from open()
    finally:
        await reg.close()
        await queue.close()
    reg = await CalRegistry.open(db)  # reopening migrates nothing and keeps the data
    await reg.close()
    con = sqlite3.connect(db)
    versions = dict(con.execute("SELECT component, version FROM schema_versions"))
    assert versions[COMPONENT] == SCHEMA_VERSION and len(versions) >= 2
    assert con.execute("SELECT x FROM someone_elses").fetchall() == [(7,)]
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT count(*) FROM cal_tables").fetchone()[0] == 4
    con.execute("UPDATE schema_versions SET version = 99 WHERE component = ?", (COMPONENT,))
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="newer than this software"):
        await CalRegistry.open(db)
