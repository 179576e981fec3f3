"""The queue database's guard: start-up check, backups with rotation, restore after
corruption (garbage pages, a truncated file, a damaged WAL) and reconciliation with the
products on disk, and the one-line refusal without a sound backup."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dsa110_contimg.config import DatabaseOptions, IngestOptions, QueueOptions
from dsa110_contimg.daemon.dbguard import (
    backup_loop,
    backup_name,
    check_and_restore,
    guard_database,
    list_backups,
    take_backup,
)
from dsa110_contimg.daemon.grouping import Grouper
from dsa110_contimg.daemon.imagecatalog import ImageCatalog
from dsa110_contimg.daemon.queue import GroupQueue
from dsa110_contimg.errors import ConfigError
from dsa110_contimg.imaging.stage import ImagingResult, product_names
from dsa110_contimg.products import product_dir, safe_stem
from dsa110_contimg.qa.result import QAResult
from dsa110_contimg.sqlitedb import check_integrity

G_DONE_BEFORE = "2025-03-01T10:00:00"   # done before the backup
G_FINISHED_AFTER = "2025-03-01T10:05:00"  # mid-pipeline at the backup, done after
G_NEW_DONE = "2025-03-01T10:10:00"      # arrived and finished after the backup
G_COLLECTING = "2025-03-01T10:15:00"    # arrived after the backup, still collecting
G_FAILED = "2025-03-01T09:55:00"        # failed before the backup, no products
BACKUP_AT = 1_740_823_500.0             # 2025-03-01T10:05:00Z


class Site:
    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.input = root / "incoming"
        self.output = root / "products"
        for d in (self.state, self.input, self.output):
            d.mkdir(parents=True)
        self.db = self.state / "contimg.sqlite"
        self.backups = self.state / "backups"

    def input_files(self, gid: str, n: int = 2) -> list[Path]:
        paths = []
        for sb in range(n):
            p = self.input / f"{gid}_sb{sb:02d}.hdf5"
            p.write_bytes(b"x" * (100 + sb))
            paths.append(p)
        return paths


def _result(out: Path, gid: str) -> ImagingResult:
    names = product_names(product_dir(out, gid), gid)
    return ImagingResult(
        group_id=gid, image_fits=names["image"], pbcor_fits=names["pbcor"],
        quicklook_png=names["quicklook"], residual_fits=names["residual"], pb_fits=names["pb"],
        bmaj_arcsec=500.0, bmin_arcsec=150.0, bpa_deg=-2.0, rms_jy=1e-3, peak_jy=1.0,
        dynamic_range=1000.0, imsize=512, cell_arcsec=30.0, freq_hz=1.4e9,
        centre_ra_deg=200.0, centre_dec_deg=30.0, tclean_params={}, duration_s=5.0,
        tier="standard")


def _publish(out: Path, res: ImagingResult, qa: QAResult) -> None:
    """What the imaging stage and the scheduler leave in a finished group's directory."""
    d = product_dir(out, res.group_id)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{safe_stem(res.group_id)}.image.fits").write_bytes(b"fits")
    (d / "qa.json").write_text(json.dumps({"group_id": res.group_id, "passed": True,
                                           "stages": {"imaging": qa.as_dict()}}))
    product_names(d, res.group_id)["record"].write_text(
        json.dumps({"version": 1, "result": res.to_dict()}))


async def _run_to(q: GroupQueue, cat: ImageCatalog, site: Site, gid: str, stages: int,
                  publish: bool = False) -> None:
    """Ingest ``gid`` and run ``stages`` of its three stages (imaging last: product, row)."""
    await q.create_group(gid)
    for sb, p in enumerate(site.input_files(gid)):
        st = p.stat()
        await q.record_file(gid, sb, p, st.st_size, st.st_mtime)
    await q.mark_ready(gid)
    for _ in range(stages):
        claim = await q.claim("w")
        assert claim is not None and claim.group_id == gid
        await q.complete(gid, "w", 1.0)
    if publish:
        res, qa = _result(site.output, gid), QAResult("image", True, {"rms_jy": 1e-3})
        _publish(site.output, res, qa)
        await cat.record(res, qa)


