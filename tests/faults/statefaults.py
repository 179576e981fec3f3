"""The state directory itself at fault: the queue database corrupted, a second daemon on the
same state directory, the state disk full, the database locked when a stage completes.

Expectations (each row's goal column):

* database pages overwritten with garbage (daemon SIGKILLed, WAL checkpointed, pages in the
  middle of contimg.sqlite overwritten): on restart the file is moved aside, the newest
  backup restored and a CRITICAL ``database.restored`` alert raised; the group finished
  after the backup is found on disk and marked done (it is not processed again, its products
  are untouched, it has one catalogue row); every group done once;
* a WAL frame damaged with commits after it (SIGKILL, first frame of contimg.sqlite-wal
  altered): the same restore, alert and reconciliation, for the groups finished after the
  backup;
* corrupt with no backup (backups deleted): exit 2 and one line naming the database file
  (nothing moved aside);
* a second daemon started on the same state directory while the first processes a group:
  it exits 2 with one line naming the lock file; the first runs on undisturbed (still holds
  the lock, logs no error), the group is done once, and the second left no files or claims;
* the state disk full (state dir on a 32 MB tmpfs filled by a ballast file during a
  calibration, whose CASA logs go there, while another group arrives): the daemon keeps running, the
  state-disk monitor raises a CRITICAL disk alert naming the state directory; once the
  ballast is deleted every group proceeds to done, nothing lost or duplicated, and the alert
  clears;
* the database locked (BEGIN EXCLUSIVE, 65 s: the stage's completion write gives up after
  the 30 s busy timeout, queued behind a heartbeat's write that gave up first) from the
  middle of a stage until after it ends: ``queue_write_retry`` events name the locked write;
  once the lock is released the group goes on to done, every stage ran once (no failed or
  abandoned run), no attempt is charged.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from daemon_harness import json_events
from dsa110_contimg.daemon.dbguard import backup_time, list_backups
from dsa110_contimg.sqlitedb import check_integrity, wal_dropped_commits

from .core import (
    STOPPED,
    WAIT_S,
    Expect,
    Row,
    Session,
    at,
    finish,
    product_dirs,
    tracebacks,
)
from .environment import Locker, stage_worker

DONE = ("done",)


def _abort(rows: list[Row], exc: Exception) -> None:
    for r in rows:
        r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")


def _until(cond, what: str, timeout: float = WAIT_S, s: Session | None = None):
    """Poll ``cond`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if s is not None and not s.alive():
            raise AssertionError(f"daemon exited waiting for {what}:\n{s.d.log_tail()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{s.d.log_tail()}" if s else ""))


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``d``."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in d.rglob("*") if p.is_file()}


def _run_events(s: Session, run: int) -> list[dict]:
    return json_events(s.root / f"daemon-{run}.log")


# ---------------------------------------------------------------------------- corruption
def _checkpoint(db: Path) -> None:
    """Fold the WAL into the file (as a clean stop would), so damage to the file shows."""
    con = sqlite3.connect(str(db), isolation_level=None)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def _garble_pages(db: Path) -> str | None:
    """Overwrite the middle third of the file's pages with garbage; None once SQLite's
    integrity check (on a copy) fails, else why the damage did not show."""
    head = db.read_bytes()[:100]
    page = struct.unpack(">H", head[16:18])[0]
    page = 65536 if page == 1 else page
    n = db.stat().st_size // page
    rng = random.Random(1)
    with open(db, "r+b") as fh:
        for pg in range(max(1, n // 3), max(2, 2 * n // 3)):
            fh.seek(pg * page)
            fh.write(rng.randbytes(page))
        fh.flush()
        os.fsync(fh.fileno())
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / db.name
        shutil.copyfile(db, copy)
        if not check_integrity(copy):
            return f"{n} pages, garbage over {n // 3}..{2 * n // 3}: integrity_check still ok"
    return None


def _damage_wal(db: Path) -> int:
    """Alter the first frame of the WAL; the commits SQLite would now drop."""
    wal = Path(f"{db}-wal")
    data = bytearray(wal.read_bytes())
    if len(data) < 32:
        return 0
    page = struct.unpack(">I", data[8:12])[0]
    off = 32 + 24 + page // 2
    data[off:off + 16] = bytes(b ^ 0xFF for b in data[off:off + 16])
    with open(wal, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return wal_dropped_commits(db)


def _restored(s: Session, row: Row, run: int, reconciled: list[str]) -> None:
    """The run restored the database, alerted, and took ``reconciled`` as done from disk."""
    ev = _run_events(s, run)
    row.check(any(e.get("event") == "db_corrupt" for e in ev), f"run {run}: no db_corrupt event")
    alerts = [e for e in ev if e.get("event") == "alert" and e.get("category") == "database.restored"]
    row.check(alerts and all(a.get("severity") == "CRITICAL" for a in alerts),
              f"run {run}: no CRITICAL database.restored alert")
    rec = next((e for e in ev if e.get("event") == "db_reconciled"), None)
    if row.check(rec is not None, f"run {run}: no db_reconciled event"):
        found = set(rec.get("inserted") or []) | set(rec.get("advanced") or {})
        missing = [g for g in reconciled if g not in found]
        row.check(not missing, f"run {run}: groups finished after the backup not reconciled "
                               f"from disk: {missing} (reconciled: {rec})")
    aside = sorted(p.name for p in s.d.state.glob("contimg.sqlite.corrupt-*"))
    row.check(aside, "the corrupt database was not kept aside")


def session_sqlite_corrupt(workdir: Path) -> list[Row]:
    pages = Row("queue DB pages overwritten with garbage (SIGKILL, restart)",
                "restored+CRITICAL alert; reconciled; done once")
    wal = Row("queue DB WAL frame damaged, commits after it (SIGKILL, restart)",
              "restored+CRITICAL alert; reconciled; done once")
    none = Row("queue DB corrupt and no backup", "exit 2, one line naming the file")
    rows = [pages, wal, none]
    s = Session(workdir, "sqlite-corrupt", CONTIMG_DB_BACKUP_INTERVAL_S="60",
                CONTIMG_CAL_HOLD_RETRY_S="5")
    try:
        a, b, c = s.simulate_run(at(0), 3, seed=87)  # 3C286 transits in a; b, c apply its set
        ga, gb, gc = a["group_id"], b["group_id"], c["group_id"]
        db, backups = s.d.state / "contimg.sqlite", s.d.state / "backups"
        s.start()
        s.drop(ga)
        s.wait_states({ga: DONE}, what="A done", fail_on=STOPPED)
        a_done = time.time()
        _until(lambda: (lambda b_: b_ and (backup_time(b_[0]) or 0) >= a_done - 1)(
            list_backups(backups)), "a backup taken after A was done", 150, s)
        s.drop(gb)
        s.wait_states({gb: DONE}, what="B done after the backup", fail_on=STOPPED)
        gb = s.actual(gb) or gb
        before = {g: _snapshot(product_dirs(s.d.output)[g]) for g in (ga, gb)}
        # (a) garbage over pages of the file
        s.kill()
        _checkpoint(db)
        why = _garble_pages(db)
        pages.check(why is None, f"corruption not set up: {why}")
        s.start()
        _restored(s, pages, s.runs, [gb])
        s.wait_states({ga: DONE, gb: DONE}, what="A and B done after the restore")
        s.drop(gc)
        s.wait_states({gc: DONE}, what="C done after the restore", fail_on=STOPPED)
        gc = s.actual(gc) or gc
        before[gc] = _snapshot(product_dirs(s.d.output)[gc])
        # (b) a damaged WAL frame with commits after it
        s.kill()
        dropped = _damage_wal(db)
        wal.check(dropped > 0, "WAL damage not set up: no commit after the damaged frame")
        s.start()
        _restored(s, wal, s.runs, [gb, gc])
        s.wait_states({g: DONE for g in (ga, gb, gc)}, what="every group done after the restore")
        time.sleep(3)  # a group wrongly taken up again would show a stage run by now
        status = s.status_json()
        finish(s, [pages, wal])
        runs_after = {r["group_id"] for r in s.stage_runs()}
        for row, gids in ((pages, (ga, gb)), (wal, (ga, gb, gc))):
            s.account(row, [Expect(g, DONE) for g in gids], alert_categories=("database.restored",),
                      status=status)
            s.unexpected_groups(row, (ga, gb, gc))
            again = sorted(g for g in gids if g != ga and g in runs_after)
            row.check(not again, f"groups finished before the kill ran stages again: {again}")
            for g in gids:
                now = _snapshot(product_dirs(s.d.output)[g]) if g in product_dirs(s.d.output) else {}
                row.check(now == before[g], f"{g}: products changed after the restore")
                row.check(s.catalogue_counts().get(g) == 1,
                          f"{g}: {s.catalogue_counts().get(g, 0)} catalogue rows (1 expected)")
            s.leftovers(row)
            for t in tracebacks(s):
                row.problems.append(f"traceback: {t}")
        # (c) corrupt again with no backup to restore
        shutil.rmtree(backups)
        _checkpoint(db)
        why = _garble_pages(db)
        none.check(why is None, f"corruption not set up: {why}")
        aside_before = sorted(s.d.state.glob("contimg.sqlite*"))
        s.start(wait_ready=False)
        rc = s.d.wait(90)
        none.runs = s.runs
        out = [ln for ln in s.d.log_path.read_text().splitlines() if ln.strip()]
        said = [ln for ln in out if not ln.startswith("{")]
        none.check(rc == 2, f"exit code {rc} (expected 2)")
        none.check(len(said) == 1, f"{len(said)} lines besides the JSON log (expected one): "
                                   f"{said[:5]}")
        none.check(said and re.fullmatch(
            rf"contimg: configuration error: CONTIMG_STATE_DIR: the database {re.escape(str(db))} "
            r"is corrupt .*no sound backup.*", said[0]), f"unclear refusal: {said[:1]}")
        none.check(sorted(s.d.state.glob("contimg.sqlite*")) == aside_before,
                   "files were moved although nothing could be restored")
    except Exception as exc:  # noqa: BLE001
        _abort(rows, exc)
    finally:
        s.close()
    return rows


# ---------------------------------------------------------------------------- the lock
def session_second_daemon(workdir: Path) -> list[Row]:
    row = Row("second daemon started on the same state dir", "exit 2, one line; first undisturbed")
    s = Session(workdir, "second-daemon")
    try:
        (a,) = s.simulate_run(at(0), 1, seed=88)
        gid = a["group_id"]
        s.start()
        s.drop(gid)
        s.wait_states({gid: ("converting", "converted", "calibrating")}, what="the group in flight")
        lock = s.d.state / "contimg.lock"
        holder = lock.read_text()
        second = subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "run"],
                                env=s.d.env, capture_output=True, text=True, timeout=120)
        lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
        row.check(second.returncode == 2, f"second daemon exit code {second.returncode} (expected 2)")
        row.check(len(lines) == 1, f"second daemon: {len(lines)} lines (expected one): {lines[:5]}")
        row.check(lines and re.fullmatch(
            rf"contimg: configuration error: CONTIMG_STATE_DIR: another contimg daemon holds "
            rf"{re.escape(str(lock))}", lines[0]), f"unclear refusal: {lines[:1]}")
        row.check(s.alive(), "the first daemon died")
        row.check(lock.read_text() == holder == f"{s.proc.pid}\n",
                  f"lock file now says {lock.read_text()!r} (was {holder!r})")
        s.wait_states({gid: DONE}, what="the group done", fail_on=STOPPED)
        status = s.status_json()
        finish(s, row)
        s.account(row, [Expect(gid, DONE)], status=status)
        row.runs += 1  # the refused second daemon
        s.leftovers(row)
        workers = {r["worker"] for r in s.stage_runs()}
        row.check(len(workers) == 1 and str(s.proc.pid) in next(iter(workers)),
                  f"stage runs by workers {sorted(workers)} (only the first daemon's expected)")
        left = [str(p) for root in (s.root, s.tmpfs) for p in root.rglob("*")
                if ".contimg-write-test" in p.name]
        row.check(not left, f"the second daemon left files: {left}")
        errors = [f"{e.get('event')}: {str(e)[:200]}" for e in s.events()
                  if e.get("level") in ("error", "critical")]
        row.check(not errors, f"the first daemon logged errors: {errors[:3]}")
        for t in tracebacks(s):
            row.problems.append(f"traceback: {t}")
    except Exception as exc:  # noqa: BLE001
        _abort([row], exc)
    finally:
        s.close()
    return [row]


# ---------------------------------------------------------------------------- disk full
def _fill(directory: Path, leave: int) -> Path:
    """A ballast file taking all the free space of ``directory``'s filesystem but ``leave``."""
    ballast = directory / "ballast"
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    with open(ballast, "r+b") as fh:  # ENOSPC on the last write: free ``leave`` bytes
        st = os.statvfs(directory)
        size = ballast.stat().st_size
        fh.truncate(max(0, size - max(0, leave - st.f_bavail * st.f_frsize)))
    return ballast


def session_state_disk_full(workdir: Path) -> list[Row]:
    row = Row("state disk full (32 MB tmpfs filled) while a stage ends and a group arrives",
              "daemon runs, state-disk alert; space back→done once")
    s = Session(workdir, "state-disk-full", CONTIMG_STATE_DISK_WARN_GB="0.02",
                CONTIMG_STATE_DISK_CRIT_GB="0.01", CONTIMG_MONITOR_INTERVAL_S="1",
                CONTIMG_DISK_FULL_RETRY_S="2")
    try:
        why = s.mount_tmpfs(s.d.state, "32m")
        if why:
            row.skipped = why
            return [row]
        a, b = s.simulate_run(at(0), 2, seed=89)
        ga, gb = a["group_id"], b["group_id"]
        state = str(s.d.state)
        s.start()
        s.drop(ga)
        s.wait_states({ga: ("calibrating",)}, what="A calibrating")  # CASA logs to the state dir
        ballast = _fill(s.d.state, 16 * 1024)
        filled = time.monotonic()
        s.drop(gb)

        def full_seen() -> bool:
            ev = s.run_events()
            crit = [e for e in ev if e.get("event") == "alert" and e.get("category") == "disk"
                    and e.get("severity") == "CRITICAL" and state in str(e.get("context"))]
            refused = [e for e in ev if "database or disk is full" in str(e.get("error"))]
            return bool(crit and refused and time.monotonic() - filled > 15)
        _until(full_seen, "a CRITICAL state-disk alert and SQLite refusing writes", 90, s)
        row.check(s.alive(), "the daemon exited on the full state disk")
        ballast.unlink()
        s.wait_states({ga: DONE, gb: DONE}, what="both groups done once space returned",
                      fail_on=STOPPED)
        _until(lambda: [e for e in s.run_events() if e.get("event") == "alert"
                        and e.get("category") == "disk" and e.get("severity") == "INFO"
                        and state in str(e.get("context"))], "the state-disk alert cleared",
               30, s)
        status = s.status_json()
        finish(s, row)
        s.account(row, [Expect(ga, DONE), Expect(gb, DONE)], alert_categories=("disk",),
                  status=status)
        s.unexpected_groups(row, (ga, gb))
        s.leftovers(row)
        groups = s.groups()
        for t in (a, b):
            g = groups.get(s.actual(t["group_id"])) or {}
            row.check(g.get("n_subbands") == 16 and "incomplete" not in g.get("flags", {}),
                      f"{t['group_id']}: {g.get('n_subbands')} subbands kept")
            row.check(g.get("attempts") == 0, f"{t['group_id']}: {g.get('attempts')} attempts used")
        bad = [f"{r['group_id']} {r['stage']} {r['outcome']}: {(r['error'] or '')[:160]}"
               for r in s.stage_runs() if r["outcome"] == "failed"]
        row.check(not bad, f"the full state disk was charged as failed attempts: {bad}")
        # ingest logs each refused write with its traceback (noisy, but retried: see above)
        for t in tracebacks(s):
            if "database or disk is full" not in t:
                row.problems.append(f"traceback: {t}")
    except Exception as exc:  # noqa: BLE001
        _abort([row], exc)
    finally:
        s.close()
    return [row]


# ---------------------------------------------------------------------------- locked
#: Longer than twice the daemon's 30 s busy timeout: the queue's writes share one connection
#: whose first 30 s under the lock go to a heartbeat's write (which gives up); a 35 s lock
#: leaves the completion's writes waiting 5 s at most, never giving up. At 65 s the first
#: completion write (the calibration set, or the queue's after the heartbeat) gives up.
LOCK_S = 65.0


def session_db_lock_completion(workdir: Path) -> list[Row]:
    row = Row(f"queue DB locked {LOCK_S:.0f} s (> busy timeout) as a stage completes",
              "write retried; done once, no attempt charged")
    s = Session(workdir, "db-lock-completion")
    try:
        (a,) = s.simulate_run(at(0), 1, seed=90)
        gid = a["group_id"]
        db = s.d.state / "contimg.sqlite"
        s.start()
        s.drop(gid)
        s.wait_states({gid: ("calibrating",)}, what="the group calibrating")
        # hold the calibration's worker while the lock is taken, so that the stage ends
        # inside the lock however loaded the machine is
        worker = None
        deadline = time.monotonic() + 30
        while worker is None and time.monotonic() < deadline:
            worker = stage_worker(s)
            time.sleep(0.05)
        if worker is not None:
            os.kill(worker, signal.SIGSTOP)
        locked_at = time.time()
        try:
            lock = Locker(db, LOCK_S)
        finally:
            if worker is not None:
                os.kill(worker, signal.SIGCONT)
        lock.wait()
        held = time.monotonic() - lock.t0
        ended = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
                 for e in s.events() if e.get("event") == "stage_done"
                 and e.get("stage") == "calibration" and e.get("timestamp")]
        row.check(worker is not None, "no calibration worker found to hold")
        row.check(not ended or min(ended) >= locked_at,
                  "the calibration ended before the lock was taken")
        s.wait_states({gid: DONE}, what="the group done after the lock", fail_on=STOPPED)
        status = s.status_json()
        finish(s, row)
        s.account(row, [Expect(gid, DONE)], status=status)
        s.leftovers(row)
        retries = [e for e in s.events() if e.get("event") == "queue_write_retry"]
        row.check(retries and all("locked" in str(e.get("error")) for e in retries),
                  f"no queue_write_retry event for a locked write (lock held {held:.0f} s)")
        runs = s.stage_runs()
        bad = [f"{r['stage']} {r['outcome']}: {(r['error'] or '')[:160]}" for r in runs
               if r["outcome"] != "ok"]
        row.check(not bad, f"stage runs not ok: {bad}")
        row.check(sorted(r["stage"] for r in runs) == ["calibration", "conversion", "imaging"],
                  f"stage runs {[r['stage'] for r in runs]} (each stage once expected)")
        g = s.groups()[s.actual(gid) or gid]
        row.check(g["attempts"] == 0, f"{g['attempts']} attempts charged")
        for t in tracebacks(s):
            row.problems.append(f"traceback: {t}")
    except Exception as exc:  # noqa: BLE001
        _abort([row], exc)
    finally:
        s.close()
    return [row]
