"""Keep the state directory's log files from growing without end.

Every worker process writes a CASA log of its own, ``STATE_DIR/casa/logs/casa-<pid>.log``
(the site config :mod:`dsa110_contimg.casa_env` writes), and appends its raw stderr to the one
``worker-stderr.log`` there (opened ``O_APPEND`` by each worker). Nothing else removes them, so
:func:`prune_state_logs`, run every ``prune_interval_s`` by :func:`state_log_loop`:

- rotates ``worker-stderr.log`` once it exceeds ``stderr_rotate_mb``: ``.N`` is deleted, each
  ``.i`` becomes ``.i+1`` and the live file becomes ``.1``. A worker that has it open keeps
  appending to the renamed file until it exits (workers are short-lived); the next worker
  creates a new ``worker-stderr.log``;
- deletes CASA logs (and rotated stderr logs) older than ``casa_log_max_age_d``, then the
  oldest of them while the directory holds more than ``casa_log_max_mb``. The log of a
  process still running is never deleted, nor the live ``worker-stderr.log``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ..config import StateLogOptions

log = structlog.get_logger(__name__)

STDERR_LOG = "worker-stderr.log"
MB = 1_000_000
_CASA_LOG = re.compile(r"casa-(\d+)\.log")
_ROTATED = re.compile(re.escape(STDERR_LOG) + r"\.(\d+)")


@dataclass
class PruneReport:
    """What one pass changed: files rotated (new names) and removed, bytes freed."""

    rotated: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def rotate_stderr_log(log_dir: Path, max_bytes: int, keep: int, report: PruneReport) -> None:
    """``worker-stderr.log`` -> ``.1`` -> ... -> ``.keep`` (dropped) once over ``max_bytes``."""
    live = Path(log_dir) / STDERR_LOG
    try:
        size = live.stat().st_size
    except FileNotFoundError:
        return
    if size <= max_bytes:
        return
    for old in Path(log_dir).glob(f"{STDERR_LOG}.*"):
        m = _ROTATED.fullmatch(old.name)
        if m and int(m.group(1)) >= keep:
            report.freed_bytes += _unlink(old, report)
    for i in range(keep - 1, 0, -1):
        src = live.with_name(f"{STDERR_LOG}.{i}")
        if src.exists():
            os.replace(src, live.with_name(f"{STDERR_LOG}.{i + 1}"))
    first = live.with_name(f"{STDERR_LOG}.1")
    os.replace(live, first)
    report.rotated.append(first)


def _unlink(path: Path, report: PruneReport) -> int:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    report.removed.append(path)
    return size


def _prunable(path: Path) -> bool:
    """A CASA log of a process that has exited, or a rotated stderr log."""
    m = _CASA_LOG.fullmatch(path.name)
    if m:
        return not _alive(int(m.group(1)))
    return _ROTATED.fullmatch(path.name) is not None


def prune_casa_logs(log_dir: Path, max_age_s: float, max_bytes: int, report: PruneReport,
                    now: float | None = None) -> None:
    """Delete prunable logs older than ``max_age_s`` (0: no limit), then the oldest while the
    directory's files together exceed ``max_bytes`` (0: no limit)."""
    now = time.time() if now is None else now
    files: list[tuple[float, int, Path]] = []
    total = 0
    try:
        entries = list(os.scandir(log_dir))
    except FileNotFoundError:
        return
    for e in entries:
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        total += st.st_size
        path = Path(log_dir) / e.name
        if _prunable(path):
            files.append((st.st_mtime, st.st_size, path))
    files.sort()
    kept = []
    for mtime, size, path in files:
        if max_age_s > 0 and now - mtime > max_age_s:
            freed = _unlink(path, report)
            report.freed_bytes += freed
            total -= freed
        else:
            kept.append((mtime, size, path))
    for _, _, path in kept:
        if max_bytes <= 0 or total <= max_bytes:
            break
        freed = _unlink(path, report)
        report.freed_bytes += freed
        total -= freed


def prune_state_logs(log_dir: Path, options: StateLogOptions,
                     now: float | None = None) -> PruneReport:
    """One pass: rotate ``worker-stderr.log``, then prune; blocking (run it in a thread)."""
    report = PruneReport()
    rotate_stderr_log(log_dir, int(options.stderr_rotate_mb * MB), options.stderr_keep, report)
    prune_casa_logs(log_dir, options.casa_log_max_age_d * 86400.0,
                    int(options.casa_log_max_mb * MB), report, now)
    if report.rotated or report.removed:
        log.info("state_logs_pruned", log_dir=str(log_dir),
                 rotated=[p.name for p in report.rotated],
                 removed=[p.name for p in report.removed], freed_mb=round(report.freed_bytes / MB, 1))
    return report


async def state_log_loop(log_dir: Path, options: StateLogOptions, stop: asyncio.Event) -> None:
    """Prune at once, then every ``prune_interval_s`` until ``stop`` is set; never raises."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(prune_state_logs, log_dir, options)
        except Exception as exc:  # noqa: BLE001 - housekeeping must not stop the daemon
            log.error("state_logs_prune_failed", log_dir=str(log_dir),
                      error=f"{type(exc).__name__}: {exc}")
        try:
            await asyncio.wait_for(stop.wait(), options.prune_interval_s)
        except TimeoutError:
            pass