async def _history(site: Site, crash_copy: Path | None = None) -> None:
    """Groups before the backup, the backup (taken online), groups after it.

    With ``crash_copy`` the state after the backup lives only in the WAL (checkpointed at
    the backup) and a copy of the database and its WAL, taken as a crash would leave them,
    goes to ``crash_copy``."""
    q = await GroupQueue.open(site.db, QueueOptions(max_attempts=1))
    cat = await ImageCatalog.open(site.db)
    try:
        await _run_to(q, cat, site, G_DONE_BEFORE, 3, publish=True)
        await _run_to(q, cat, site, G_FINISHED_AFTER, 1)
        await q.create_group(G_FAILED)
        await q.record_file(G_FAILED, 0, site.input / f"{G_FAILED}_sb00.hdf5", 1, 1.0)
        await q.mark_ready(G_FAILED)
        await q.claim("w")
        await q.fail(G_FAILED, "w", "boom", retry=False)
        await asyncio.to_thread(take_backup, site.db, site.backups, 5, BACKUP_AT)
        if crash_copy is not None:
            con = sqlite3.connect(site.db)
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.close()
        # after the backup: one group finishes, one arrives and finishes, one arrives
        for _ in range(2):
            claim = await q.claim("w")
            assert claim is not None and claim.group_id == G_FINISHED_AFTER
            await q.complete(G_FINISHED_AFTER, "w", 1.0)
        res, qa = _result(site.output, G_FINISHED_AFTER), QAResult("image", True, {})
        _publish(site.output, res, qa)
        await cat.record(res, qa)
        await _run_to(q, cat, site, G_NEW_DONE, 3, publish=True)
        await q.create_group(G_COLLECTING)
        for sb, p in enumerate(site.input_files(G_COLLECTING)):
            st = p.stat()
            await q.record_file(G_COLLECTING, sb, p, st.st_size, st.st_mtime)
        if crash_copy is not None:
            crash_copy.mkdir()
            for suffix in ("", "-wal"):
                shutil.copyfile(f"{site.db}{suffix}", crash_copy / f"{site.db.name}{suffix}")
    finally:
        await cat.close()
        await q.close()


def _rows(db: Path, sql: str) -> list[Any]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def _restore_and_check(site: Site, damage: str) -> None:
    report = await guard_database(site.db, site.backups, DatabaseOptions(), site.output,
                                  site.input, 60.0)
    assert report is not None and report.problems, damage
    assert report.restored_from.name == backup_name(BACKUP_AT)
    aside = report.moved_aside[0]
    assert aside.name.startswith("contimg.sqlite.corrupt-") and aside.exists()
    assert check_integrity(site.db) == []
    alert = report.alert()
    assert alert.severity.name == "CRITICAL" and str(site.db) in alert.message
    assert report.reconciled is not None
    assert report.reconciled.inserted == [G_NEW_DONE]
    assert report.reconciled.advanced == {G_FINISHED_AFTER: "converted"}
    assert sorted(report.reconciled.images_added) == [G_FINISHED_AFTER, G_NEW_DONE]

    states = dict(_rows(site.db, "SELECT id, state FROM groups"))
    assert states == {G_DONE_BEFORE: "done", G_FINISHED_AFTER: "done", G_NEW_DONE: "done",
                      G_FAILED: "failed"}
    images = _rows(site.db, "SELECT group_id, count(*) FROM images GROUP BY group_id")
    assert sorted(images) == [(G_DONE_BEFORE, 1), (G_FINISHED_AFTER, 1), (G_NEW_DONE, 1)]
    assert _rows(site.db, "SELECT count(*) FROM stage_runs WHERE finished IS NULL") == [(0,)]
    n_subbands = dict(_rows(site.db, "SELECT id, n_subbands FROM groups"))
    assert n_subbands[G_NEW_DONE] == 2

    # ingest after the restore: the watcher's start-up scan offers every input file again
    alerts: list[Any] = []
    q = await GroupQueue.open(site.db, QueueOptions())
    try:
        grouper = Grouper(q, IngestOptions(expected_subbands=2), emit=alerts.append)
        for p in sorted(site.input.iterdir()):
            await grouper.handle(p)
        assert alerts == []  # no "late file" for the finished groups' inputs
        states = {g["id"]: g["state"] for g in await q.list_groups()}
        assert states[G_COLLECTING] == "collecting"  # found again, once
        assert len(states) == 5
        assert sorted(f.name for f in (await q.files_of(G_COLLECTING)).values()) == [
            f"{G_COLLECTING}_sb00.hdf5", f"{G_COLLECTING}_sb01.hdf5"]
    finally:
        await q.close()
    # a second start-up finds a sound database and changes nothing
    assert await guard_database(site.db, site.backups, DatabaseOptions(), site.output,
                                site.input, 60.0) is None


