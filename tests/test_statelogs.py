"""Pruning of CASA's per-process logs and rotation of worker-stderr.log in the state dir."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from dsa110_contimg.config import StateLogOptions
from dsa110_contimg.daemon.statelogs import (
    MB,
    STDERR_LOG,
    prune_state_logs,
    state_log_loop,
)

DAY = 86400.0


def _dead_pid() -> int:
    """The pid of a process that has exited (reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _log(path: Path, size: int, age_s: float, now: float) -> Path:
    path.write_bytes(b"l" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def test_old_casa_logs_removed_live_ones_kept(tmp_path: Path) -> None:
    now = time.time()
    dead = _dead_pid()
    old = _log(tmp_path / f"casa-{dead}.log", 100, 20 * DAY, now)
    recent = _log(tmp_path / f"casa-{dead + 100000}.log", 100, 1 * DAY, now)
    running = _log(tmp_path / f"casa-{os.getpid()}.log", 100, 30 * DAY, now)
    other = _log(tmp_path / "notes.txt", 100, 30 * DAY, now)
    report = prune_state_logs(tmp_path, StateLogOptions(casa_log_max_age_d=14), now=now)
    assert report.removed == [old] and not old.exists()
    assert recent.exists() and running.exists() and other.exists()
    assert report.freed_bytes == 100


def test_size_budget_removes_oldest_first(tmp_path: Path) -> None:
    now = time.time()
    base = _dead_pid() + 200000  # pids that do not run
    logs = [_log(tmp_path / f"casa-{base + i}.log", MB, (10 - i) * 3600, now) for i in range(10)]
    opts = StateLogOptions(casa_log_max_age_d=0, casa_log_max_mb=4.5)
    report = prune_state_logs(tmp_path, opts, now=now)
    assert report.removed == logs[:6]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in logs[6:])
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 4.5 * MB


def test_worker_stderr_rotated_with_counts(tmp_path: Path) -> None:
    opts = StateLogOptions(stderr_rotate_mb=0.001, stderr_keep=3, casa_log_max_age_d=0,
                           casa_log_max_mb=0)
    live = tmp_path / STDERR_LOG
    # a worker with the file open (O_APPEND) keeps writing into the renamed file
    fd = os.open(live, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, b"a" * 2000)
        report = prune_state_logs(tmp_path, opts)
        assert [p.name for p in report.rotated] == [f"{STDERR_LOG}.1"] and not live.exists()
        os.write(fd, b"b" * 10)
    finally:
        os.close(fd)
    assert (tmp_path / f"{STDERR_LOG}.1").read_bytes() == b"a" * 2000 + b"b" * 10
    small = tmp_path / STDERR_LOG
    small.write_bytes(b"c" * 10)  # under the size: left alone
    assert prune_state_logs(tmp_path, opts).rotated == []
    for ch in b"defg":
        (tmp_path / STDERR_LOG).write_bytes(bytes([ch]) * 2000)
        prune_state_logs(tmp_path, opts)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{STDERR_LOG}.{i}" for i in (1, 2, 3)]  # keep = 3, oldest dropped
    assert [(tmp_path / f"{STDERR_LOG}.{i}").read_bytes()[:1] for i in (1, 2, 3)] == [
        b"g", b"f", b"e"]


def test_rotated_stderr_logs_count_in_the_size_budget(tmp_path: Path) -> None:
    now = time.time()
    _log(tmp_path / f"{STDERR_LOG}.2", MB, 7200, now)
    newer = _log(tmp_path / f"{STDERR_LOG}.1", MB, 3600, now)
    live = _log(tmp_path / STDERR_LOG, MB // 2, 0, now)
    opts = StateLogOptions(casa_log_max_age_d=0, casa_log_max_mb=2.0, stderr_rotate_mb=1.0)
    report = prune_state_logs(tmp_path, opts, now=now)
    assert [p.name for p in report.removed] == [f"{STDERR_LOG}.2"]
    assert newer.exists() and live.exists()


async def test_loop_prunes_at_once_and_stops(tmp_path: Path) -> None:
    old = _log(tmp_path / f"casa-{_dead_pid()}.log", 10, 30 * DAY, time.time())
    stop = asyncio.Event()
    task = asyncio.create_task(state_log_loop(tmp_path, StateLogOptions(), stop))
    deadline = time.monotonic() + 10
    while old.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not old.exists()
    stop.set()
    await asyncio.wait_for(task, 5)
