"""Crashes: SIGKILL of the daemon's whole process group (what systemd does on a watchdog
timeout or an OOM kill of the unit) at every stage boundary and in the middle of every stage,
each followed by a restart.

Two groups (the first has the calibrator transit, the second applies its calibration set)
go through the full pipeline on two workers while the daemon is killed at: ingest (half the
files in), mid conversion, the conversion→calibration boundary, mid calibration, the
calibration→imaging boundary, mid imaging and the imaging→done boundary. After every kill no
visible product may be half-written; at the end every group is ``done`` with exactly one
'ok' run per stage, one product of each kind, one catalogue row, and no staging or hidden
temporaries are left. One row per kill point; the counts are those of the whole session.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from dsa110_contimg.conversion.workarea import work_dir

from .core import STOPPED, WAIT_S, Expect, Row, Session, at, finish, half_written

# (label, state to wait for, seconds to wait after seeing it)
KILLS: list[tuple[str, str, float]] = [
    ("SIGKILL during ingest (8/16 files in)", "collecting", 0.5),
    ("SIGKILL mid conversion", "converting", 1.0),
    ("SIGKILL at conversion→calibration boundary", "converted", 0.0),
    ("SIGKILL mid calibration", "calibrating", 1.5),
    ("SIGKILL at calibration→imaging boundary", "calibrated", 0.0),
    ("SIGKILL mid imaging", "imaging", 1.5),
    ("SIGKILL at imaging→done boundary", "done", 0.0),
]
GOAL = "every group done once"


def _entered(s: Session, state: str) -> int:
    """How many times any group has entered ``state`` (the queue's state-change log)."""
    if not (s.d.state / "contimg.sqlite").exists():
        return 0
    try:
        with s.db() as con:
            return con.execute("SELECT count(*) FROM group_events WHERE to_state = ?",
                               (state,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _poll(s: Session, state: str, timeout: float, boundary: bool) -> dict[str, str] | None:
    """Until a group is in ``state`` or, for a boundary (a resting state that lasts
    milliseconds before the next claim), until a group has just entered it."""
    deadline = time.monotonic() + timeout
    before = _entered(s, state) if boundary else 0
    while time.monotonic() < deadline:
        st = s.d.states()
        if (boundary and _entered(s, state) > before) or (not boundary and state in st.values()):
            return st
        stopped = [g for g, v in st.items() if v in STOPPED]
        if stopped:
            raise AssertionError(f"{stopped} stopped: "
                                 f"{[s.groups()[g]['last_error'] for g in stopped]}")
        if not s.alive() or (st and all(v == "done" for v in st.values())):
            return None  # dead, or everything finished without passing through ``state``
        time.sleep(0.02)
    return None


def session_crash(workdir: Path) -> list[Row]:
    rows = [Row(label, GOAL) for label, _, _ in KILLS]
    # Every kill abandons the stages in flight; a group in flight at CONTIMG_POISON_STARTS
    # unclean starts in a row is quarantined as a suspected poison group. Seven kills within
    # a minute can find one group in flight at each of them: allow 8 here.
    s = Session(workdir, "crash", CONTIMG_MAX_WORKERS="2", CONTIMG_CAL_HOLD_RETRY_S="5",
                CONTIMG_POISON_STARTS="8")
    try:
        a, b = s.simulate_run(at(0), 2, seed=81)  # 3C286 transits in a; b applies a's set
        s.start()
        first_half = a["files"][:8]
        for (label, state, delay), row in zip(KILLS, rows, strict=True):
            if state == "collecting":
                s.drop(a["group_id"], first_half)
            seen = _poll(s, state, min(WAIT_S, 150), boundary="boundary" in label)
            if seen is None:
                row.problems.append(f"never saw a group {state} before the kill "
                                    f"(daemon alive: {s.alive()}; states {s.d.states()})")
            time.sleep(delay)
            at_kill = s.d.states()
            s.kill()
            row.goal = f"{GOAL}; killed at {','.join(sorted(set(at_kill.values()))) or '-'}"
            for p in half_written(s.d.output):
                row.problems.append(f"after the kill: {p}")
            if state == "collecting":
                s.drop(a["group_id"], a["files"][8:])
                s.drop(b["group_id"])
            s.start()
        gids = [a["group_id"], b["group_id"]]
        s.wait_states({g: ("done",) for g in gids}, what="both groups done after the restarts",
                      fail_on=STOPPED)
        status = s.status_json()
        finish(s, rows)
        runs = s.stage_runs()
        recovered = any(e.get("event") == "claims_recovered" for e in s.events())
        staging = [str(p) for root in (s.d.scratch, s.tmpfs) for p in root.glob("contimg-stage-*")]
        hidden = [str(p) for p in s.d.output.rglob(".*") if "partial" in p.name]
        for row in rows:
            s.account(row, [Expect(g, ("done",)) for g in gids], status=status)
            for g in gids:
                g = s.actual(g) or g
                oks = sorted(r["stage"] for r in runs if r["group_id"] == g and r["outcome"] == "ok")
                row.check(oks == ["calibration", "conversion", "imaging"],
                          f"{g}: 'ok' runs {oks} (exactly one per stage expected)")
                row.check(s.catalogue_counts().get(g) == 1, f"{g}: not exactly one catalogue row")
            row.check(recovered, "no claims_recovered event after the kills")
            row.check(not staging, f"stale staging left: {staging}")
            row.check(not hidden, f"hidden half-published temporaries left: {hidden}")
            row.check(not half_written(s.d.output), "half-written products at the end")
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        s.close()
    return rows


def session_reboot(workdir: Path) -> list[Row]:
    """A reboot: the daemon is killed mid calibration and tmpfs is emptied, taking the MS
    kept in the work area with it. On restart the group is converted again from its raw
    files (the only stage run twice) and finishes once, its MS archived."""
    row = Row("reboot mid calibration (SIGKILL, tmpfs emptied)",
              "MS lost→converted again→done once")
    s = Session(workdir, "reboot", CONTIMG_MAX_WORKERS="1", CONTIMG_TMPFS_KEEP_MS="true")
    try:
        (a,) = s.simulate_run(at(0), 1, seed=82)
        gid = a["group_id"]
        s.start()
        s.drop(gid)
        if _poll(s, "calibrating", min(WAIT_S, 150), boundary=False) is None:
            row.problems.append(f"never saw the group calibrating (states {s.d.states()})")
        time.sleep(1.0)
        s.kill()
        work = work_dir(s.tmpfs, s.d.state)
        kept = sorted(p.name for p in work.glob("*.ms"))
        row.check(kept, "the converted MS was not in the tmpfs work area")
        for p in kept:
            shutil.rmtree(work / p)
        s.start()
        s.wait_states({gid: ("done",)}, what="the group done after the reboot", fail_on=STOPPED)
        finish(s, row)
        s.account(row, [Expect(gid, ("done",))])
        oks = sorted(r["stage"] for r in s.stage_runs()
                     if r["group_id"] == gid and r["outcome"] == "ok")
        # converting again after the reboot is the point, not a duplicate: take it back out
        if oks == ["calibration", "conversion", "conversion", "imaging"]:
            row.duplicated -= 1
            row.problems = [p for p in row.problems if "'ok' runs of conversion" not in p]
        row.check(oks == ["calibration", "conversion", "conversion", "imaging"],
                  f"'ok' runs {oks} (conversion twice, the rest once expected)")
        lost = [x for x in s.alerts() if x.get("category") == "conversion.lost"
                and (x.get("context") or {}).get("group_id") == gid]
        row.check(lost, "no conversion.lost alert names the group")
        final = s.d.output / gid[:10] / gid / (gid.replace(":", "") + ".ms")
        row.check((final / "table.dat").is_file(), f"MS not archived to {final}")
        row.check(not list(work.glob("*.ms")), "an MS is still in the tmpfs work area")
    except Exception as exc:  # noqa: BLE001
        row.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        s.close()
    return [row]
