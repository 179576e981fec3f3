"""Durable writes and stamps (products.py), and the FUSE filesystem that loses what was not
fsynced when its power is cut (tests/faults/powercut.py)."""

from __future__ import annotations

import json
import os

from dsa110_contimg.products import (
    SEAL_NAME,
    make_dirs,
    publish_file,
    seal_mismatch,
    seal_tree,
    stamp,
    stamp_mismatch,
)


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


