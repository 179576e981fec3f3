"""Sessions (one daemon directory tree and its groups), accounting, and the table row."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon_harness import Daemon, json_events

#: Longest wait for any one condition (seconds); keep it short on a shared machine.
WAIT_S = float(os.environ.get("FAULTS_WAIT_S", "240"))
#: The simulator's default start: 3C286 transits in the middle of this tiny group.
BASE = datetime(2026, 6, 1, 4, 46, 6, tzinfo=UTC)

ACTIVE = ("converting", "calibrating", "imaging")
CONVERTED_PLUS = ("converted", "calibrating", "calibrated", "imaging", "done")
STOPPED = ("quarantined", "failed")

#: Settings every session uses on top of the harness's fast ones (one worker: the machine
#: is shared; a short drain so a stop does not wait for a whole calibration).
SESSION_ENV = {
    "CONTIMG_MAX_WORKERS": "1",
    "CONTIMG_SHUTDOWN_TIMEOUT_S": "5",
    "CONTIMG_GROUP_TIMEOUT_S": "120",
    "CONTIMG_CAL_HOLD_RETRY_S": "600",
}


def at(minutes: float) -> datetime:
    """A group start ``minutes`` after BASE (groups 10 min apart never share a group)."""
    return BASE + timedelta(minutes=minutes)


# ---------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of the table. ``problems`` empty means the row passed."""

    fault: str
    goal: str
    runs: int = 0
    groups_in: int = 0
    groups_done: int = 0
    stopped: int = 0
    lost: int = 0
    duplicated: int = 0
    alerts: int = 0
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def result(self) -> str:
        if self.skipped:
            return "SKIP"
        return "ok" if self.ok else "FAIL"

    def check(self, cond: object, problem: str) -> bool:
        if not cond:
            self.problems.append(problem)
        return bool(cond)


@dataclass
class Expect:
    """What one dropped-in group must become.

    ``goal``: acceptable final states. ``reason``: a regex the stop reason must match (in the
    queue, in ``contimg status --json`` and in a log event) when the group is stopped.
    ``alerts``: alert categories, one of which must name the group (empty: no requirement).
    """

    gid: str
    goal: tuple[str, ...]
    reason: str | None = None
    alerts: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    @property
    def good(self) -> bool:
        return not set(self.goal) & set(STOPPED)


# ---------------------------------------------------------------------------- processes
def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), depth first."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds (IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(m.group(1))
    out = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            out.append((_addr(hexaddr, v6), int(hexport, 16)))
    return out


def _addr(hexaddr: str, v6: bool) -> str:
    import ipaddress

    raw = bytes.fromhex(hexaddr)
    if not v6:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def proc_sample(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, open file descriptors) of one process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of a process points at (sockets, pipes and anon inodes
    reduced to their kind), for naming a leak."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        out.append(re.sub(r":\[\d+\]$", "", target))
    return sorted(out)


# ---------------------------------------------------------------------------- HTTP
def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
         host: str = "127.0.0.1", body: bytes | None = None) -> tuple[int, dict[str, str], str]:
    """One raw request (the path is sent exactly as given: no dot-segment normalisation)."""
    conn = http.client.HTTPConnection(host, port, timeout=15)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode(
            "utf-8", "replace")
    finally:
        conn.close()


# ---------------------------------------------------------------------------- products
_PRODUCT_KINDS = {"ms": re.compile(r".*\.ms$"), "image": re.compile(r".*\.image\.fits$"),
                  "pbcor": re.compile(r".*\.pbcor\.fits$"), "png": re.compile(r".*\.png$"),
                  "residual": re.compile(r".*\.residual\.fits$")}


def product_dirs(output: Path) -> dict[str, Path]:
    return {p.name: p for p in output.glob("????-??-??/*") if p.is_dir()}


def duplicate_products(pdir: Path) -> list[str]:
    """Kinds of which a product directory holds more than one visible product."""
    out = []
    names = [p.name for p in pdir.iterdir() if not p.name.startswith(".")]
    for kind, rx in _PRODUCT_KINDS.items():
        hits = [n for n in names if rx.fullmatch(n)]
        if len(hits) > 1:
            out.append(f"{pdir.name}: {len(hits)} {kind} products {sorted(hits)}")
    return out


