"""Staging through tmpfs (or scratch disk) and atomic publication of the MS.

A staging directory is ``<root>/contimg-stage-<stem>-<pid>`` with an ``owner.json`` holding
the pid and its process start time, so :func:`clean_stale_staging` can remove exactly the
directories whose owner is gone (a recycled pid does not fool it) and never one in use.

Publication copies the staged MS next to its final place under a hidden temporary name
(same filesystem) and ``os.rename``s it: readers see either no MS or a complete one. Its big
files are written with ``O_DIRECT`` (:func:`copy_file`): from the staged pages straight to
the disk, rather than into as many fresh page-cache pages, which on a VM cost more to fault
in than the copy itself.
Leftover temporaries of dead processes in a product directory are removed the same way.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..errors import StageError

log = structlog.get_logger(__name__)

STAGE_PREFIX = "contimg-stage-"
PARTIAL_MARK = ".partial-"
OWNER_FILE = "owner.json"
#: files at least this big are published with O_DIRECT: a full group's DATA (2 GB), not its FLAG
#: bits (32 MB), which the MS gate reads next and so should find in the page cache
DIRECT_MIN_BYTES = 64 << 20
DIRECT_CHUNK = 32 << 20  # per write: large enough to keep the disk's queue full
DIRECT_ALIGN = 4096  # offsets and lengths of direct writes (covers 512 B and 4 KiB sectors)
_direct_refused: set[int] = set()  # st_dev of filesystems that refused O_DIRECT (warned once)


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


def is_no_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when casacore reports it as a RuntimeError message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def disk_error(exc: BaseException, path: Path) -> StageError:
    if is_no_space(exc):
        return StageError(f"no space left on device writing {path}")
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
        raise StageError(f"no space left on device for {what} at {path}: "
                         f"{free / 1e6:.1f} MB free, {need / 1e6:.1f} MB needed")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def publish(staged: Path, final: Path, fsync: bool = True, direct: bool = True,
            cached: Mapping[str, Sequence[tuple[int, int]]] | None = None,
            early: Mapping[str, EarlyCopy] | None = None) -> Path:
    """Move ``staged`` (a directory) to ``final`` atomically; return ``final``.

    The copy goes to ``.<name>.partial-<pid>`` beside ``final`` then is renamed. An existing
    ``final`` (only ever an invalid one: callers skip valid MSs) is moved aside as
    ``<name>.invalid-<unix time>``, never deleted. ``direct`` and ``cached`` (byte ranges of
    files, by path relative to ``staged``, written through the page cache): see
    :func:`copy_file`. ``early``: files (by relative path) already being copied, see
    :class:`EarlyCopy`.
    """
    final = Path(final)
    early = early or {}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{PARTIAL_MARK}{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        if same_filesystem(staged, final.parent):
            os.rename(staged, tmp)
        else:
            require_space(final.parent, int(tree_bytes(staged) * 1.02) + (1 << 20),
                          "publishing the MS")
            def copy(src: str, dst: str) -> str:
                rel = os.path.relpath(src, staged)
                if rel in early:
                    return early[rel].finish(dst)
                return copy_file(src, dst, direct=direct, cached=(cached or {}).get(rel, ()))

            shutil.copytree(staged, tmp, copy_function=copy)
        if fsync:
            _fsync_tree(tmp)
        if final.exists():
            aside = final.with_name(f"{final.name}.invalid-{int(time.time())}")
            os.rename(final, aside)
            log.warning("moved an invalid MS aside", path=str(final), to=str(aside))
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise disk_error(exc, final) from None
        raise
    return final


def copy_file(src: str | Path, dst: str | Path, direct: bool = True,
              cached: Sequence[tuple[int, int]] = ()) -> str:
    """Copy one file with its mode and times; return how: ``"direct"`` or ``"buffered"``.

    Files of at least :data:`DIRECT_MIN_BYTES` are written with ``O_DIRECT`` from a mapping
    of the source. A buffered copy of a full group's 2 GB DATA file took 8.5 s with its
    fsync on the bench VM, almost all of it faulting in fresh page-cache pages; the direct
    copy took 0.9 s. The MS then is not in the page cache: the next stage reads it from disk,
    except the ``cached`` (offset, length) ranges, which are written buffered because the
    MS gate reads them at once (85 MB of a full group).
    A filesystem that refuses ``O_DIRECT`` gets the buffered copy (with one warning).
    """
    src, dst = str(src), str(dst)
    size = os.path.getsize(src)
    done = (_write_direct(src, dst, size, cached) if direct and size >= DIRECT_MIN_BYTES
            else None)
    if done is None:
        shutil.copyfile(src, dst)
    elif done < size:  # the unaligned tail (or the rest after a short write)
        _copy_rest(src, dst, done)
    shutil.copystat(src, dst)
    return "buffered" if done is None else "direct"


def _copy_rest(src: str | Path, dst: str | Path, done: int) -> None:
    """Bytes from ``done`` on, buffered, into the existing ``dst``."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        fin.seek(done)
        fout.seek(done)
        shutil.copyfileobj(fin, fout, DIRECT_CHUNK)


