"""The MS QA gate: a good converted MS passes; damaged copies fail with a clear reason.

The gate uses python-casacore, so it (and the damage) runs in a spawned worker process.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dsa110_contimg.qa.ms import check_ms_after_conversion
from dsa110_contimg.qa.options import MSQAThresholds
from dsa110_contimg.qa.result import QAResult


def _damage(src: str, dest: str, kind: str) -> str:
    """Copy the MS and break it in one way (worker side)."""
    from casacore import tables

    shutil.copytree(src, dest)
    with tables.table(dest, readonly=False, ack=False) as t:
        a1, a2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
        data, flag = t.getcol("DATA"), t.getcol("FLAG")
        cross = np.flatnonzero(a1 != a2)
        if kind == "zeros":  # 60 % of the cross-correlations zeroed
            data[cross[: int(0.6 * cross.size)]] = 0
        elif kind == "nan":  # unflagged NaNs in every integration, whichever the gate samples
            for tt in np.unique(t.getcol("TIME")):
                rows = np.flatnonzero((t.getcol("TIME") == tt) & (a1 != a2))
                data[rows[:5], :3] = np.nan
        elif kind == "lost":  # antenna 21 dies after the third (the middle), as converted
            times = t.getcol("TIME")
            gone = ((a1 == 21) | (a2 == 21)) & (times > np.unique(times)[2])
            data[gone] = 0
            flag[gone] = True
        elif kind == "flagged_out":  # antenna 22 flagged upstream for the whole group
            flag[(a1 == 22) | (a2 == 22)] = True
        elif kind == "flags":
            flag[: int(0.95 * flag.shape[0])] = True
        elif kind == "dead":  # all but three antennas dead
            ants = np.unique(np.concatenate([a1, a2]))
            kill = np.isin(a1, ants[3:]) | np.isin(a2, ants[3:])
            data[kill] = 0
        elif kind == "zero_subband":
            data[:, 48:52] = 0
        elif kind == "uvw":
            uvw = t.getcol("UVW")
            uvw[cross[:10]] += 5.0
            t.putcol("UVW", uvw)
        t.putcol("DATA", data)
        t.putcol("FLAG", flag)
    return dest


def _retile(src: str, dest: str) -> str:
    """Copy the MS with DATA and FLAG tiles that split the channels (worker side): a layout
    the gate cannot map, so it reads through casacore."""
    from casacore import tables

    with tables.table(src, ack=False) as t:
        dm = t.getdminfo()
        for v in dm.values():
            if v["NAME"] in ("TiledData", "TiledFlag"):
                v["SPEC"] = {"DEFAULTTILESHAPE": np.int32([2, 16, 64])}
        t.copy(dest, deep=True, valuecopy=True, dminfo=dm).close()
    with tables.table(dest, ack=False) as t:
        assert list(t.getdminfo("DATA")["SPEC"]["DEFAULTTILESHAPE"]) == [2, 16, 64]
    return dest


def _mapped_vs_casacore(path: str, endian: str, tile_chans: int) -> tuple[bool, bool, bool]:
    """Write a small table of known DATA and FLAG in the given byte order and tiling, then
    read it back mapped (worker side): (DATA mapped, equal to casacore; FLAG counts equal)."""
    from casacore import tables

    from dsa110_contimg.qa import ms as qa_ms

    rng = np.random.default_rng(5)
    nrow, nchan = 37, 24
    data = (rng.normal(size=(nrow, nchan, 2)) + 1j * rng.normal(size=(nrow, nchan, 2))
            ).astype(np.complex64)
    data[3, 5, 1] = np.nan
    flag = rng.random((nrow, nchan, 2)) < 0.3
    cols = [tables.makearrcoldesc("DATA", 0j, valuetype="complex", ndim=2,
                                  datamanagertype="TiledShapeStMan", datamanagergroup="TD"),
            tables.makearrcoldesc("FLAG", False, valuetype="boolean", ndim=2,
                                  datamanagertype="TiledShapeStMan", datamanagergroup="TF")]
    for c in cols:
        del c["desc"]["shape"]
    desc = tables.maketabdesc(cols)
    dminfo = tables.makedminfo(desc, {"TD": {"DEFAULTTILESHAPE": np.int32([2, tile_chans, 5])},
                                      "TF": {"DEFAULTTILESHAPE": np.int32([2, tile_chans, 16])}})
    with tables.table(path, desc, nrow=nrow, dminfo=dminfo, endian=endian, ack=False) as t:
        t.putcol("DATA", data)
        t.putcol("FLAG", flag)
    with tables.table(path, ack=False) as t:
        view = qa_ms._mapped_rows(t, "DATA", 9, 20, 3)
        counts = qa_ms._mapped_flag_counts(t)
    mapped = view is not None and counts is not None
    same_data = view is not None and np.array_equal(view, data[9:29, ::3], equal_nan=True)
    same_flags = counts is not None and np.array_equal(counts, flag.reshape(nrow, -1).sum(1))
    return mapped, same_data, same_flags


@pytest.mark.parametrize("endian, tile_chans, mapped", [
    ("little", 24, True), ("big", 24, True), ("little", 8, False)])
def test_mapped_reads_equal_casacore(worker, tmp_path, endian, tile_chans, mapped):
    """Tiles of whole rows are read from the mapped file in either byte order, equal to what
    was written; tiles that split channels are left to casacore."""
    got = worker.submit(_mapped_vs_casacore, str(tmp_path / "t.tab"), endian, tile_chans).result()
    assert got == ((True, True, True) if mapped else (False, False, False))


def test_unmappable_layout_gets_the_same_verdict_through_casacore(worker, tiny_ms, expected,
                                                                 tmp_path):
    mapped = _check(worker, tiny_ms, expected).metrics
    copy = worker.submit(_retile, str(tiny_ms), str(tmp_path / "retiled.ms")).result()
    r = _check(worker, copy, expected)
    assert r.passed, r.failures
    assert r.metrics["data_read"] == "casacore"
    for key in ("flagged_fraction", "zero_fraction", "dead_antennas", "auto_median_amplitude",
                "n_alive_antennas", "nonfinite_fraction", "zero_channels"):
        assert r.metrics[key] == mapped[key], key


def _cached_and_sampled(ms: str, n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(byte ranges the conversion would publish through the page cache, the ranges of the
    tiles holding each row the gate samples), worker side."""
    from casacore import tables

    from dsa110_contimg import mstiles
    from dsa110_contimg.conversion.convert import _sampled_data_ranges
    from dsa110_contimg.qa.ms import _sample_rows

    with tables.table(ms, ack=False) as t:
        tcol = t.getcol("TIME")
        tf = mstiles.tile_file(t, "DATA")
    cached = _sampled_data_ranges(Path(ms), tcol, n)
    assert list(cached) == [tf.path.name]
    rows = np.concatenate(_sample_rows(tcol, n))
    return cached[tf.path.name], sorted({tf.byte_range(int(r), 1) for r in rows})


