"""Publishing an MS: big files go to disk with O_DIRECT, byte for byte, with a plain copy
where the filesystem refuses it."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsa110_contimg.conversion import staging

# not a multiple of the direct-write alignment, and more than one direct chunk
BIG = max(staging.DIRECT_MIN_BYTES, staging.DIRECT_CHUNK) + 3 * staging.DIRECT_ALIGN + 123


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
    how = staging.copy_file(src, dst)
    assert dst.read_bytes() == data
    assert (dst.stat().st_mode & 0o777) == 0o640
    assert dst.stat().st_mtime == pytest.approx(src.stat().st_mtime)
    assert how == ("direct" if _takes_direct(tmp_path) else "buffered")
    # small files and direct=False take the plain copy
    small = tmp_path / "table.dat"
    _random_file(small, 5000, 2)
    assert staging.copy_file(small, tmp_path / "small") == "buffered"
    assert staging.copy_file(src, tmp_path / "plain", direct=False) == "buffered"
    assert (tmp_path / "plain").read_bytes() == data


def test_copy_file_falls_back_where_o_direct_is_refused(tmp_path, monkeypatch):
    src, dst = tmp_path / "big", tmp_path / "copy"
    data = _random_file(src, BIG, 3)
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(staging.os, "open", refusing_open)
    assert staging.copy_file(src, dst) == "buffered"
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
        assert staging.publish(staged, final, fsync=True, direct=True) == final
        for rel, data in files.items():
            assert (final / rel).read_bytes() == data, rel
        assert not [p for p in final.parent.iterdir() if staging.PARTIAL_MARK in p.name]
    finally:
        shutil.rmtree(staged, ignore_errors=True)
