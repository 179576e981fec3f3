"""Failure classes: what the daemon does depends on whose fault a failure is.

A corrupt MS is bad input (quarantine), a full disk holds the group without using an attempt
(see test_daemon_parts for the scheduler side), a worker that dies is a failed attempt.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from dsa110_contimg.daemon.tasks import _reading_ms, ms_unreadable
from dsa110_contimg.daemon.worker import call_stage
from dsa110_contimg.errors import BadInputError, DiskFull, StageError, is_no_space


def _read_like_a_stage(ms: Path) -> int:
    """What a stage does first: the antennas, then the visibilities."""
    import casatools

    tb = casatools.table()
    n = 0
    for path, col in ((f"{ms}/ANTENNA", "NAME"), (str(ms), "DATA")):
        tb.open(path)
        try:
            n += len(tb.getcol(col))
        finally:
            tb.close()
    return n


@pytest.fixture()
def ms_copy(tiny_ms, tmp_path) -> Path:
    out = tmp_path / "copy.ms"
    shutil.copytree(tiny_ms, out)
    return out


def test_a_readable_ms_is_not_called_corrupt_and_a_casa_fault_stays_retryable(ms_copy):
    assert ms_unreadable(ms_copy) is None

    def casa_fault():
        raise RuntimeError("SEVERE: some passing CASA trouble")

    with pytest.raises(RuntimeError, match="passing CASA trouble"):
        _reading_ms(ms_copy, casa_fault)

    def stage_fault():
        raise StageError("CASA tclean failed: RuntimeError: some passing trouble")

    with pytest.raises(StageError, match="passing trouble"):
        _reading_ms(ms_copy, stage_fault)


@pytest.mark.parametrize("damage", ["table.dat garbage", "data file truncated",
                                    "ANTENNA subtable gone"])
def test_a_corrupt_ms_is_bad_input_naming_the_ms(ms_copy, damage):
    if damage == "table.dat garbage":
        (ms_copy / "table.dat").write_bytes(b"\x00garbage" * 64)
    elif damage == "data file truncated":
        biggest = max((p for p in ms_copy.glob("table.f*") if p.is_file()),
                      key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 3)
    else:
        shutil.rmtree(ms_copy / "ANTENNA")
    why = ms_unreadable(ms_copy)
    assert why, f"{damage}: not detected"
    def wrapped():  # as casarun.run_task reports a CASA task's failure
        try:
            return _read_like_a_stage(ms_copy)
        except RuntimeError as exc:
            raise StageError(f"CASA task failed: {exc}") from exc

    with pytest.raises(BadInputError) as err:
        _reading_ms(ms_copy, wrapped)
    assert str(ms_copy) in str(err.value) and "corrupt measurement set" in str(err.value)
    assert err.value.path == str(ms_copy)


def _no_space():
    raise OSError(errno.ENOSPC, "No space left on device", "/data/products/x.fits")


def _casa_no_space():
    raise RuntimeError("TableProxy: Error (No space left on device) writing table.f0")


@pytest.mark.parametrize("fn", [_no_space, _casa_no_space])
def test_a_full_disk_anywhere_in_a_stage_is_diskfull(fn):
    with pytest.raises(DiskFull) as err:
        call_stage(fn, (), "2026-06-01T04:46:06")
    assert is_no_space(err.value) and "No space left on device" in str(err.value)


def test_a_table_of_a_combined_set_is_owned_by_the_set_it_came_from():
    from dsa110_contimg.calibration.calset import CalSet, CalTable

    bp, g = CalTable("BP", Path("/c/A.B0"), 0, 1), CalTable("G", Path("/c/B.G0"), 0, 1)
    combined = CalSet("A+B", (bp, g), "24", "3C286", 0.5, 30.0,
                      params={"bp_set": "A", "g_set": "B"})
    assert (combined.owner_of(bp), combined.owner_of(g)) == ("A", "B")
    plain = CalSet("C", (bp, g), "24", "3C286", 0.5, 30.0)
    assert plain.owner_of(bp) == plain.owner_of(g) == "C"
