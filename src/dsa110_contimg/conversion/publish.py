"""Atomic publication of a staged MS to its product place.

Publication copies the staged MS next to its final place under a hidden temporary name
(same filesystem) and ``os.rename``s it: readers see either no MS or a complete one. Its big
files are written with ``O_DIRECT`` (:func:`copy_file`): from the staged pages straight to
the disk, rather than into as many fresh page-cache pages, which on a VM cost more to fault
in than the copy itself. :class:`EarlyCopy` starts that copy while DATA is still being
filled.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from ..products import fsync_dir, fsync_tree, make_dirs
from .staging import (
    PARTIAL_MARK,
    disk_error,
    is_no_space,
    require_space,
    same_filesystem,
    tree_bytes,
)

log = structlog.get_logger(__name__)

#: files at least this big are published with O_DIRECT: a full group's DATA (2 GB), not its FLAG
#: bits (32 MB), which the MS gate reads next and so should find in the page cache
DIRECT_MIN_BYTES = 64 << 20
DIRECT_CHUNK = 32 << 20  # per write: large enough to keep the disk's queue full
DIRECT_ALIGN = 4096  # offsets and lengths of direct writes (covers 512 B and 4 KiB sectors)
_direct_refused: set[int] = set()  # st_dev of filesystems that refused O_DIRECT (warned once)


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
    make_dirs(final.parent)
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
            fsync_tree(tmp)
        if final.exists():
            aside = final.with_name(f"{final.name}.invalid-{int(time.time())}")
            os.rename(final, aside)
            log.warning("moved an invalid MS aside", path=str(final), to=str(aside))
        os.rename(tmp, final)
        fsync_dir(final.parent)
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
        make_dirs(final.parent)
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