def half_written(output: Path) -> list[str]:
    """Visible products that are incomplete: temporaries under visible names, truncated
    FITS/PNG/JSON, an MS directory without its table description."""
    bad = []
    for p in output.rglob("*"):
        rel = p.relative_to(output)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden: a temporary by design (cleaned on the next run)
        name = p.name
        if ".partial" in name or name.endswith(".tmp"):
            bad.append(f"temporary under a visible name: {rel}")
        elif name.endswith(".ms") and p.is_dir() and not (p / "table.dat").is_file():
            bad.append(f"MS without table.dat: {rel}")
        elif name.endswith(".fits") and p.is_file():
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(6)
            if size == 0 or size % 2880 or head != b"SIMPLE":
                bad.append(f"truncated FITS ({size} bytes): {rel}")
        elif name.endswith(".png") and p.is_file():
            data = p.read_bytes()
            if not data.startswith(b"\x89PNG\r\n\x1a\n") or b"IEND" not in data[-16:]:
                bad.append(f"truncated PNG: {rel}")
        elif name == "qa.json":
            try:
                json.loads(p.read_text())
            except ValueError:
                bad.append(f"unparsable qa.json: {rel}")
    return bad


# ---------------------------------------------------------------------------- session
class Session:
    """One daemon directory tree: simulate groups aside, drop them in, run, account."""

    def __init__(self, workdir: Path, name: str, input_dir: Path | None = None,
                 **env: str) -> None:
        self.name = name
        self.root = Path(workdir) / name
        if self.root.exists():
            shutil.rmtree(self.root)
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else self.root.parent
        self.tmpfs = shm / f"contimg-faults-{name}-{uuid.uuid4().hex[:8]}"
        self.tmpfs.mkdir(parents=True)
        full_env = {**SESSION_ENV, "CONTIMG_TMPFS_PATH": str(self.tmpfs), **env}
        if input_dir is not None:
            full_env["CONTIMG_INPUT_DIR"] = str(input_dir)
        self.d = Daemon(self.root, **full_env)
        if input_dir is not None:
            input_dir.mkdir(parents=True, exist_ok=True)
            self.d.input = input_dir
        self.hold = self.root / "hold"
        self.truths: dict[str, dict] = {}
        self.mounts: list[Path] = []
        self.started_at: list[float] = []
        self.t0 = time.monotonic()

    # ------------------------------------------------------------ groups
    def simulate(self, start: datetime, faults: dict[int, str] | None = None, seed: int = 0,
                 calibrator: str = "3C286") -> dict:
        """Write one tiny group aside (not yet visible to the daemon); return its truth."""
        return self.simulate_run(start, 1, faults, seed, calibrator)[0]

    def good(self, n: int = 0) -> dict:
        """The n-th of a few standard good groups (not calibrator transits: calibration
        holds them in ``converted``), shared by sessions through the simulation cache."""
        return self.simulate(at(200 + 10 * n), seed=700 + n)

    def simulate_run(self, start: datetime, groups: int, faults: dict[int, str] | None = None,
                     seed: int = 0, calibrator: str = "3C286") -> list[dict]:
        """Consecutive groups of one observation (one set of antenna gains, so a calibration
        solved on the first applies to the next); ``faults`` go into the first. Simulated
        once per process and copied (the machine is shared: simulating costs a second each)."""
        key = (f"{start:%Y%m%dT%H%M%S}-{groups}-{seed}-{calibrator}-"
               + "-".join(f"{k}{v}" for k, v in sorted((faults or {}).items())))
        cached = _sim_cache() / key
        if not (cached / "truths.json").exists():
            from dsa110_contimg.simulate import simulate_groups

            tmp = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            truths = simulate_groups(tmp, preset="tiny", groups=groups, start=start, seed=seed,
                                     calibrator=calibrator, faults=faults or {})
            (tmp / "truths.json").write_text(json.dumps(truths, default=str))
            os.rename(tmp, cached)
        hold = self.hold / key
        shutil.copytree(cached, hold, dirs_exist_ok=True)
        truths = json.loads((cached / "truths.json").read_text())
        for truth in truths:
            truth["hold"] = str(hold)
            self.truths[truth["group_id"]] = truth
        return truths

    def drop(self, gid: str, names: Iterable[str] | None = None) -> list[Path]:
        """Make a group's files appear in the input directory (atomic renames)."""
        truth = self.truths[gid]
        out = []
        for name in (truth["files"] if names is None else names):
            src = Path(truth["hold"]) / name
            dst = self.d.input / name
            if src.exists():
                os.rename(src, dst) if _same_fs(src, dst.parent) else shutil.move(src, dst)
            out.append(dst)
        return out

    # ------------------------------------------------------------ daemon
    @property
    def proc(self) -> subprocess.Popen | None:
        return self.d.proc

    @property
    def runs(self) -> int:
        return self.d.runs

    def alive(self) -> bool:
        return self.d.proc is not None and self.d.proc.poll() is None

    def start(self, *args: str, wait_ready: bool = True, **env: str) -> None:
        try:
            (self.d.state / "api.port").unlink(missing_ok=True)
        except OSError:
            pass  # a read-only state directory is what some sessions test
        self.d.start(*args, **env)
        self.started_at.append(time.monotonic())
        if wait_ready:
            self.wait_event("daemon_ready", 90)

    def wait_event(self, name: str, timeout: float = WAIT_S,
                   pred: Callable[[dict], bool] | None = None, since_run: bool = True) -> dict:
        """Wait until the current run's log holds an event ``name`` (matching ``pred``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in (self.run_events() if since_run else self.events()):
                if e.get("event") == name and (pred is None or pred(e)):
                    return e
            if not self.alive():
                raise AssertionError(f"daemon exited ({self.d.proc.returncode}) waiting for "
                                     f"{name}:\n{self.d.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"no {name} event within {timeout:.0f} s:\n{self.d.log_tail()}")

    def wait(self, pred: Callable[[dict[str, str]], bool], what: str,
             timeout: float = WAIT_S) -> dict[str, str]:
        return self.d.wait_for(pred, timeout, what)

    def wait_states(self, want: dict[str, tuple[str, ...]], timeout: float = WAIT_S,
                    what: str = "", fail_on: tuple[str, ...] = ()) -> dict[str, str]:
        """Wait until every group in ``want`` (simulated ids, resolved to the queue group
        holding their files) is in one of its states; give up at once when one reaches a
        state of ``fail_on`` instead."""
        def pred(st: dict[str, str]) -> bool:
            now = {g: st.get(self.actual(g) or g) for g in want}
            for g, state in now.items():
                if state in fail_on and state not in want[g]:
                    row = self.groups().get(self.actual(g) or g, {})
                    raise AssertionError(f"{g} became {state} waiting for {what}: "
                                         f"{(row.get('last_error') or '')[:500]}")
            return all(now[g] in s for g, s in want.items())
        return self.wait(pred, what or f"states {want}", timeout)

    def actual(self, gid: str) -> str | None:
        """The queue group holding a simulated group's files: its id is the timestamp of the
        first file the daemon saw, which need not be the simulator's (e.g. a duplicate
        subband stamped 2 s later arriving first)."""
        truth = self.truths.get(gid)
        if truth is None or not (self.d.state / "contimg.sqlite").exists():
            return gid
        names = set(truth["files"])
        try:
            with self.db() as con:
                holders = {r["group_id"] for r in con.execute("SELECT group_id, path FROM group_files")
                           if os.path.basename(r["path"]) in names}
        except sqlite3.OperationalError:
            return gid
        if gid in holders or not holders:
            return gid
        return sorted(holders)[0]

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait; the exit code."""
        self.d.terminate()
        return self.d.wait(timeout)

    def kill(self) -> None:
        self.d.kill_all()

    def close(self) -> None:
        """Never leave a daemon, a mount or a tmpfs directory behind."""
        if self.alive():
            try:
                os.killpg(self.d.proc.pid, signal.SIGKILL)
                self.d.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        self.mounts.clear()
        shutil.rmtree(self.tmpfs, ignore_errors=True)

    def mount_tmpfs(self, path: Path, size: str, readonly: bool = False) -> str | None:
        """Mount a small tmpfs at ``path``; None on success, else why it cannot be done."""
        if os.geteuid() != 0:
            return "not root: cannot mount a tmpfs"
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if readonly else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return f"mount -t tmpfs failed: {r.stderr.strip()}"
        self.mounts.append(path)
        return None

    # ------------------------------------------------------------ observations
    def events(self) -> list[dict]:
        return self.d.events()

    def run_events(self) -> list[dict]:
        """Events of the current (latest) run only."""
        return json_events(self.d.log_path)

    def alerts(self) -> list[dict]:
        return [e for e in self.events() if e.get("event") == "alert"]

    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in sorted(self.root.glob("daemon-*.log"))]
        casa_logs = self.d.state / "casa" / "logs"
        if casa_logs.is_dir():
            parts += [p.read_text(errors="replace") for p in casa_logs.rglob("*") if p.is_file()]
        return "\n".join(parts)

    def db(self) -> sqlite3.Connection:
        return self.d.db()

    def groups(self) -> dict[str, dict]:
        if not (self.d.state / "contimg.sqlite").exists():
            return {}
        with self.db() as con:
            rows = con.execute("SELECT * FROM groups").fetchall()
        out = {}
        for r in rows:
            g = dict(r)
            g["flags"] = json.loads(g["flags"] or "{}")
            out[g["id"]] = g
        return out

    def group_files(self) -> list[dict]:
        with self.db() as con:
            return [dict(r) for r in con.execute("SELECT * FROM group_files")]

    def stage_runs(self) -> list[dict]:
        return self.d.stage_runs()

    def catalogue(self) -> list[dict]:
        """Rows of the image catalogue (empty before imaging ever ran)."""
        if not (self.d.state / "contimg.sqlite").exists():
            return []
        with self.db() as con:
            try:
                return [dict(r) for r in con.execute("SELECT * FROM images")]
            except sqlite3.OperationalError:
                return []

    def catalogue_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.catalogue():
            out[r["group_id"]] = out.get(r["group_id"], 0) + 1
        return out

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        import sys

        return subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", *args],
                              env={**self.d.env, **env}, capture_output=True, text=True,
                              timeout=120)

    def status_json(self) -> dict:
        r = self.cli("status", "--json")
        if r.returncode != 0:
            raise AssertionError(f"contimg status --json failed: {r.stderr}")
        return json.loads(r.stdout)

    def api_port(self) -> int:
        return self.d.api_port()

    # ------------------------------------------------------------ accounting
    def account(self, row: Row, expects: list[Expect], *, alert_categories: Iterable[str] = (),
                status: dict | None = None) -> Row:
        """Fill the row's counts from the queue, the products and the log; add problems."""
        groups = self.groups()
        runs = self.stage_runs() if groups else []
        events = self.events()
        alerts = [e for e in events if e.get("event") == "alert"]
        status = status if status is not None else (self.status_json() if groups else {})
        status_groups = {g["id"]: g for g in status.get("groups", [])}
        files = self.group_files() if groups else []
        pdirs = product_dirs(self.d.output)
        images = self.catalogue_counts()
        gids = {x.gid for x in expects}
        row.runs = self.runs
        row.groups_in = len(expects)
        cats = set(alert_categories)
        row.alerts = sum(1 for a in alerts
                         if (a.get("context") or {}).get("group_id") in gids
                         or a.get("category") in cats)
        row.seconds = time.monotonic() - self.t0
        for x in expects:
            if not x.files and x.gid in self.truths:
                x.files = tuple(self.truths[x.gid]["files"])
            x.gid = self.actual(x.gid) or x.gid
        gids = {x.gid for x in expects}
        row.alerts = sum(1 for a in alerts
                         if (a.get("context") or {}).get("group_id") in gids
                         or a.get("category") in cats)
        for x in expects:
            g = groups.get(x.gid)
            if g is None:
                row.lost += 1
                row.problems.append(f"{x.gid}: not in the queue (lost)")
                continue
            state = g["state"]
            reason = g.get("last_error") or g.get("state_reason") or ""
            stopped_ok = state in STOPPED and bool(reason.strip())
            if state in x.goal:
                if x.good:
                    row.groups_done += 1
                else:
                    row.stopped += 1
            elif stopped_ok:
                row.stopped += 1
                row.problems.append(f"{x.gid}: ended {state} ({reason[:160]}); expected "
                                    f"{'/'.join(x.goal)}")
            else:
                row.lost += 1
                row.problems.append(f"{x.gid}: lost in state {state!r} (reason {reason!r}); "
                                    f"expected {'/'.join(x.goal)}")
            if state in STOPPED and not reason.strip():
                row.problems.append(f"{x.gid}: {state} without a reason")
            if x.reason and state in STOPPED:
                self._check_reason(row, x, g, status_groups.get(x.gid), events)
            if x.alerts:
                mine = [a for a in alerts if (a.get("context") or {}).get("group_id") == x.gid
                        and a.get("category") in x.alerts]
                row.check(mine, f"{x.gid}: no alert of category {'/'.join(x.alerts)} names it")
            # duplicates: ok runs per stage, products per kind, queue groups per file set
            oks: dict[str, int] = {}
            for r in runs:
                if r["group_id"] == x.gid and r["outcome"] == "ok":
                    oks[r["stage"]] = oks.get(r["stage"], 0) + 1
            for stage, n in oks.items():
                if n > 1:
                    row.duplicated += 1
                    row.problems.append(f"{x.gid}: {n} 'ok' runs of {stage}")
            n_images = images.get(x.gid, 0)
            if n_images > 1:
                row.duplicated += 1
                row.problems.append(f"{x.gid}: {n_images} rows in the image catalogue")
            if x.gid in pdirs:
                dups = duplicate_products(pdirs[x.gid])
                row.duplicated += len(dups)
                row.problems.extend(dups)
            names = set(x.files)
            holders = {f["group_id"] for f in files if Path(f["path"]).name in names}
            if len(holders) > 1:
                row.duplicated += 1
                row.problems.append(f"{x.gid}: its files are split over queue groups "
                                    f"{sorted(holders)}")
        return row

    def _check_reason(self, row: Row, x: Expect, g: dict, sg: dict | None,
                      events: list[dict]) -> None:
        rx = re.compile(x.reason or "", re.IGNORECASE)
        reason = g.get("last_error") or g.get("state_reason") or ""
        row.check(rx.search(reason), f"{x.gid}: queue reason does not match /{x.reason}/: "
                                     f"{reason[:200]!r}")
        if sg is None:
            row.problems.append(f"{x.gid}: missing from `contimg status --json`")
        else:
            text = f"{sg.get('last_error')} {sg.get('state_reason')}"
            row.check(sg.get("state") == g["state"] and rx.search(text),
                      f"{x.gid}: `contimg status --json` does not show the reason")
        logged = [e for e in events if e.get("event") != "alert"
                  and e.get("level") in ("warning", "error", "critical")
                  and (e.get("group_id") == x.gid or x.gid in json.dumps(e))
                  and rx.search(json.dumps(e))]
        row.check(logged, f"{x.gid}: no warning/error log event gives the reason")

    def unexpected_groups(self, row: Row, known: Iterable[str]) -> None:
        """Any queue group not dropped in on purpose is a duplicate or junk from a bad name."""
        extra = sorted(set(self.groups()) - set(known))
        if extra:
            row.duplicated += len(extra)
            row.problems.append(f"unexpected queue groups {extra}")

    def leftovers(self, row: Row) -> None:
        """Nothing half-written visible; no staging or hidden temporaries left behind."""
        for p in half_written(self.d.output):
            row.problems.append(p)
        stale = [str(p) for root in (self.d.scratch, self.tmpfs)
                 for p in root.glob("contimg-stage-*")]
        row.check(not stale, f"staging left behind: {stale}")


