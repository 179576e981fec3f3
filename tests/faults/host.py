"""The host under the daemon: its wall clock stepping, and the kernel's OOM killer.

Expectations (each row's goal column):

* wall clock stepped +2 h, then back -2 h, then -30 s (libfaketime in the daemon and its
  workers only, the monotonic clock left alone, as a real step does): a group half in when
  the clock jumps forwards does not time out and completes when its other files come; a
  stage in flight across the forward jump is not taken back as stale (it ends 'ok', no
  abandoned run, no recovered claim); a half group that never completes times out 60 s
  after it opened, neither early (forward jump) nor late (backward jump); a stage retried
  after a failure is retried within its backoff plus the backward jump; the calibrator
  transit goes to done, the others to converted or beyond, each exactly once;
* a conversion worker OOM-killed by the kernel in a memory cgroup nested in the runner's
  own (the daemon and its forkserver moved in after a first group warmed them up; the
  daemon given oom_score_adj -1000 as systemd's OOMScoreAdjust would, where the host grants
  CAP_SYS_RESOURCE, and each stage worker 1000, with v1's OOM killer held off until it is,
  so the kernel takes the worker): the daemon keeps running with the same PID, the attempt
  fails with a clear reason (a worker process died, exit code -9), and once the limit is
  raised the retry converts the group, exactly once; the dead worker's staging does not
  stay in tmpfs; the cgroup is removed afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .core import (
    ACTIVE,
    CONVERTED_PLUS,
    STOPPED,
    Expect,
    Row,
    Session,
    at,
    children,
    finish,
    tracebacks,
)
from .environment import _wait_runs, stage_worker

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

# libfaketime 0.9.10 (Debian 12) breaks clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)
# when it leaves the monotonic clock alone, and Python >= 3.11's time.sleep uses exactly
# that (EINVAL; libfaketime issue #426). Under the fake clock only, time.sleep waits in
# select() instead: the same relative monotonic sleep, through a call libfaketime passes on.
_SLEEP_SHIM = '''\
"""Test-only: time.sleep without clock_nanosleep (libfaketime 0.9.10 bug, issue #426)."""
import select
import time


def _sleep(secs):
    if secs < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + secs
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


time.sleep = _sleep
'''

_PROBE = """\
import json, pathlib, sys, time
rc = pathlib.Path(sys.argv[1])
w0, m0 = time.time(), time.monotonic()
rc.write_text("+2h\\n")
time.sleep(0.3)
w1, m1 = time.time(), time.monotonic()
rc.write_text("+0\\n")
print(json.dumps({"wall": w1 - w0, "mono": m1 - m0}))
"""


def _abort(rows: list[Row], exc: Exception) -> None:
    for r in rows:
        r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")


# ---------------------------------------------------------------------------- clock
class FakeClock:
    """The daemon's wall clock offset, changed at run time through libfaketime's timestamp
    file (read on every call: FAKETIME_NO_CACHE); the monotonic clock stays real."""

    def __init__(self, root: Path) -> None:
        self.rc = root / "faketime.rc"
        self.shim = root / "faketime-shim"
        self.shim.mkdir(parents=True, exist_ok=True)
        (self.shim / "sitecustomize.py").write_text(_SLEEP_SHIM)
        self.offset_s = 0.0
        self.set("+0", 0)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.shim), base.get("PYTHONPATH", "")) if p)
        return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(self.rc),
                "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": path}

    def set(self, spec: str, offset_s: float) -> None:
        """Step the clock to ``spec`` (libfaketime's relative form, e.g. "+2h"), which is
        ``offset_s`` seconds from the real time."""
        tmp = self.rc.with_suffix(".tmp")
        tmp.write_text(spec + "\n")
        os.replace(tmp, self.rc)
        self.offset_s = offset_s

    def unusable(self, base: dict[str, str]) -> str | None:
        """Why the fake clock does not behave as a clock step here, or None: a probe under
        the same settings must see time.time() jump and time.monotonic() not."""
        if not LIBFAKETIME.is_file():
            return f"libfaketime missing ({LIBFAKETIME}; apt package faketime)"
        try:
            r = subprocess.run([sys.executable, "-c", _PROBE, str(self.rc)],
                               env={**base, **self.env(base)}, capture_output=True, text=True,
                               timeout=60)
        except subprocess.SubprocessError as exc:
            return f"libfaketime probe failed: {exc}"
        finally:
            self.set("+0", 0)
        try:
            got = json.loads(r.stdout)
        except ValueError:
            return f"libfaketime probe failed (exit {r.returncode}): {r.stderr[-300:]}"
        if not (7199 < got["wall"] < 7210 and 0.25 < got["mono"] < 5):
            return f"libfaketime did not step only the wall clock: {got}"
        return None


def _heartbeat(s: Session, gid: str) -> float | None:
    with s.db() as con:
        row = con.execute("SELECT heartbeat FROM groups WHERE id = ?", (gid,)).fetchone()
    return None if row is None else row["heartbeat"]


def _until(cond, what: str, timeout: float, s: Session, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if not s.alive():
            raise AssertionError(f"daemon exited waiting for {what}:\n{s.d.log_tail()}")
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}; states {s.d.states()}\n"
                         f"{s.d.log_tail()}")


def _n_files(s: Session, gid: str) -> int:
    """Subband files the queue holds for a simulated group (wherever they were placed)."""
    names = set(s.truths[gid]["files"])
    return sum(1 for f in s.group_files() if Path(f["path"]).name in names)


def _kill_worker_until_failed(s: Session, gid: str) -> list[str]:
    """SIGKILL the group's stage workers until an attempt is recorded failed."""
    killed: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and s.d.states().get(gid) in ("pending", "converting"):
        if any(r["outcome"] == "failed" and r["group_id"] == gid for r in s.stage_runs()):
            break
        victim = stage_worker(s)
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
                killed.append(str(victim))
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    return killed


GROUP_TIMEOUT_S = 60.0
BACKOFF_S = 5.0
BACK_JUMP_S = 30.0


def session_clock(workdir: Path) -> list[Row]:
    row = Row("wall clock stepped +2 h, back -2 h, then -30 s (libfaketime)",
              "no early/late timeout, no stale take-back; done/converted+ once")
    s = Session(workdir, "clock", CONTIMG_GROUP_TIMEOUT_S=str(int(GROUP_TIMEOUT_S)),
                CONTIMG_TIMEOUT_POLICY="quarantine", CONTIMG_CLAIM_TIMEOUT_S="4",
                CONTIMG_HEARTBEAT_S="3", CONTIMG_BACKOFF_BASE_S=str(BACKOFF_S),
                CONTIMG_MAX_ATTEMPTS="3", CONTIMG_CAL_HOLD_RETRY_S="5")
    try:
        clock = FakeClock(s.root)
        why = clock.unusable(s.d.env)
        if why:
            row.skipped = why
            return [row]
        a = s.simulate(at(0), seed=83)  # 3C286 transits: calibrated and imaged, done
        b, c, d = s.good(0), s.good(1), s.good(2)
        ga, gb, gc, gd = (t["group_id"] for t in (a, b, c, d))
        s.start(**clock.env(s.d.env))
        s.drop(ga)
        s.drop(gb, b["files"][:8])
        t_open_d = time.monotonic()
        s.drop(gd, d["files"][:8])
        _until(lambda: _n_files(s, gb) == 8 and _n_files(s, gd) == 8,
               "8 files of B and D recorded", 60, s)
        _until(lambda: s.d.states().get(ga) == "calibrating", "A calibrating", 150, s)
        # Step forwards just after a heartbeat, so the claim looks 2 h stale for a whole
        # heartbeat interval (3 s: three sweeps at a 4 s claim timeout), while the worker is
        # held stopped so the stage is surely still in flight.
        beat = _heartbeat(s, ga)
        _until(lambda: _heartbeat(s, ga) != beat, "A's next heartbeat", 10, s, step=0.01)
        worker = stage_worker(s)
        if worker is not None:
            os.kill(worker, signal.SIGSTOP)
        clock.set("+2h", 7200)
        runs = [r for r in s.stage_runs() if r["group_id"] == ga and r["finished"] is None]
        row.check(runs, "A had no stage in flight at the forward jump")
        ahead = 0.0  # how far ahead of the real clock the daemon's next heartbeat is
        try:
            until = time.monotonic() + 4.0
            while time.monotonic() < until:
                ahead = max(ahead, (_heartbeat(s, ga) or 0.0) - time.time())
                time.sleep(0.1)
        finally:
            if worker is not None:
                os.kill(worker, signal.SIGCONT)
        row.check(worker is not None, "no worker to hold stopped across the forward jump")
        row.check(ahead > 7000, f"the daemon's clock did not step +2 h: its heartbeat is "
                                f"{ahead:.0f} s ahead of the real clock")
        st = s.d.states()
        row.check(st.get(gb) == "collecting" and st.get(gd) == "collecting",
                  f"4 s after +2 h, B and D should still be collecting: B {st.get(gb)}, "
                  f"D {st.get(gd)}")
        s.drop(gb, b["files"][8:])
        _until(lambda: s.d.states().get(s.actual(gb) or gb) not in (None, "collecting"),
               "B complete after the forward jump", 60, s)
        # Step back 2 h while D still waits for files it will never get.
        t_back = time.monotonic()
        clock.set("+0", 0)
        row.check(t_back - t_open_d < GROUP_TIMEOUT_S - 5,
                  f"the backward jump came {t_back - t_open_d:.0f} s after D opened: too "
                  "late to test its timeout")
        s.wait_states({gb: CONVERTED_PLUS}, what="B converted", fail_on=STOPPED)
        if runs:
            done = _until(lambda: [r for r in s.stage_runs() if r["id"] == runs[0]["id"]
                                   and r["finished"] is not None], "A's held stage ended",
                          120, s)
            row.check(done[0]["outcome"] == "ok",
                      f"A's {runs[0]['stage']} in flight at the jump ended "
                      f"{done[0]['outcome']}: {done[0]['error']}")
        _until(lambda: s.d.states().get(s.actual(gd) or gd) not in (None, "collecting"),
               "D timed out", GROUP_TIMEOUT_S + 60, s, step=0.2)
        waited = time.monotonic() - t_open_d
        # seen from here (polling a loaded machine); the daemon's own "after N s" below is
        # the precise measure
        row.check(GROUP_TIMEOUT_S - 1 <= waited <= GROUP_TIMEOUT_S + 30,
                  f"D left collecting {waited:.0f} s after it opened (timeout "
                  f"{GROUP_TIMEOUT_S:.0f} s, across +2 h and -2 h steps)")
        reason = s.groups().get(s.actual(gd) or gd, {}).get("last_error") or ""
        m = re.search(r"after (\d+) s", reason)
        row.check(m and abs(int(m.group(1)) - GROUP_TIMEOUT_S) <= 15,
                  f"D's timeout reason does not give ~{GROUP_TIMEOUT_S:.0f} s: {reason!r}")
        s.wait_states({ga: ("done",)}, what="A done", fail_on=STOPPED)
        # A retry in backoff when the clock steps back: no later than backoff + the jump.
        s.drop(gc)
        s.wait_states({gc: ("converting",)}, what="C converting")
        killed = _kill_worker_until_failed(s, gc)
        clock.set(f"-{int(BACK_JUMP_S)}", -BACK_JUMP_S)
        t_fail = time.monotonic()
        fails = [r for r in s.stage_runs() if r["group_id"] == gc and r["outcome"] == "failed"]
        row.check(fails, f"C's worker was not killed mid conversion (killed {killed})")
        if fails:
            retried = _wait_runs(s, lambda rs: len([r for r in rs if r["group_id"] == gc
                                                    and r["stage"] == "conversion"]) >= 2,
                                 "C retried", BACKOFF_S + BACK_JUMP_S + 60)
            t_retry = time.monotonic()
            row.check(retried[-1]["attempt"] == 2 or any(r["attempt"] == 2 for r in retried),
                      "C's retry is not its second attempt")
            row.check(t_retry - t_fail >= BACKOFF_S - 1.5,
                      f"C retried {t_retry - t_fail:.1f} s after its failure "
                      f"(backoff {BACKOFF_S:.0f} s)")
            row.check(t_retry - t_fail <= BACKOFF_S + BACK_JUMP_S + 10,
                      f"C retried {t_retry - t_fail:.0f} s after its failure: later than "
                      f"backoff {BACKOFF_S:.0f} s + the {BACK_JUMP_S:.0f} s step back")
        s.wait_states({gc: CONVERTED_PLUS}, what="C converted after its retry",
                      fail_on=STOPPED)
        status = s.status_json()
        finish(s, row)
        s.account(row, [Expect(ga, ("done",)), Expect(gb, CONVERTED_PLUS),
                        Expect(gc, CONVERTED_PLUS, alerts=("conversion.failed",)),
                        Expect(gd, ("quarantined",), reason=r"timed out",
                               alerts=("ingest",))], status=status)
        s.unexpected_groups(row, [ga, gb, gc, gd])
        s.leftovers(row)
        taken = [e.get("event") for e in s.events()
                 if e.get("event") in ("queue.recovered_stale_claims", "claims_recovered")
                 or (e.get("event") == "alert" and e.get("category") == "daemon.recovered")]
        row.check(not taken, f"claims taken back as stale: {taken}")
        abandoned = [(r["group_id"], r["stage"], r["error"]) for r in s.stage_runs()
                     if r["outcome"] == "abandoned" and r["error"] != "released at shutdown"]
        row.check(not abandoned, f"abandoned stage runs: {abandoned}")
        row.check(not tracebacks(s), f"tracebacks in the log: {tracebacks(s)[:3]}")
    except Exception as exc:  # noqa: BLE001
        _abort([row], exc)
    finally:
        s.close()
    return [row]


# ---------------------------------------------------------------------------- memory
class MemCgroup:
    """A memory cgroup nested in this process's own (v1 ``memory`` controller or v2)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.parent: Path | None = None
        self.v2 = False

    def create(self) -> str | None:
        """Make the cgroup; None on success, else why it cannot be done here."""
        if os.geteuid() != 0:
            return "not root: cannot make a memory cgroup"
        own = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            own[ctrls] = path
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").exists() and "memory" in own:
            self.parent = v1 / own["memory"].lstrip("/")
        elif Path("/sys/fs/cgroup/cgroup.controllers").exists() and "" in own:
            self.v2 = True
            self.parent = Path("/sys/fs/cgroup") / own[""].lstrip("/")
            ctl = self.parent / "cgroup.subtree_control"
            if "memory" not in ctl.read_text().split():
                return f"cgroup v2: memory not delegated to children of {self.parent}"
        else:
            return "no writable cgroup memory controller (v1 or v2)"
        path = self.parent / f"contimg-faults-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except OSError as exc:
            return f"cannot make a memory cgroup under {self.parent}: {exc}"
        self.path = path
        if not self.v2:
            self._write("memory.swappiness", "0")  # no swapping out instead of an OOM kill
        return None

    def _write(self, name: str, value: str) -> None:
        assert self.path is not None
        (self.path / name).write_text(value)

    def _read(self, name: str) -> str:
        assert self.path is not None
        return (self.path / name).read_text()

    def add(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        return [int(p) for p in self._read("cgroup.procs").split()]

    def usage(self) -> int:
        return int(self._read("memory.current" if self.v2 else "memory.usage_in_bytes"))

    def limit(self, nbytes: int | None) -> None:
        """Set the limit (None: none); swap is limited with it so the kernel must kill."""
        if self.v2:
            self._write("memory.max", "max" if nbytes is None else str(nbytes))
            if (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", "max" if nbytes is None else "0")
            return
        memsw = (self.path / "memory.memsw.limit_in_bytes").exists()
        if nbytes is None:
            if memsw:
                self._write("memory.memsw.limit_in_bytes", "-1")
            self._write("memory.limit_in_bytes", "-1")
        else:  # memsw >= mem at every step
            self._write("memory.limit_in_bytes", str(nbytes))
            if memsw:
                self._write("memory.memsw.limit_in_bytes", str(nbytes))

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        m = re.search(r"^oom_kill (\d+)$", text, re.M)
        return int(m.group(1)) if m else 0

    def hold_oom(self, on: bool) -> bool:
        """cgroup v1: hold tasks at the limit instead of OOM-killing (``oom_kill_disable``);
        False where it does not exist (v2)."""
        if self.v2 or self.path is None:
            return False
        self._write("memory.oom_control", "1" if on else "0")
        return True

    def under_oom(self) -> bool:
        return not self.v2 and bool(re.search(r"^under_oom 1$", self._read("memory.oom_control"),
                                              re.M))

    def failcnt(self) -> int:
        if self.v2:
            m = re.search(r"^max (\d+)$", self._read("memory.events"), re.M)
            return int(m.group(1)) if m else 0
        return int(self._read("memory.failcnt"))

    def remove(self) -> None:
        """Move every process back to the parent cgroup and remove this one."""
        if self.path is None or not self.path.exists():
            return
        try:
            self.limit(None)
        except OSError:
            pass
        for _ in range(50):
            try:
                pids = self.pids()
            except OSError:
                break
            for pid in pids:
                try:
                    (self.parent / "cgroup.procs").write_text(str(pid))
                except OSError:
                    pass
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


MARGIN_B = 48 * 2**20


def _oom_first(pid: int) -> bool:
    """Make a process the OOM killer's first choice (oom_score_adj 1000); False if gone."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
        return True
    except OSError:
        return False


def _oom_kill_worker(s: Session, cg: MemCgroup, gid: str) -> tuple[list[int], list[dict]]:
    """Drop the group under a limit its conversion cannot fit in; each stage worker is made
    the OOM killer's first choice, and (cgroup v1) the OOM killer is held off until that is
    done, so the kernel cannot pick the forkserver or the daemon. The workers marked and
    the stage runs once the attempt is recorded. Without the hold (v2) the worker is marked
    as soon as it is seen."""
    held = cg.hold_oom(True)
    cg.limit(cg.usage() + MARGIN_B)
    marked: list[int] = []
    s.drop(gid)
    oom_since: float | None = None
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            runs = s.stage_runs() if (s.d.state / "contimg.sqlite").exists() else []
            if any(r["group_id"] == gid and r["outcome"] in ("failed", "ok") for r in runs):
                cg.limit(None)
                return marked, runs
            if not s.alive():
                raise AssertionError(f"the daemon died under the memory limit:\n"
                                     f"{s.d.log_tail()}")
            worker = stage_worker(s)
            if worker is not None and worker not in marked and _oom_first(worker):
                marked.append(worker)
            if held and cg.under_oom():
                oom_since = oom_since or time.monotonic()
                if worker is not None and worker in marked:
                    cg.hold_oom(False)  # the kernel acts now, on the marked worker
                    held = False
                elif time.monotonic() - oom_since > 5:
                    raise AssertionError("the daemon or its forkserver, not a stage worker, "
                                         "ran into the memory limit")
            time.sleep(0.01)
        raise AssertionError(f"no conversion attempt recorded under the limit:\n"
                             f"{s.d.log_tail()}")
    finally:
        cg.hold_oom(False)
        cg.limit(None)


def session_oom(workdir: Path) -> list[Row]:
    row = Row("conversion worker OOM-killed in a memory cgroup, then the limit raised",
              "daemon lives; -9 reason, retry→converted once")
    s = Session(workdir, "oom", CONTIMG_MAX_ATTEMPTS="3", CONTIMG_BACKOFF_BASE_S="3")
    cg = MemCgroup()
    try:
        why = cg.create()
        if why:
            row.skipped = why
            return [row]
        warm, g = s.good(0), s.good(1)
        gid = g["group_id"]
        s.start()
        daemon = s.proc.pid
        # the forkserver starts in the background (executor warm-up): move the daemon and all
        # it has started once the forkserver is up, and again until nothing is left outside
        s.wait_event("executor_warm", 120)
        for _ in range(20):
            outside = [pid for pid in [daemon, *children(daemon)] if pid not in cg.pids()]
            if not outside:
                break
            for pid in outside:
                try:
                    cg.add(pid)
                except OSError:
                    pass  # gone meanwhile
            time.sleep(0.1)
        try:  # OOMScoreAdjust=-1000 (needs CAP_SYS_RESOURCE; the workers are marked anyway)
            Path(f"/proc/{daemon}/oom_score_adj").write_text("-1000")
        except PermissionError:
            pass
        server = [p for p in children(daemon) if b"forkserver" in _cmdline(p)]
        row.check(server and set(cg.pids()) >= {daemon, *server},
                  f"the daemon and its forkserver are not all in the cgroup: {cg.pids()}")
        # a first group under no limit: the daemon loads what ingest needs (pyuvdata, for
        # the headers) and the forkserver its modules, all charged to the cgroup
        s.drop(warm["group_id"])
        s.wait_states({warm["group_id"]: CONVERTED_PLUS}, what="the first group converted",
                      fail_on=STOPPED)
        _until(lambda: s.d.states().get(warm["group_id"]) not in ACTIVE
               and all(r["finished"] is not None for r in s.stage_runs()),
               "the first group at rest (no stage in flight)", 150, s, step=0.2)
        kills0, fails0 = cg.oom_kills(), cg.failcnt()
        marked, runs = _oom_kill_worker(s, cg, gid)
        err = next((r["error"] for r in runs
                    if r["group_id"] == gid and r["outcome"] == "failed"), None)
        kills, fails = cg.oom_kills() - kills0, cg.failcnt() - fails0
        row.check(err is not None, f"the conversion did not fail under a limit of usage + "
                                   f"{MARGIN_B >> 20} MB (oom kills {kills}, failcnt {fails})")
        row.check(err is None or re.search(r"worker process died.*exit code -9", err),
                  f"unclear reason for the killed attempt: {err!r}")
        # the oom_kill counter, not failcnt: some kernels (6.18 here) leave v1's failcnt at 0
        row.check(kills >= 1, f"the kernel did not OOM-kill in the cgroup (oom_kill +{kills}, "
                              f"failcnt +{fails})")
        row.check(marked, "no stage worker seen under the forkserver")
        s.wait_states({gid: CONVERTED_PLUS}, what="the group converted after the retry",
                      fail_on=STOPPED)
        row.check(s.alive() and s.proc.pid == daemon, "the daemon did not survive")
        row.check(all(Path(f"/proc/{p}").exists() for p in server),
                  "the OOM killer took the forkserver, not the worker")
        stale = [p.name for p in s.tmpfs.glob("contimg-stage-*")]
        row.check(not stale, f"the killed worker's staging stays in tmpfs: {stale}")
        row.check(any(e.get("event") == "worker_died" and e.get("exitcode") == -9
                      for e in s.events()), "no worker_died event with exit code -9")
        status = s.status_json()
        finish(s, row)
        s.account(row, [Expect(warm["group_id"], CONVERTED_PLUS),
                        Expect(gid, CONVERTED_PLUS, alerts=("conversion.failed",))],
                  status=status)
        s.unexpected_groups(row, [warm["group_id"], gid])
        s.leftovers(row)
    except Exception as exc:  # noqa: BLE001
        _abort([row], exc)
    finally:
        s.close()
        cg.remove()
        if cg.path is not None and cg.path.exists():
            row.problems.append(f"cgroup {cg.path} could not be removed")
    return [row]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
