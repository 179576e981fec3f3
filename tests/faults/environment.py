"""A hostile environment: full disks, a tmpfs too small, a read-only state directory, the
queue database locked by another process, worker processes dying and CASA raising.

Expectations (each row's goal column):

* output disk full (1 MB tmpfs): conversion stops with a 'no space left on device' reason, the
  group is held without using an attempt and a CRITICAL disk.full alert goes out; nothing
  half-written in the output; once space returns (remount) the same group converts, exactly
  once;
* tmpfs too small: staging falls back to the scratch disk with a warning; the group converts;
* state dir read-only at start: exit code 2 and one line naming CONTIMG_STATE_DIR;
* queue locked by another process (BEGIN EXCLUSIVE) for a few seconds during ingest and during
  a stage, and once for longer than the daemon's 30 s busy timeout: nothing lost, every
  subband kept, the daemon still running;
* a worker process SIGKILLed mid-conversion: the attempt fails with a clear reason, is retried
  and the group converts, exactly once; the dead worker's staging does not stay in tmpfs;
* CASA raising inside a worker (a corrupt MS given to calibration): the group ends failed or
  quarantined with CASA's reason; a good group dropped in afterwards converts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .core import (
    CONVERTED_PLUS,
    STOPPED,
    WAIT_S,
    Expect,
    Row,
    Session,
    children,
    finish,
    half_written,
)


def _abort(rows: list[Row], exc: Exception) -> None:
    for r in rows:
        r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")


def _wait_runs(s: Session, pred, what: str, timeout: float = WAIT_S) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (s.d.state / "contimg.sqlite").exists():
            runs = s.stage_runs()
            if pred(runs):
                return runs
        if not s.alive():
            raise AssertionError(f"daemon exited waiting for {what}:\n{s.d.log_tail()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{s.d.log_tail()}")


# ---------------------------------------------------------------------------- disks
def session_disk(workdir: Path) -> list[Row]:
    full = Row("output disk full (1 MB tmpfs), then space returns",
               "ENOSPC→held, no attempt→converted once")
    small = Row("tmpfs too small for staging (1 MB)", "disk staging + warning→converted")
    rows = [full, small]
    s = Session(workdir, "disk", CONTIMG_MAX_ATTEMPTS="1", CONTIMG_DISK_FULL_RETRY_S="2")
    try:
        out, shm = s.root / "outfs", s.root / "shmfs"
        why = s.mount_tmpfs(out, "1m") or s.mount_tmpfs(shm, "1m")
        if why:
            for r in rows:
                r.skipped = why
            return rows
        s.d.output = out
        s.d.env.update(CONTIMG_OUTPUT_DIR=str(out), CONTIMG_TMPFS_PATH=str(shm))
        g = s.good(0)
        gid = g["group_id"]
        s.start()
        s.drop(gid)
        runs = _wait_runs(s, lambda rs: sum(r["outcome"] == "abandoned" for r in rs) >= 2,
                          "two conversions stopped by the full disk")
        held = [r for r in runs if r["outcome"] == "abandoned"]
        full.check(re.search(r"no space left on device", held[0]["error"] or "", re.I),
                   f"the hold does not say the disk is full: {held[0]['error']!r}")
        full.check(not any(r["outcome"] == "failed" for r in runs),
                   "a full disk was charged as a failed attempt")
        g = s.groups()[gid]
        full.check(g["state"] in ("pending", "converting") and g["attempts"] == 0,
                   f"after ENOSPC the group is {g['state']} with {g['attempts']} attempts used")
        leftovers = [str(p.relative_to(out)) for p in out.rglob("*")
                     if p.is_file() and p.name != "qa.json" and not p.name.startswith(".contimg-write-test")]
        full.check(not leftovers and not half_written(out),
                   f"files left in the full output after ENOSPC: {leftovers[:5]}")
        r = subprocess.run(["mount", "-o", "remount,size=64m", str(out)], capture_output=True,
                           text=True)
        full.check(r.returncode == 0, f"remount failed: {r.stderr}")
        s.wait_states({gid: CONVERTED_PLUS}, what="the group converted once space returned")
        status = s.status_json()
        finish(s, rows)
        s.account(full, [Expect(gid, CONVERTED_PLUS, alerts=("disk.full",))],
                  status=status)
        s.leftovers(full)
        warn = [e for e in s.events() if e.get("event") == "staging on disk"
                and e.get("level") == "warning" and str(shm) in str(e.get("reason"))]
        small.check(warn, "no warning that staging fell back to disk (naming the tmpfs)")
        conv = s.groups()[gid]["flags"].get("conversion") or {}
        small.check(conv.get("staged_on") == "disk", f"staged_on={conv.get('staged_on')!r}")
        s.account(small, [Expect(gid, CONVERTED_PLUS)], status=status)
    except Exception as exc:  # noqa: BLE001
        _abort(rows, exc)
    finally:
        s.close()
    return rows


def session_readonly_state(workdir: Path) -> list[Row]:
    row = Row("state dir read-only at start", "exit 2, one line naming the variable")
    s = Session(workdir, "ro-state")
    try:
        why = s.mount_tmpfs(s.d.state, "1m", readonly=True)
        if why:
            if os.geteuid() == 0:
                row.skipped = why
                return [row]
            os.chmod(s.d.state, 0o555)  # not root: permissions are enough
        s.start(wait_ready=False)
        rc = s.d.wait(60)
        row.runs = s.runs
        lines = [ln for ln in s.d.log_path.read_text().splitlines() if ln.strip()]
        row.check(rc == 2, f"exit code {rc} (expected 2)")
        row.check(len(lines) == 1, f"{len(lines)} lines of output (expected one): {lines[:5]}")
        row.check(lines and re.fullmatch(
            r"contimg: configuration error: CONTIMG_STATE_DIR: .*(not writable|Read-only|read-only).*",
            lines[0]), f"unclear start-up error: {lines[:1]}")
    except Exception as exc:  # noqa: BLE001
        _abort([row], exc)
    finally:
        s.close()
    return [row]


# ---------------------------------------------------------------------------- SQLite
class Locker:
    """Another process holding ``BEGIN EXCLUSIVE`` on the queue database for ``seconds``."""

    def __init__(self, db: Path, seconds: float) -> None:
        code = ("import sqlite3, sys, time\n"
                "con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)\n"
                "con.execute('BEGIN EXCLUSIVE')\n"
                "print('locked', flush=True)\n"
                "time.sleep(float(sys.argv[2]))\n"
                "con.execute('COMMIT')\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "locked":
            raise AssertionError(f"could not lock {db}: {line!r}")
        self.t0 = time.monotonic()

    def wait(self) -> None:
        self.proc.wait(120)


def session_sqlite(workdir: Path) -> list[Row]:
    short = Row("queue DB locked by another process (5 s, ingest + stage)", "waits; converted+")
    long_ = Row("queue DB locked longer than the busy timeout (33 s)", "nothing lost; converted+")
    rows = [short, long_]
    s = Session(workdir, "sqlite-lock", CONTIMG_TIMEOUT_POLICY="quarantine",
                CONTIMG_GROUP_TIMEOUT_S="150")
    try:
        a, b, c = s.good(0), s.good(1), s.good(2)
        db = s.d.state / "contimg.sqlite"
        s.start()
        # short: held while the files arrive, then again while a stage runs
        lock = Locker(db, 5)
        s.drop(a["group_id"])
        lock.wait()
        s.wait_states({a["group_id"]: ("converting", *CONVERTED_PLUS)}, what="A claimed")
        Locker(db, 5).wait()  # the stage ends (complete, QA, flags) under the lock
        s.wait_states({a["group_id"]: CONVERTED_PLUS}, what="A converted")
        # long: held past the 30 s busy timeout while B's files arrive
        lock = Locker(db, 33)
        s.drop(b["group_id"])
        lock.wait()
        s.wait_states({b["group_id"]: CONVERTED_PLUS}, timeout=150,
                      what="B converted after the long lock")
        s.drop(c["group_id"])
        s.wait_states({c["group_id"]: CONVERTED_PLUS}, what="C converted after the long lock")
        status = s.status_json()
        finish(s, rows)
        s.account(short, [Expect(a["group_id"], CONVERTED_PLUS)], status=status)
        s.account(long_, [Expect(b["group_id"], CONVERTED_PLUS),
                          Expect(c["group_id"], CONVERTED_PLUS)], status=status)
        groups = s.groups()
        for r, truths in ((short, [a]), (long_, [b, c])):
            for t in truths:
                g = groups.get(s.actual(t["group_id"])) or {}
                r.check(g.get("n_subbands") == 16 and "incomplete" not in g.get("flags", {}),
                        f"{t['group_id']}: {g.get('n_subbands')} subbands kept "
                        f"({g.get('flags', {}).get('incomplete')})")
            s.leftovers(r)
    except Exception as exc:  # noqa: BLE001
        _abort(rows, exc)
    finally:
        s.close()
    return rows


# ---------------------------------------------------------------------------- workers
def stage_worker(s: Session) -> int | None:
    """A stage worker: a child of the daemon's forkserver."""
    for pid in children(s.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            pcmd = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"forkserver" in pcmd and b"resource_tracker" not in cmd:
            return pid
    return None


def session_workers(workdir: Path) -> list[Row]:
    dead = Row("worker process SIGKILLed mid-conversion", "retry→converted once, staging freed")
    casa = Row("CASA raising in a worker (corrupt MS at calibration)", "failed/quarantined; good→converted+")
    rows = [dead, casa]
    s = Session(workdir, "workers", CONTIMG_MAX_ATTEMPTS="2", CONTIMG_BACKOFF_BASE_S="1",
                CONTIMG_CAL_HOLD_RETRY_S="3")
    try:
        b, c = s.good(0), s.good(1)
        gid = b["group_id"]
        s.start()
        s.drop(gid)
        s.wait_states({gid: ("converting",)}, what="B converting")
        # SIGKILL every worker of the stage (the conversion's, or its QA gate's) until an
        # attempt fails: a tiny conversion lasts about a second
        killed: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and s.d.states().get(gid) in ("pending", "converting"):
            if any(r["outcome"] == "failed" for r in s.stage_runs()):
                break
            victim = stage_worker(s)
            if victim is not None:
                try:
                    cmd = Path(f"/proc/{victim}/cmdline").read_bytes()[:60]
                    os.kill(victim, signal.SIGKILL)
                    killed.append(f"{victim} {cmd!r}")
                except (ProcessLookupError, FileNotFoundError):
                    pass
            time.sleep(0.01)
        dead.check(killed, "no worker process found under the forkserver")
        runs = _wait_runs(s, lambda rs: any(r["outcome"] in ("failed", "ok") for r in rs),
                          "the killed attempt recorded")
        err = next((r["error"] for r in runs if r["outcome"] == "failed"), None)
        dead.check(err is not None, f"the kill missed: the conversion finished first (killed {killed})")
        dead.check(err is None or re.search(r"worker process died", err),
                   f"unclear reason: {err!r}")
        s.wait_states({gid: CONVERTED_PLUS}, what="B converted after the retry")
        stale = [p.name for p in s.tmpfs.glob("contimg-stage-*")]
        dead.check(not stale, f"the killed worker's staging stays in tmpfs while the daemon "
                              f"runs (until a restart): {stale}")
        dead.check(any(e.get("event") == "worker_died" for e in s.events()),
                   "no worker_died log event")
        status = s.status_json()
        finish(s, rows)
        s.account(dead, [Expect(gid, CONVERTED_PLUS, alerts=("conversion.failed",))],
                  status=status)
        s.leftovers(dead)

        # CASA raising: corrupt B's published MS, restart; calibration must fail cleanly
        ms = Path(s.groups()[gid]["flags"]["conversion"]["ms_path"])
        for f in ms.glob("table.f*"):
            if f.is_file():
                f.write_bytes(b"\0" * 64)
        s.start()
        s.wait_states({gid: STOPPED}, what="B stopped at calibration")
        alive = s.alive()
        s.drop(c["group_id"])
        s.wait_states({c["group_id"]: CONVERTED_PLUS}, what="C converted")
        status = s.status_json()
        finish(s, rows)
        casa.check(alive, "the daemon died with the corrupt MS")
        s.account(casa, [Expect(gid, STOPPED, r"CASA|table|measurement set|RuntimeError",
                                ("calibration.failed", "calibration.quarantined")),
                         Expect(c["group_id"], CONVERTED_PLUS)], status=status)
        cal_runs = [r for r in s.stage_runs() if r["group_id"] == gid and r["stage"] == "calibration"]
        casa.check(cal_runs and all(r["outcome"] != "ok" for r in cal_runs),
                   f"calibration runs of the corrupt MS: {[r['outcome'] for r in cal_runs]}")
        s.leftovers(casa)
    except Exception as exc:  # noqa: BLE001
        _abort(rows, exc)
    finally:
        s.close()
    return rows