_SIM_CACHE: Path | None = None


def _sim_cache() -> Path:
    global _SIM_CACHE
    if _SIM_CACHE is None:
        import atexit
        import tempfile

        _SIM_CACHE = Path(tempfile.mkdtemp(prefix="contimg-faults-sim-"))
        atexit.register(shutil.rmtree, _SIM_CACHE, True)
    return _SIM_CACHE


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def finish(session: Session, rows: Row | list[Row], expect_rc: int = 0) -> None:
    """Stop a running daemon cleanly; a bad exit code is a problem on every row given."""
    if not session.alive():
        return
    rc = session.stop()
    if rc != expect_rc:
        for r in rows if isinstance(rows, list) else [rows]:
            r.problems.append(f"daemon exited {rc} on SIGTERM (expected {expect_rc}):\n"
                              f"{session.d.log_tail(15)}")


def run_guarded(rows: list[Row], fn: Callable[[], Any], label: str) -> Any:
    """Run one step; an exception becomes a problem on every row instead of a crash."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        msg = f"{label}: {type(exc).__name__}: {str(exc)[:1500]}"
        for r in rows:
            r.problems.append(msg)
        return None


def tracebacks(session: Session) -> list[str]:
    """Unhandled exceptions logged by the daemon (an ``exception`` field, or a raw traceback)."""
    out = []
    for e in session.events():
        if e.get("exception") and e.get("event") not in ("conversion failed unexpectedly",):
            out.append(f"{e.get('event')}: {str(e.get('exception'))[-300:]}")
    for p in sorted(session.root.glob("daemon-*.log")):
        text = p.read_text(errors="replace")
        for block in re.findall(r"^Traceback \(most recent call last\):.*?(?=^\{|\Z)", text,
                                re.M | re.S):
            out.append(block[-400:])
    return out


def requeues(session: Session) -> list[str]:
    """Groups an operator (CLI or API) has requeued, from the state-change log."""
    if not (session.d.state / "contimg.sqlite").exists():
        return []
    with session.db() as con:
        return [r["group_id"] for r in con.execute(
            "SELECT group_id FROM group_events WHERE reason LIKE 'requeued%'")]


def now_utc() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")
