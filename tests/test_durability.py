"""Durable writes and stamps (products.py), and the FUSE filesystem that loses what was not
fsynced when its power is cut (tests/faults/powercut.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsa110_contimg.products import (
    SEAL_NAME,
    atomic_write,
    fsync_dir,
    make_dirs,
    publish_file,
    seal_mismatch,
    seal_tree,
    stamp,
    stamp_mismatch,
)
from faults.powercut import PowerCutMount, unavailable


def test_stamp_of_a_file_notices_emptying_truncation_and_zeros(tmp_path):
    f = tmp_path / "a.fits"
    f.write_bytes(os.urandom(10_000))
    rec = stamp(f)
    assert rec["size"] == 10_000 and stamp_mismatch(f, rec) is None
    data = f.read_bytes()
    f.write_bytes(data[:5000])
    assert "5000 bytes" in stamp_mismatch(f, rec)
    f.write_bytes(data[:-512] + bytes(512))
    assert "checksum" in stamp_mismatch(f, rec)
    f.unlink()
    assert stamp_mismatch(f, rec) == "missing"
    f.write_bytes(b"")
    assert stamp_mismatch(f, None) is None  # a record without stamps checks existence only


def test_seal_of_a_table_ignores_its_lock_and_notices_a_changed_file(tmp_path):
    table = tmp_path / "g.G"
    (table / "sub").mkdir(parents=True)
    (table / "table.dat").write_bytes(b"x" * 100)
    (table / "sub" / "table.f0").write_bytes(b"y" * 50)
    assert seal_mismatch(table) is None  # not sealed (older tables): existence only
    sealed = seal_tree(table)
    assert sealed["size"] == 150 and json.loads((table / SEAL_NAME).read_text()) == sealed
    (table / "table.lock").write_bytes(b"opened read-only by casacore")
    assert seal_mismatch(table) is None
    (table / "sub" / "table.f0").write_bytes(b"y" * 49 + b"z")
    assert "checksum" in seal_mismatch(table)
    (table / "sub" / "table.f0").rename(table / "sub" / "table.f1")  # same bytes, other name
    assert "checksum" in seal_mismatch(table)
    assert seal_mismatch(tmp_path / "gone.G") == "missing"


def test_make_dirs_and_publish_file(tmp_path):
    d = make_dirs(tmp_path / "2026-01-01" / "2026-01-01T00:00:00")
    assert d.is_dir() and make_dirs(d) == d
    staged = tmp_path / "staged.fits"
    staged.write_bytes(b"abc")
    final = publish_file(staged, d / "image.fits")
    assert final.read_bytes() == b"abc" and not staged.exists()




# ------------------------------------------------------------------ the power-cut filesystem
@pytest.fixture
def powercut(tmp_path):
    why = unavailable()
    if why is not None:
        pytest.skip(f"power-cut filesystem unavailable: {why}")
    with PowerCutMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fs") as m:
        yield m


def _write(path: Path, data: bytes, sync: bool) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())


def test_a_write_not_fsynced_is_lost_at_the_cut(powercut):
    mnt = powercut.mountpoint
    _write(mnt / "kept", b"old", sync=True)
    fsync_dir(mnt)
    powercut.cut()
    assert (mnt / "kept").read_bytes() == b"old"
    _write(mnt / "kept", b"new, never fsynced", sync=False)
    _write(mnt / "fresh", b"named but empty", sync=False)
    fsync_dir(mnt)  # the name is durable, the data is not: an empty file after the cut
    _write(mnt / "nameless", b"data", sync=True)  # data durable, name not
    (mnt / "sub").mkdir()
    _write(mnt / "sub" / "deep", b"x", sync=True)
    fsync_dir(mnt / "sub")  # its entry in the root was never fsynced
    assert (mnt / "kept").read_bytes() == b"new, never fsynced"
    powercut.cut()
    assert sorted(p.name for p in mnt.iterdir()) == ["fresh", "kept"]
    assert (mnt / "kept").read_bytes() == b"old"
    assert (mnt / "fresh").read_bytes() == b""


def test_an_fsynced_write_survives_and_a_rename_needs_the_directory_fsynced(powercut):
    mnt = powercut.mountpoint
    _write(mnt / "product.fits", b"old image", sync=True)
    fsync_dir(mnt)
    _write(mnt / ".staged", b"new image", sync=True)
    os.replace(mnt / ".staged", mnt / "product.fits")
    assert (mnt / "product.fits").read_bytes() == b"new image"
    powercut.cut()  # the rename was not made durable: the old name, the old file
    assert (mnt / "product.fits").read_bytes() == b"old image"
    assert not (mnt / ".staged").exists()
    _write(mnt / ".staged", b"new image", sync=True)
    publish_file(mnt / ".staged", mnt / "product.fits")
    fsync_dir(mnt)
    os.unlink(mnt / "product.fits")  # an unlink not made durable is undone too
    powercut.cut()
    assert (mnt / "product.fits").read_bytes() == b"new image"
    assert [p.name for p in mnt.iterdir()] == ["product.fits"]


def test_durable_helpers_survive_the_cut(powercut):
    mnt = powercut.mountpoint
    d = make_dirs(mnt / "2026-06-01" / "group")
    atomic_write(d / "record.json", "{}")
    table = d / "cal.G"
    (table / "sub").mkdir(parents=True)
    (table / "table.dat").write_bytes(b"t" * 1000)
    (table / "sub" / "table.f0").write_bytes(b"f" * 100)
    seal_tree(table)
    (d / "scratch").write_bytes(b"never fsynced")
    (mnt / "made-by-another").mkdir()  # not synced by whoever made it: make_dirs syncs it
    make_dirs(mnt / "made-by-another")
    powercut.cut()
    assert (mnt / "made-by-another").is_dir()
    assert (d / "record.json").read_text() == "{}"
    assert seal_mismatch(table) is None and (table / "sub" / "table.f0").stat().st_size == 100
    assert not (d / "scratch").exists()
