"""Publishing an MS: big files go to disk with O_DIRECT, byte for byte, with a plain copy
where the filesystem refuses it."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsa110_contimg.conversion import publish, staging

# not a multiple of the direct-write alignment, and more than one direct chunk
BIG = max(publish.DIRECT_MIN_BYTES, publish.DIRECT_CHUNK) + 3 * publish.DIRECT_ALIGN + 123


def _random_file(path: Path, size: int, seed: int) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def _takes_direct(directory: Path) -> bool:
    probe = directory / ".direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def _staging_root(tmp_path: Path) -> Path:
    """A directory on another filesystem than ``tmp_path`` (tmpfs, as in the daemon), so
    publishing copies rather than renames."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or staging.same_filesystem(shm, tmp_path):
        pytest.skip("needs a tmpfs apart from the test's directory")
    return shm


def test_copy_file_writes_big_files_direct_and_identical(tmp_path):
    src, dst = tmp_path / "table.f21_TSM1", tmp_path / "copy"
    data = _random_file(src, BIG, 1)
    src.chmod(0o640)
    how = publish.copy_file(src, dst)
    assert dst.read_bytes() == data
    assert (dst.stat().st_mode & 0o777) == 0o640
    assert dst.stat().st_mtime == pytest.approx(src.stat().st_mtime)
    assert how == ("direct" if _takes_direct(tmp_path) else "buffered")
    # small files and direct=False take the plain copy
    small = tmp_path / "table.dat"
    _random_file(small, 5000, 2)
    assert publish.copy_file(small, tmp_path / "small") == "buffered"
    assert publish.copy_file(src, tmp_path / "plain", direct=False) == "buffered"
    assert (tmp_path / "plain").read_bytes() == data


def test_copy_file_falls_back_where_o_direct_is_refused(tmp_path, monkeypatch):
    src, dst = tmp_path / "big", tmp_path / "copy"
    data = _random_file(src, BIG, 3)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(publish.os, "open", refusing_open)
    assert publish.copy_file(src, dst) == "buffered"
    assert dst.read_bytes() == data


def test_publish_copies_a_staged_tree_atomically(tmp_path):
    root = _staging_root(tmp_path)
    staged = root / f"contimg-test-publish-{os.getpid()}.ms"
    try:
        (staged / "ANTENNA").mkdir(parents=True)
        files = {
            "table.f21_TSM1": _random_file(staged / "table.f21_TSM1", BIG, 4),
            "table.dat": _random_file(staged / "table.dat", 9846, 5),
            "ANTENNA/table.f0": _random_file(staged / "ANTENNA" / "table.f0", 33362, 6),
        }
        final = tmp_path / "products" / "2026-06-01T044410.ms"
        page = publish.DIRECT_ALIGN
        assert publish.publish(staged, final, fsync=True, direct=True,
                               cached={"table.f21_TSM1": [(5 * page, 3 * page)]}) == final
        if _takes_direct(tmp_path):  # the named range, found by its relative path, is cached
            res = _resident(final / "table.f21_TSM1")
            assert res[5:8].all() and not res[9:BIG // page - 1].any()
        for rel, data in files.items():
            assert (final / rel).read_bytes() == data, rel
        assert not [p for p in final.parent.iterdir() if staging.PARTIAL_MARK in p.name]
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _resident(path: Path) -> np.ndarray:
    """Which pages of ``path`` are in the page cache (mincore on a shared mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return np.frombuffer(vec, dtype=np.uint8) & 1 == 1


def test_segments_split_a_file_into_direct_and_cached_pieces():
    a = publish.DIRECT_ALIGN
    # unaligned ranges widen to the alignment, overlapping ones merge, the rest is direct
    assert publish._segments(10 * a, [(a + 5, a), (2 * a + 1, 10), (7 * a, 0)]) == [
        (0, a, True), (a, 3 * a, False), (3 * a, 10 * a, True)]
    assert publish._segments(4 * a, [(3 * a, 5 * a)]) == [(0, 3 * a, True), (3 * a, 4 * a, False)]
    assert publish._segments(4 * a, []) == [(0, 4 * a, True)]


def test_cached_ranges_are_published_through_the_page_cache(tmp_path):
    """What the MS gate reads right after publishing stays in memory; the rest goes direct,
    and the copy is byte for byte, across a chunk boundary too."""
    if not _takes_direct(tmp_path):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    src, dst = tmp_path / "big", tmp_path / "copy"
    data = _random_file(src, BIG, 8)
    page = publish.DIRECT_ALIGN
    chunk = publish.DIRECT_CHUNK // page
    ranges = [(7 * page + 100, 20 * page), ((chunk - 3) * page, 5 * page)]
    assert publish.copy_file(src, dst, cached=ranges) == "direct"
    res = _resident(dst)
    assert res[7:28].all() and res[chunk - 3:chunk + 2].all()  # the widened ranges
    assert not res[30:chunk - 4].any() and not res[chunk + 3:BIG // page - 1].any()  # direct
    assert dst.read_bytes() == data


def test_early_copy_follows_a_file_as_it_fills(tmp_path):
    """A file filled front to back is copied as its bytes become final: the copy starts
    before the fill ends, is byte for byte, keeps its cached ranges in the page cache, and
    becomes the published file; a stopped copy leaves nothing behind."""
    if not _takes_direct(tmp_path):
        pytest.skip("the test directory's filesystem refuses O_DIRECT")
    page = publish.DIRECT_ALIGN
    src = tmp_path / "stage" / "table.f21_TSM1"
    src.parent.mkdir()
    size = BIG
    data = np.random.default_rng(9).integers(0, 256, size, dtype=np.uint8).tobytes()
    src.write_bytes(bytes(size))  # allocated at full size, then filled in place
    final = tmp_path / "out" / "g.ms"
    copy = publish.EarlyCopy.start(src, final, size, [(3 * page + 7, page)])
    assert copy is not None and copy.path.parent == final.parent
    try:
        half = size // 2 + 1001  # unaligned: the copy stops at the alignment below
        with open(src, "r+b") as fh:
            fh.write(data[:half])
        copy.advance(half)
        deadline = time.monotonic() + 30
        while copy.done < half - half % page and time.monotonic() < deadline:
            time.sleep(0.01)
        assert copy.done == half - half % page  # copied while the rest is unwritten
        with open(src, "r+b") as fh:
            fh.seek(half)
            fh.write(data[half:])
        dst = tmp_path / "published"
        assert copy.finish(str(dst)) == "direct"
    finally:
        copy.close()
    assert dst.read_bytes() == data and not copy.path.exists()
    assert _resident(dst)[3:5].all()

    stopped = publish.EarlyCopy.start(src, final, size)
    assert stopped is not None
    stopped.advance(page * 10)
    stopped.close()
    assert not stopped.path.exists()
    assert not [p for p in final.parent.iterdir() if staging.PARTIAL_MARK in p.name]


def test_early_copy_left_by_a_dead_process_is_removed(tmp_path):
    """Its name ends in .partial-<pid>, so the next conversion's clean-up finds it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "g.ms"
    left = final.with_name(f".g.ms.table.f21_TSM1{staging.PARTIAL_MARK}{dead.pid}")
    left.write_bytes(b"x")
    assert staging.remove_stale_partials(tmp_path) == [left]
    assert not left.exists()
