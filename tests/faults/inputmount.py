"""The input mount coming and going, and hanging, under the real daemon.

The input directory is a FUSE passthrough (:class:`faults.powercut.PowerCutMount`, never cut
here) over a backing directory, as an NFS share from the correlator would be:

* unmounted with half a group in it, for longer than the group timeout; the other half
  written on the "server" (the backing directory) meanwhile; mounted again: the group waits
  instead of timing out ("input unavailable"), takes its files up again and ends done, once;
* hung (the FUSE server stopped with SIGSTOP, as a dead NFS server hangs every ``stat``) with
  half a group in it, for longer than the group timeout: the daemon keeps answering (the
  status API, heartbeats), ``/health`` says the input filesystem is hung, a CRITICAL
  ``input.hung`` alert goes out, the group is not timed out; once the server answers again
  the rest of the group arrives and it ends done, once.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from .core import STOPPED, Expect, Row, Session, at, finish, request
from .powercut import PowerCutMount, unavailable

GROUP_TIMEOUT_S = 20
FS_TIMEOUT_S = 5  # the single-threaded FUSE server is slow while files are copied in


def _put(truth: dict, names: list[str], backing: Path) -> None:
    """Write files on the server side (the backing directory), each renamed into place."""
    for name in names:
        src = Path(truth["hold"]) / name
        tmp = backing / f".{name}.part"
        shutil.copyfile(src, tmp)
        os.replace(tmp, backing / name)


def _wait_files(s: Session, gid: str, n: int, timeout: float = 60) -> None:
    """Until the queue holds ``n`` files of the group (seen, stable, recorded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for f in s.group_files() if f["group_id"] == gid) >= n:
            time.sleep(1)  # and verified: past the stability window
            return
        time.sleep(0.2)
    raise AssertionError(f"{gid}: {n} files not recorded within {timeout:.0f} s")


def _health(s: Session) -> dict:
    import json

    code, _, body = request(s.api_port(), "GET", "/health")
    return json.loads(body) if code == 200 else {"http": code}


def session_input_mount(workdir: Path) -> list[Row]:
    gone = Row("input directory unmounted, then mounted again",
               "group waits (no timeout), files taken up again, done once")
    hung = Row("input mount hung (server stopped) past the group timeout",
               "API answers, /health 'hung', input.hung alert, no timeout, done once")
    rows = [gone, hung]
    why = unavailable()
    if why is not None:
        for r in rows:
            r.skipped = why
        return rows
    s = Session(workdir, "input-mount", CONTIMG_GROUP_TIMEOUT_S=str(GROUP_TIMEOUT_S),
                CONTIMG_TIMEOUT_POLICY="quarantine", CONTIMG_INPUT_FS_TIMEOUT_S=str(FS_TIMEOUT_S),
                CONTIMG_CAL_HOLD_RETRY_S="5")
    backing = s.root / "incoming.server"
    fs = PowerCutMount(backing, s.d.input, s.root / "inputfs")
    stopped = False
    try:
        fs.mount()
        a, b = s.simulate_run(at(0), 2, seed=91)  # a: 3C286 transits; b applies a's set
        s.start()
        # --- the mount goes away with half of A in it, and comes back
        s.drop(a["group_id"], a["files"][:8])
        _wait_files(s, a["group_id"], 8)
        fs.unmount(cut=False)
        time.sleep(GROUP_TIMEOUT_S + 10)
        _put(a, a["files"][8:], backing)
        gone.check(s.alive(), "the daemon died while the input was unmounted")
        state = s.d.states().get(a["group_id"])
        gone.check(state == "collecting", f"while unmounted the group became {state}")
        fs.mount()
        s.wait_states({a["group_id"]: ("done",)}, what="A done after the remount",
                      fail_on=STOPPED)
        # --- the mount hangs with half of B in it
        s.drop(b["group_id"], b["files"][:8])
        _wait_files(s, b["group_id"], 8)
        assert fs.proc is not None
        os.kill(fs.proc.pid, signal.SIGSTOP)
        stopped = True
        deadline = time.monotonic() + GROUP_TIMEOUT_S + 15
        saw_hung = False
        while time.monotonic() < deadline:
            h = _health(s)  # must answer although the input hangs
            saw_hung |= (h.get("input") or {}).get("state") == "hung"
            time.sleep(1)
        hung.check(saw_hung, f"/health never said the input was hung: {h}")
        hung.check(h.get("status") == "degraded", f"/health status {h.get('status')!r}")
        state = s.d.states().get(b["group_id"])
        hung.check(state == "collecting", f"while the mount hung the group became {state}")
        os.kill(fs.proc.pid, signal.SIGCONT)
        stopped = False
        s.drop(b["group_id"], b["files"][8:])
        s.wait_states({b["group_id"]: ("done",)}, what="B done after the mount answered",
                      fail_on=STOPPED)
        ok_again = _health(s)
        hung.check((ok_again.get("input") or {}).get("state") == "ok",
                   f"/health after the mount answered: {ok_again.get('input')}")
        status = s.status_json()
        finish(s, rows)
        events = {e.get("event") for e in s.events()}
        gone.check("ingest.input_unavailable" in events, "no ingest.input_unavailable event")
        gone.check("ingest.input_back" in events, "no ingest.input_back event")
        s.account(gone, [Expect(a["group_id"], ("done",))], status=status)
        s.account(hung, [Expect(b["group_id"], ("done",))], alert_categories=("input.hung",),
                  status=status)
        for r in rows:
            s.leftovers(r)
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        if stopped and fs.proc is not None:
            os.kill(fs.proc.pid, signal.SIGCONT)
        s.close()
        try:
            fs.unmount(cut=False)
        except RuntimeError as exc:
            rows[0].problems.append(f"input FS: {exc}")
    return rows