@pytest.mark.parametrize("n", [1, 3])
def test_conversion_caches_what_the_gate_reads(worker, tiny_ms, n):
    """The ranges cover exactly the tiles of the sampled rows (the tiny MS has one tile)."""
    cached, needed = worker.submit(_cached_and_sampled, str(tiny_ms), n).result()
    assert len(cached) == n

    def covered(ranges):
        return set().union(*(range(o, o + c, 4096) for o, c in ranges))

    assert covered(cached) == covered(needed)


@pytest.fixture(scope="module")
def worker():
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        yield ex


@pytest.fixture(scope="module")
def expected(tiny_group) -> dict:
    """What the truth says the converted tiny group must look like (not the converter's
    own report): the phase centre is the meridian at mid-time at the pointing dec."""
    from dsa110_contimg.simulate.core import _pointing_icrs
    from dsa110_contimg.simulate.sky import pointing_altaz

    _, truth = tiny_group
    az, alt = pointing_altaz(truth["pointing"]["dec_deg"], 37.2339)
    ra, dec = _pointing_icrs(az, alt, truth["mid_jd"])
    n = len(truth["antennas"]["stations"])
    return {"n_antennas": n, "n_baselines": n * (n + 1) // 2, "n_times": len(truth["times_jd"]),
            "n_channels": truth["freq_hz"]["n_channels"], "phase_centre_ra_deg": ra,
            "phase_centre_dec_deg": dec, "pointing_dec_deg": truth["pointing"]["dec_deg"],
            "freq_min_hz": truth["freq_hz"]["min"], "freq_max_hz": truth["freq_hz"]["max"]}


def _check(worker, ms, expected=None, **th) -> QAResult:
    return worker.submit(check_ms_after_conversion, Path(ms), MSQAThresholds(**th),
                         expected).result()