def _write_chunk(fin: Any, fd: int, at: int, length: int) -> int:
    """Bytes ``at`` … ``at + length - 1`` of ``fin`` to the same offset of ``fd``; the count
    written. One chunk is mapped at a time: mapping the whole file would count its staged
    pages (2 GB) in this process's RSS."""
    with mmap.mmap(fin.fileno(), length, prot=mmap.PROT_READ, offset=at) as m, \
            memoryview(m) as view:
        return os.pwrite(fd, view, at)


def _segments(size: int, cached: Sequence[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """[start, end) pieces of ``size`` aligned bytes, in order, each direct or not: the
    ``cached`` ranges widened to the alignment and merged, the rest direct."""
    spans = sorted((max(0, o - o % DIRECT_ALIGN), min(size, -(-(o + n) // DIRECT_ALIGN) * DIRECT_ALIGN))
                   for o, n in cached if n > 0)
    out: list[tuple[int, int, bool]] = []
    at = 0
    for lo, hi in spans:
        lo = max(lo, at)
        if hi <= lo:
            continue
        if lo > at:
            out.append((at, lo, True))
        out.append((lo, hi, False))
        at = hi
    if at < size:
        out.append((at, size, True))
    return out


def _write_direct(src: str, dst: str, size: int,
                  cached: Sequence[tuple[int, int]] = ()) -> int | None:
    """Write the aligned part of ``src`` to ``dst`` with O_DIRECT, the ``cached`` ranges
    buffered; return the bytes written from the start, or None (nothing written) when the
    target filesystem does not take O_DIRECT."""
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _refused(dst, exc)
        return None
    done = 0
    buffered = -1
    try:
        with open(src, "rb") as fin:
            for _start, end, direct in _segments(size - size % DIRECT_ALIGN, cached):
                if not direct and buffered < 0:
                    buffered = os.open(dst, os.O_WRONLY)
                fd = out if direct else buffered
                while done < end:
                    n = _write_chunk(fin, fd, done, min(DIRECT_CHUNK, end - done))
                    done += n
                    if n <= 0 or n % DIRECT_ALIGN:
                        return done  # a short, unaligned write: the caller finishes buffered
    except OSError as exc:
        if exc.errno != errno.EINVAL or done:
            raise
        _refused(dst, exc)  # opened, but the first write was refused (alignment)
        return None
    finally:
        os.close(out)
        if buffered >= 0:
            os.close(buffered)
    return done


class EarlyCopy:
    """Publishes one big file of a staged MS while the conversion is still filling it.

    The fill writes the file front to back; :meth:`advance` says how far its bytes are final
    and a thread writes them (``O_DIRECT``, the ``cached`` ranges buffered, as
    :func:`copy_file`) to ``.<MS name>.<file>.partial-<pid>`` beside the final MS, so the disk
    works while the cores fill. :func:`publish` then takes the file over with
    :meth:`finish` (the rest, then a rename into its copy of the MS) instead of copying it.
    A failure other than a full disk falls back to a plain :func:`copy_file` at
    :meth:`finish`. Start with :meth:`start`; always :meth:`close`.
    """

    def __init__(self, src: Path, path: Path, size: int, fd: int,
                 cached: Sequence[tuple[int, int]]) -> None:
        self.src, self.path, self.size, self._fd = Path(src), path, size, fd
        self._pieces = _segments(size - size % DIRECT_ALIGN, cached)
        self._buffered = os.open(self.path, os.O_WRONLY) if any(
            not d for _, _, d in self._pieces) else -1
        self._cond = threading.Condition()
        self._ready = 0
        self._stop = False
        self.done = 0  # bytes written from the start
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="contimg-publish-early",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, src: Path, final: Path, size: int,
              cached: Sequence[tuple[int, int]] = ()) -> EarlyCopy | None:
        """None when the target filesystem refuses ``O_DIRECT`` (publish copies it then)."""
        path = _early_path(final, Path(src).name)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return None
        return cls(src, path, size, fd, cached)

    def advance(self, final_bytes: int) -> None:
        """Bytes ``0 … final_bytes - 1`` of the source will not change any more."""
        with self._cond:
            self._ready = max(self._ready, min(final_bytes, self.size))
            self._cond.notify()

    def _wait_ready(self, at: int) -> int:
        """How far the copy may go from ``at`` (aligned unless the source is final); ``at``
        when stopped."""
        with self._cond:
            while not self._stop:
                ready = (self._ready if self._ready >= self.size
                         else self._ready - self._ready % DIRECT_ALIGN)
                if ready > at:
                    return ready
                self._cond.wait()
            return at

    def _run(self) -> None:
        try:
            with open(self.src, "rb") as fin:
                for start, end, direct in self._pieces:
                    at = start
                    while at < end:
                        limit = min(end, self._wait_ready(at))
                        if limit <= at:
                            return  # stopped
                        length = min(DIRECT_CHUNK, limit - at)
                        n = _write_chunk(fin, self._fd if direct else self._buffered, at,
                                         length)
                        if n != length:
                            raise OSError(errno.EIO, f"short write of {self.path}")
                        at += n
                        self.done = at
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def _join(self) -> None:
        self._thread.join()
        for fd in (self._fd, self._buffered):
            if fd >= 0:
                os.close(fd)
        self._fd = self._buffered = -1

    def finish(self, dst: str) -> str:
        """Complete the copy once the source is final and move it to ``dst``."""
        self.advance(self.size)
        self._join()
        if self.error is not None:
            if is_no_space(self.error):
                raise self.error
            log.warning("early publish failed; copying the file again", path=str(self.src),
                        error=f"{type(self.error).__name__}: {self.error}")
            Path(self.path).unlink(missing_ok=True)
            return copy_file(self.src, dst)
        if self.done < self.size:  # the unaligned tail
            _copy_rest(self.src, self.path, self.done)
        shutil.copystat(self.src, self.path)
        os.rename(self.path, dst)
        return "direct"

    def close(self) -> None:
        """Stop (if :meth:`finish` did not run) and remove the partial copy."""
        if self._thread.is_alive() or self._fd >= 0:
            with self._cond:
                self._stop = True
                self._cond.notify()
            self._join()
        Path(self.path).unlink(missing_ok=True)


def _early_path(final: Path, name: str) -> Path:
    # ".partial-<pid>" last: remove_stale_partials clears it after a crash
    return final.with_name(f".{final.name}.{name}{PARTIAL_MARK}{os.getpid()}")


def _refused(path: str, exc: OSError) -> None:
    dev = os.stat(os.path.dirname(path) or ".").st_dev
    if dev not in _direct_refused:
        _direct_refused.add(dev)
        log.warning("filesystem refuses O_DIRECT: publishing with buffered copies",
                    path=path, reason=exc.strerror)


def _fsync_tree(root: Path) -> None:
    """Data on disk before the rename makes it visible (a crash must not publish holes)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage_inputs(files: list[Path], dest: Path) -> list[Path]:
    """Copy the subband files into the staging directory (kernel-side copy)."""
    out = []
    for f in files:
        target = dest / f.name
        try:
            shutil.copyfile(f, target)
        except OSError as exc:
            if is_no_space(exc):
                raise disk_error(exc, target) from None
            raise
        out.append(target)
    return out


class InputCopier:
    """:func:`stage_inputs` in a background thread; :meth:`wait` returns the copies or
    re-raises the copy's error (always wait before removing the staging directory)."""

    def __init__(self, files: list[Path], dest: Path) -> None:
        self._files, self._dest = files, dest
        self._result: list[Path] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="contimg-stage-inputs",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = stage_inputs(self._files, self._dest)
        except BaseException as exc:
            self._error = exc

    def join(self) -> None:
        """Wait for the copy to stop, ignoring its outcome (we are failing anyway)."""
        self._thread.join()

    def wait(self) -> list[Path]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
