"""The images table shares the queue's SQLite file without disturbing anything else in it."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from dsa110_contimg.daemon.imagecatalog import SCHEMA_VERSION, ImageCatalog
from dsa110_contimg.errors import ConfigError
from dsa110_contimg.imaging.stage import ImagingResult
from dsa110_contimg.qa.result import QAResult


def _result(tmp: Path, gid: str = "2026-06-01T04:46:06", rms: float = 0.0076) -> ImagingResult:
    d = tmp / gid[:10] / gid
    stem = gid.replace(":", "")
    return ImagingResult(
        group_id=gid, image_fits=d / f"{stem}.image.fits", pbcor_fits=d / f"{stem}.pbcor.fits",
        quicklook_png=d / "quicklook.png", residual_fits=d / f"{stem}.residual.fits",
        pb_fits=d / f"{stem}.pb.fits", bmaj_arcsec=500.8, bmin_arcsec=151.6, bpa_deg=-1.9,
        rms_jy=rms, peak_jy=14.17, dynamic_range=14.17 / rms, imsize=512, cell_arcsec=31.92,
        freq_hz=1.405e9, centre_ra_deg=202.78, centre_dec_deg=30.84,
        tclean_params={"niter": 20000}, duration_s=6.4, tier="standard")


async def test_record_list_latest_and_schema(tmp_path):
    db = tmp_path / "state" / "contimg.sqlite"
    # another component's table already in the file: must survive untouched
    db.parent.mkdir()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE groups (group_id TEXT PRIMARY KEY)")
        con.execute("INSERT INTO groups VALUES ('x')")
        con.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER)")
        con.execute("INSERT INTO schema_versions VALUES ('queue', 3)")
    async with await ImageCatalog.open(db) as cat:
        r1 = _result(tmp_path)
        qa = QAResult("image", True, {"rms_jy": 0.0076}, (), ("calibrator low",), 0.1)
        id1 = await cat.record(r1, qa)
        r2 = _result(tmp_path, "2026-06-01T04:51:15", rms=float("nan"))
        bad = QAResult("image", False, {}, ("dynamic range 3 below the limit 20",))
        id2 = await cat.record(r2, bad)
        assert id1 != id2
        rows = await cat.latest(10)
        assert [r["group_id"] for r in rows] == [r2.group_id, r1.group_id]
        first = rows[1]
        assert first["image_path"] == str(r1.image_fits) and first["imsize"] == 512
        assert first["bmaj_arcsec"] == pytest.approx(500.8) and first["qa_passed"] is True
        assert first["qa"]["warnings"] == ["calibrator low"]
        assert rows[0]["rms_jy"] is None and rows[0]["qa_passed"] is False
        assert rows[0]["qa_reason"].startswith("dynamic range")
        assert [r["group_id"] for r in await cat.list_images(qa_passed=False)] == [r2.group_id]
        assert [r["group_id"] for r in await cat.list_images(group_id=r1.group_id)] == [r1.group_id]
        assert len(await cat.latest(1)) == 1
        assert await cat.list_images(since="2999-01-01") == []
        # re-imaging the same group into the same path updates its row
        id3 = await cat.record(replace(r1, rms_jy=0.005, dynamic_range=2834.0), qa)
        assert id3 == id1
        again = await cat.list_images(group_id=r1.group_id)
        assert len(again) == 1 and again[0]["rms_jy"] == pytest.approx(0.005)

    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = dict(con.execute("SELECT component, version FROM schema_versions"))
        assert versions == {"queue": 3, "images": SCHEMA_VERSION}
        assert con.execute("SELECT group_id FROM groups").fetchall() == [("x",)]
    # reopening is a no-op migration
    async with await ImageCatalog.open(db) as cat:
        assert len(await cat.latest()) == 2


async def test_refuses_a_newer_schema(tmp_path):
    db = tmp_path / "contimg.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER)")
        con.execute("INSERT INTO schema_versions VALUES ('images', 99)")
    with pytest.raises(ConfigError, match="newer"):
        await ImageCatalog.open(db)
