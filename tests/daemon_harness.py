"""Drive the real daemon as a subprocess (its own session, killed as systemd would: whole group)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST_ENV = {
    "CONTIMG_FILE_STABLE_S": "1",
    "CONTIMG_INGEST_POLL_S": "0.2",
    "CONTIMG_CAL_HOLD_RETRY_S": "3",
    "CONTIMG_BACKOFF_BASE_S": "1",
    "CONTIMG_HEARTBEAT_S": "1",
    "CONTIMG_CLAIM_TIMEOUT_S": "30",
    "CONTIMG_SHUTDOWN_TIMEOUT_S": "60",
    "CONTIMG_MONITOR_INTERVAL_S": "5",
    "CONTIMG_DISK_WARN_GB": "0.5",
    "CONTIMG_DISK_CRIT_GB": "0.1",
    "CONTIMG_API_PORT": "0",
    "CONTIMG_LOG_FORMAT": "json",
}


def json_events(log: Path) -> list[dict]:
    """The JSON event lines of one daemon log (other lines, e.g. CASA's, are skipped)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Daemon:
    # every daemon a test started, so a failing test cannot leave one running (conftest reaps)
    started: list[subprocess.Popen] = []

    @classmethod
    def reap_all(cls) -> int:
        """SIGKILL the process group of every started daemon still alive; how many were."""
        alive = [p for p in cls.started if p.poll() is None]
        for p in alive:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(30)
        cls.started.clear()
        return len(alive)

    def __init__(self, root: Path, **env: str) -> None:
        self.root = Path(root)
        self.input = self.root / "incoming"
        self.output = self.root / "products"
        self.state = self.root / "state"
        self.scratch = self.root / "scratch"
        for d in (self.input, self.output, self.state, self.scratch):
            d.mkdir(parents=True, exist_ok=True)
        # a tmpfs directory of its own (MSs are kept there between stages), gone at exit
        shm = Path("/dev/shm")
        self.tmpfs = Path(tempfile.mkdtemp(prefix="contimg-test-",
                                           dir=shm if shm.is_dir() else self.root))
        atexit.register(shutil.rmtree, self.tmpfs, True)
        self.env = {**os.environ, **FAST_ENV, "CONTIMG_INPUT_DIR": str(self.input),
                    "CONTIMG_OUTPUT_DIR": str(self.output), "CONTIMG_STATE_DIR": str(self.state),
                    "CONTIMG_SCRATCH_DIR": str(self.scratch),
                    "CONTIMG_TMPFS_PATH": str(self.tmpfs), **env}
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.root / f"daemon-{self.runs}.log"

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        self.runs += 1
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "dsa110_contimg.cli", "run", *args],
                                     env={**self.env, **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        Daemon.started.append(self.proc)
        return self.proc

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill_all(self) -> None:
        """SIGKILL the daemon and every process it started (systemd's cgroup kill)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def db(self) -> sqlite3.Connection:
        con = sqlite3.connect(f"file:{self.state / 'contimg.sqlite'}?mode=ro", uri=True, timeout=30)
        con.row_factory = sqlite3.Row
        return con

    def states(self) -> dict[str, str]:
        if not (self.state / "contimg.sqlite").exists():
            return {}
        try:
            with self.db() as con:
                return {r["id"]: r["state"] for r in con.execute("SELECT id, state FROM groups")}
        except sqlite3.OperationalError:
            return {}

    def wait_for(self, predicate, timeout: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.states()
            if predicate(st):
                return st
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}; "
                                     f"log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; states={self.states()}\n{self.log_tail()}")

    def stage_runs(self) -> list[dict]:
        with self.db() as con:
            return [dict(r) for r in con.execute("SELECT * FROM stage_runs ORDER BY id")]

    def events(self) -> list[dict]:
        """Every JSON log event of every run so far, in order."""
        return [e for p in sorted(self.root.glob("daemon-*.log")) for e in json_events(p)]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=120)

    def api_port(self) -> int:
        return int((self.state / "api.port").read_text())