def test_good_ms_passes(worker, tiny_ms, tiny_group, expected):
    _, truth = tiny_group
    r = _check(worker, tiny_ms, expected)
    assert r.passed, r.failures
    passed, metrics = r  # unpacks as (passed, metrics)
    assert passed and r.reason == "passed"
    assert metrics["n_rows"] == metrics["rows_expected"] == 153 * 6
    assert metrics["n_channels"] == 64 and metrics["frequencies_increasing"]
    assert metrics["dead_antennas"] == truth["antennas"]["dead"] == [97]
    assert metrics["n_alive_antennas"] == 16
    assert metrics["zero_fraction_live"] == 0.0 and metrics["nonfinite_fraction"] == 0.0
    assert metrics["uvw_max_error_m"] < 1e-3
    assert metrics["phase_centre_offset_deg"] < 1e-3
    # autocorrelations sit at the SEFD (5800 Jy) times the gain amplitude squared
    assert 0.5 * truth["sefd_jy"] < metrics["auto_array_median"] < 1.5 * truth["sefd_jy"]
    assert metrics["sampled_integrations"] == 1
    assert metrics["data_read"] == "mapped"  # the conversion's tile layout, read without casacore
    assert metrics["flagged_antennas"] == [] and metrics["antennas_flagged_in_some_integrations"] == {}
    assert 0 < r.duration_s < 30
    assert r.as_dict()["gate"] == "ms_after_conversion"


@pytest.mark.parametrize("kind, reason", [
    ("zeros", "exactly zero"),
    ("nan", "NaN/Inf"),
    ("flags", "flagged"),
    ("dead", "antennas carry data"),
    ("uvw", "|UVW| differs"),
])
def test_damaged_ms_fails_with_reason(worker, tiny_ms, expected, tmp_path, kind, reason):
    bad = worker.submit(_damage, str(tiny_ms), str(tmp_path / f"{kind}.ms"), kind).result()
    r = _check(worker, bad, expected)
    assert not r.passed
    assert any(reason in f for f in r.failures), r.failures


@pytest.mark.parametrize("sample_channels, stride", [(0, 1), (16, 4)])
def test_zeroed_subband_warns_but_passes(worker, tiny_ms, expected, tmp_path, sample_channels,
                                        stride):
    """Four zeroed channels (48-51) are seen whole, and at a stride of 4 (one sampled channel,
    standing for four)."""
    bad = worker.submit(_damage, str(tiny_ms), str(tmp_path / "z.ms"), "zero_subband").result()
    r = _check(worker, bad, expected, sample_channels=sample_channels)
    assert r.passed, r.failures
    assert r.metrics["channel_stride"] == stride
    assert r.metrics["zero_channels"] == 4
    assert any("4 channels are zero" in w for w in r.warnings)


def test_antenna_lost_during_the_group_is_seen_in_the_flags(worker, tiny_ms, expected, tmp_path):
    """Only the middle integration's visibilities are read, but FLAG is read for all: an
    antenna the conversion flagged after the middle integration is reported with a count."""
    bad = worker.submit(_damage, str(tiny_ms), str(tmp_path / "l.ms"), "lost").result()
    r = _check(worker, bad, expected)
    assert r.passed, r.failures
    assert r.metrics["antennas_flagged_in_some_integrations"] == {"21": 3}
    assert any("21 (3 of 6)" in w for w in r.warnings), r.warnings
    assert r.metrics["n_alive_antennas"] == 16


def test_antenna_flagged_throughout_is_not_counted_alive(worker, tiny_ms, expected, tmp_path):
    bad = worker.submit(_damage, str(tiny_ms), str(tmp_path / "f.ms"), "flagged_out").result()
    r = _check(worker, bad, expected)
    assert r.passed, r.failures
    assert r.metrics["flagged_antennas"] == [22]
    assert r.metrics["n_alive_antennas"] == 15
    r = _check(worker, bad, expected, min_antennas=16)
    assert not r.passed and any("flagged throughout: [22]" in f for f in r.failures)


def test_expectations_are_enforced(worker, tiny_ms, expected):
    moved = {**expected, "phase_centre_dec_deg": expected["phase_centre_dec_deg"] + 1.0,
             "n_antennas": 18}
    r = _check(worker, tiny_ms, moved)
    assert not r.passed
    assert any("phase centre is 1.0" in f for f in r.failures)
    assert any("n_antennas is 17, expected 18" in f for f in r.failures)


def test_thresholds_come_from_settings(worker, tiny_ms, expected):
    """The dead antenna makes 11.8 % of cross-correlations zero; judged on live antennas
    they are clean, but a strict dead-antenna threshold turns it into a warning."""
    r = _check(worker, tiny_ms, expected, warn_dead_fraction=0.01)
    assert r.passed and any("dead" in w for w in r.warnings)
    assert r.metrics["zero_fraction"] == pytest.approx(16 / 136)


def test_unreadable_ms_fails(worker, tmp_path):
    (tmp_path / "broken.ms").mkdir()
    (tmp_path / "broken.ms" / "table.dat").write_bytes(b"garbage")
    r = _check(worker, tmp_path / "broken.ms")
    assert not r.passed and "cannot read the MS" in r.reason
    r = _check(worker, tmp_path / "nothing.ms")
    assert not r.passed and "not a table" in r.reason