def _garbage(path: Path, start: int, length: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(os.urandom(length))


async def test_garbage_pages_restored_from_backup_nothing_lost_or_duplicated(tmp_path):
    site = Site(tmp_path)
    await _history(site)
    assert not Path(f"{site.db}-wal").exists()  # closed cleanly: every page in the main file
    size = site.db.stat().st_size
    _garbage(site.db, size // 3, size // 3)
    await _restore_and_check(site, "garbage pages")


async def test_truncated_file_restored_from_backup(tmp_path):
    site = Site(tmp_path)
    await _history(site)
    os.truncate(site.db, site.db.stat().st_size // 2 + 1000)
    await _restore_and_check(site, "truncated")


async def test_damaged_wal_restored_from_backup(tmp_path):
    site = Site(tmp_path)
    crashed = tmp_path / "crashed"
    await _history(site, crash_copy=crashed)
    for name in (site.db.name, f"{site.db.name}-wal"):
        shutil.copyfile(crashed / name, site.state / name)
    Path(f"{site.db}-shm").unlink(missing_ok=True)
    _garbage(Path(f"{site.db}-wal"), 32 + 24 + 200, 64)  # inside the first frame's page
    # SQLite itself would open this quietly, without the commits after the damage
    assert check_integrity(crashed / site.db.name) == []
    await _restore_and_check(site, "damaged WAL")
    assert Path(f"{sorted(site.state.glob('contimg.sqlite.corrupt-*'))[0]}").exists()
    assert len(list(site.state.glob("contimg.sqlite.corrupt-*-wal"))) == 1


async def test_backlog_group_finished_after_the_backup_is_reconciled(tmp_path):
    """Old data (a day long before the backup) processed after it is found by its day
    directory's mtime; an old day untouched since before the backup is not scanned."""
    site = Site(tmp_path)
    await _history(site)
    backlog, untouched = "2024-03-01T10:00:00", "2024-02-01T10:00:00"
    for gid in (untouched, backlog):
        _publish(site.output, _result(site.output, gid), QAResult("image", True, {}))
    old = BACKUP_AT - 30 * 86400
    os.utime(product_dir(site.output, untouched).parent, (old, old))
    size = site.db.stat().st_size
    _garbage(site.db, size // 3, size // 3)
    report = await guard_database(site.db, site.backups, DatabaseOptions(), site.output,
                                  site.input, 60.0)
    assert report is not None and report.reconciled is not None
    assert sorted(report.reconciled.inserted) == [backlog, G_NEW_DONE]
    states = dict(_rows(site.db, "SELECT id, state FROM groups"))
    assert states[backlog] == "done" and untouched not in states
    images = _rows(site.db, "SELECT group_id, count(*) FROM images GROUP BY group_id")
    assert (backlog, 1) in images


async def test_sound_database_is_left_alone(tmp_path):
    site = Site(tmp_path)
    await _history(site)
    before = site.db.read_bytes()
    assert check_and_restore(site.db, site.backups) is None
    assert check_and_restore(site.db, site.backups, quick=True) is None
    assert site.db.read_bytes() == before
    assert check_and_restore(tmp_path / "absent.sqlite", site.backups) is None


async def test_newest_sound_backup_is_chosen(tmp_path):
    site = Site(tmp_path)
    await _history(site)
    newer = site.backups / backup_name(BACKUP_AT + 3600)
    newer.write_bytes(b"not a database at all" * 100)
    _garbage(site.db, 0, 100)
    report = check_and_restore(site.db, site.backups)
    assert report is not None and report.restored_from.name == backup_name(BACKUP_AT)


def test_no_backup_refuses_with_one_line(tmp_path):
    site = Site(tmp_path)
    site.db.write_bytes(b"garbage, not SQLite " * 500)
    with pytest.raises(ConfigError) as err:
        check_and_restore(site.db, site.backups)
    msg = str(err.value)
    assert "\n" not in msg and str(site.db) in msg and "no sound backup" in msg
    assert site.db.exists() and not list(site.state.glob("*.corrupt-*"))  # nothing moved


def _cli(args: list[str], state: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")},
           "CONTIMG_STATE_DIR": str(state), "CONTIMG_INPUT_DIR": str(tmp_path),
           "CONTIMG_OUTPUT_DIR": str(tmp_path / "out"),
           "CONTIMG_SCRATCH_DIR": str(tmp_path / "scratch")}
    return subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_on_a_corrupt_database_prints_one_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "contimg.sqlite").write_bytes(b"garbage, not SQLite " * 500)
    done = _cli(["status"], state, tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "contimg.sqlite" in lines[0] and "corrupt" in lines[0]


def test_rotation_keeps_n(tmp_path):
    site = Site(tmp_path)
    con = sqlite3.connect(site.db)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    t0 = 1_750_000_000.0
    site.backups.mkdir()
    (site.backups / f".{backup_name(t0 - 60)}.12345.tmp").write_bytes(b"half")  # a crash's
    for i in range(7):
        take_backup(site.db, site.backups, keep=3, now=t0 + 3600 * i)
    kept = list_backups(site.backups)
    assert [p.name for p in kept] == [backup_name(t0 + 3600 * i) for i in (6, 5, 4)]
    assert sorted(os.listdir(site.backups)) == sorted(p.name for p in kept)  # no temp left


def test_backup_is_consistent_while_another_connection_writes(tmp_path):
    """Each backup holds a committed state: the writer's transactions move rows from one
    table to another, so every consistent snapshot has the same total."""
    db = tmp_path / "live.sqlite"
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("CREATE TABLE a (k INTEGER PRIMARY KEY, v TEXT)")
    con.execute("CREATE TABLE b (k INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO a VALUES (?, ?)", [(i, "x" * 200) for i in range(20000)])
    stop = threading.Event()
    moved = [0]

    def writer() -> None:
        """Moves blocks of 50 rows a -> b, then back, until stopped."""
        w = sqlite3.connect(db, isolation_level=None, timeout=30)
        src, dst = "a", "b"
        while not stop.is_set():
            for k in range(0, 20000, 50):
                w.execute("BEGIN IMMEDIATE")
                w.execute(f"INSERT INTO {dst} SELECT * FROM {src} WHERE k BETWEEN ? AND ?",  # noqa: S608
                          (k, k + 49))
                w.execute(f"DELETE FROM {src} WHERE k BETWEEN ? AND ?", (k, k + 49))  # noqa: S608
                w.execute("COMMIT")
                moved[0] += 1
            src, dst = dst, src
        w.close()

    t = threading.Thread(target=writer)
    t.start()
    backups = []
    try:
        while moved[0] < 5:
            time.sleep(0.01)
        for i in range(5):
            before = moved[0]
            backups.append(take_backup(db, tmp_path / "backups", keep=10, now=1e9 + i))
            assert moved[0] > before  # the writer committed while the backup was taken
    finally:
        stop.set()
        t.join()
    con.close()
    for b in backups:
        assert check_integrity(b) == []
        (na, nb), = _rows(b, "SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b)")
        assert na + nb == 20000 and nb % 50 == 0


async def test_backup_loop_writes_and_stops(tmp_path):
    db = tmp_path / "x.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    stop = asyncio.Event()
    opts = DatabaseOptions(backup_interval_s=60, backup_keep=2)
    task = asyncio.create_task(backup_loop(db, tmp_path / "b", opts, stop, first_delay_s=0.05))
    deadline = time.monotonic() + 20
    while not list_backups(tmp_path / "b") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(list_backups(tmp_path / "b")) == 1
