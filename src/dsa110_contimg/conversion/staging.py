"""Staging through tmpfs (or scratch disk): where the MS is built, and the room it needs.

A staging directory is ``<root>/contimg-stage-<stem>-<pid>`` with an ``owner.json`` holding
the pid and its process start time, so :func:`clean_stale_staging` can remove exactly the
directories whose owner is gone (a recycled pid does not fool it) and never one in use.

Leftover publication temporaries (:mod:`.publish`) of dead processes in a product directory
are removed the same way. Copying the inputs into staging is :mod:`.inputcopy`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..errors import DiskFull, StageError, is_no_space

log = structlog.get_logger(__name__)

STAGE_PREFIX = "contimg-stage-"
PARTIAL_MARK = ".partial-"
OWNER_FILE = "owner.json"


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def owner_alive(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` still runs (and, given its start time, is the same process,
    not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if started is None:
        return True
    now = _start_time(pid)
    return now is None or abs(now - started) < 1.0


def _pid_of(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class Staging:
    root: Path  # the staging directory of this conversion
    kind: str  # 'tmpfs' | 'disk'
    reason: str


def free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def choose_staging(input_bytes: int, stage_to_tmpfs: bool, headroom: float,
                   tmpfs_path: Path, scratch_dir: Path, need_bytes: int = 0
                   ) -> tuple[Path, str, str]:
    """(root, kind, reason): tmpfs when enabled and it has ``headroom`` x the input free
    (and at least ``need_bytes``, the inputs plus the estimated MS)."""
    need = max(int(headroom * input_bytes), need_bytes)
    if not stage_to_tmpfs:
        return scratch_dir, "disk", "tmpfs staging disabled (CONTIMG_STAGE_TO_TMPFS)"
    free = free_bytes(tmpfs_path)
    if tmpfs_path.is_dir() and free >= need:
        return tmpfs_path, "tmpfs", f"tmpfs has {free / 1e9:.2f} GB free, needs {need / 1e9:.2f} GB"
    why = (f"{tmpfs_path} does not exist" if not tmpfs_path.is_dir() else
           f"{tmpfs_path} has {free / 1e9:.2f} GB free, needs {need / 1e9:.2f} GB "
           f"({headroom:g} x input)")
    return scratch_dir, "disk", f"staging on scratch disk: {why}"


@contextmanager
def staging_dir(root: Path, stem: str, kind: str, reason: str) -> Iterator[Staging]:
    """Create this process's staging directory; always remove it on exit."""
    d = Path(root) / f"{STAGE_PREFIX}{stem}-{os.getpid()}"
    try:
        if d.exists():  # same pid, earlier attempt in this process
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(),
                                                "started": _start_time(os.getpid()),
                                                "created": time.time()}))
    except OSError as exc:
        raise disk_error(exc, d) from None
    try:
        yield Staging(d, kind, reason)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def clean_stale_staging(scratch_dir: Path, tmpfs_path: Path) -> list[Path]:
    """Remove staging directories left by dead processes (called once at daemon start-up)."""
    removed = []
    for root in (Path(tmpfs_path), Path(scratch_dir)):
        try:
            entries = list(root.iterdir())
        except OSError:
            continue
        for d in entries:
            if not d.name.startswith(STAGE_PREFIX) or not d.is_dir() or d.is_symlink():
                continue
            pid, started = _pid_of(d.name), None
            try:
                owner = json.loads((d / OWNER_FILE).read_text())
                pid, started = int(owner["pid"]), owner.get("started")
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if pid is None or owner_alive(pid, started):
                continue
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
                log.info("removed stale staging directory", path=str(d), pid=pid)
    return removed


def remove_stale_partials(directory: Path) -> list[Path]:
    """Remove half-published temporaries (``.<name>.partial-<pid>``) of dead processes."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        if PARTIAL_MARK not in p.name or not p.name.startswith("."):
            continue
        pid = _pid_of(p.name)
        if pid is None or (pid != os.getpid() and owner_alive(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def disk_error(exc: BaseException, path: Path) -> StageError:
    if is_no_space(exc):
        return DiskFull(f"no space left on device writing {path}")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return StageError(f"cannot write {path}: {reason}")


def require_space(path: Path, need: int, what: str) -> None:
    """StageError before writing when ``path`` cannot hold ``need`` bytes.

    Checked up front because casacore does not fail gracefully on a full disk: a write
    error inside its destructors aborts the whole process (std::terminate).
    """
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = free_bytes(probe)
    if free < need:
        raise DiskFull(f"no space left on device for {what} at {path}: "
                         f"{free / 1e6:.1f} MB free, {need / 1e6:.1f} MB needed")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
