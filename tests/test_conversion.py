"""Conversion stage: simulated UVH5 groups → Measurement Sets, checked against the truth.

Everything that touches python-casacore runs in a spawned worker process (as in the
daemon), so this test process stays free for casatools.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import group_files
from dsa110_contimg.conversion.convert import ConversionInputs, read_completion
from dsa110_contimg.conversion.options import ConversionOptions
from dsa110_contimg.conversion.staging import STAGE_PREFIX, clean_stale_staging
from dsa110_contimg.conversion.storage import ms_path_for
from dsa110_contimg.conversion.validate import validate_group
from dsa110_contimg.errors import BadInputError

C = 299_792_458.0


# ----------------------------------------------------------------- worker-side helpers


def _convert(inputs: ConversionInputs, options: ConversionOptions,
             block_bytes: int | None = None) -> dict:
    """Run convert_group in the worker; return the result or the error as plain data."""
    from dsa110_contimg.conversion import convert, msfill

    default = msfill.BLOCK_BYTES
    msfill.BLOCK_BYTES = block_bytes or default
    try:
        r = convert.convert_group(inputs, options)
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc),
                "path": getattr(exc, "path", None)}
    finally:
        msfill.BLOCK_BYTES = default
    return {"ok": True, "result": r}


def _inspect(ms: str) -> dict:
    from casacore import tables

    out: dict = {}
    with tables.table(ms, ack=False) as t:
        out["nrows"] = t.nrows()
        for c in ("ANTENNA1", "ANTENNA2", "UVW", "TIME", "DATA", "FLAG", "WEIGHT"):
            out[c] = t.getcol(c)
        out["colnames"] = t.colnames()
        out["record"] = dict(t.getkeyword("contimg_conversion"))
    with tables.table(ms + "::SPECTRAL_WINDOW", ack=False) as t:
        out["CHAN_FREQ"] = t.getcol("CHAN_FREQ")
        out["CHAN_WIDTH"] = t.getcol("CHAN_WIDTH")
    with tables.table(ms + "::FIELD", ack=False) as t:
        out["PHASE_DIR"] = t.getcol("PHASE_DIR")
    with tables.table(ms + "::ANTENNA", ack=False) as t:
        out["ANT_NAME"] = list(t.getcol("NAME"))
        out["ANT_FLAG_ROW"] = t.getcol("FLAG_ROW")
    with tables.table(ms + "::HISTORY", ack=False) as t:
        out["HISTORY"] = list(t.getcol("MESSAGE"))
    return out


def _reference_compare(files: list[str], ms: str, tmp: str) -> dict:
    """The plain pyuvdata chain (read, phase, write_ms) to the same centre, compared."""
    from casacore import tables
    from pyuvdata import UVData

    with tables.table(ms + "::FIELD", ack=False) as t:
        ra, dec = t.getcol("PHASE_DIR")[0, 0]
        name = t.getcol("NAME")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uv = UVData()
        uv.read(files, file_type="uvh5", run_check_acceptability=False)
        uv.reorder_freqs(channel_order="freq")
        uv.phase(lon=ra, lat=dec, epoch="J2000", phase_frame="icrs", cat_name=name)
        ref = os.path.join(tmp, "reference.ms")
        uv.write_ms(ref, run_check=False)
    diffs = {}
    with tables.table(ms, ack=False) as a, tables.table(ref, ack=False) as b:
        for c in ("DATA", "UVW", "WEIGHT", "SIGMA", "TIME", "INTERVAL"):
            x, y = a.getcol(c), b.getcol(c)
            diffs[c] = (float(np.max(np.abs(x - y))), float(np.max(np.abs(y))))
        for c in ("ANTENNA1", "ANTENNA2", "FIELD_ID", "SCAN_NUMBER", "DATA_DESC_ID"):
            diffs[c] = bool(np.array_equal(a.getcol(c), b.getcol(c)))
        # ours also flags exact zeros (dead inputs); write_ms leaves them unflagged
        diffs["FLAG"] = bool(np.array_equal(a.getcol("FLAG"),
                                            b.getcol("FLAG") | (b.getcol("DATA") == 0)))
    for sub, cols in (("SPECTRAL_WINDOW", ("CHAN_FREQ", "REF_FREQUENCY")),
                      ("FIELD", ("PHASE_DIR",)), ("POLARIZATION", ("CORR_TYPE",))):
        with tables.table(f"{ms}::{sub}", ack=False) as a, tables.table(f"{ref}::{sub}", ack=False) as b:
            for c in cols:
                diffs[f"{sub}.{c}"] = bool(np.allclose(a.getcol(c), b.getcol(c), rtol=1e-12))
    return diffs


def _quirky_copy(src_files: list[str], dest: str, mode: str) -> None:
    """Rewrite a group with the real-file quirks of design.md (worker side: pyuvdata)."""
    from pyuvdata import UVData

    os.makedirs(dest, exist_ok=True)
    for f in src_files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uv = UVData()
            uv.read(f, file_type="uvh5", run_check_acceptability=False)
            if mode == "unprojected":
                uv.select(ant_str="cross")  # no autocorrelations
                uv.reorder_blts(order="baseline", minor_order="time")  # baseline-major
                uv.reorder_freqs(channel_order="freq")  # ascending channels
                flip = np.flatnonzero(uv.ant_1_array == 20)
                uv.conjugate_bls(convention=flip)  # some rows stored ant1 > ant2
                uv.uvw_array = uv.uvw_array + 30.0  # UVW off by tens of metres
            elif mode == "phased":
                uv.phase(lon=np.radians(203.5), lat=np.radians(31.5), epoch="J2000",
                         phase_frame="icrs", cat_name="OTHER")
            uv.write_uvh5(os.path.join(dest, os.path.basename(f)), run_check=False)


def _keyed(d: dict) -> dict:
    t = np.round((d["TIME"] - d["TIME"].min()) * 1000).astype(np.int64)
    return {(int(tt), int(a), int(b)): i for i, (tt, a, b) in
            enumerate(zip(t, d["ANTENNA1"], d["ANTENNA2"], strict=True))}


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def worker():
    """One spawned worker process shared by this module (imports paid once)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        yield ex


def _inputs(files, out: Path, group_id: str, tmpfs: Path | None = None,
            scratch: Path | None = None, output: Path | None = None) -> ConversionInputs:
    return ConversionInputs(group_id=group_id, files=tuple(files),
                            output_dir=output or out / "products",
                            scratch_dir=scratch or out / "scratch",
                            tmpfs_path=tmpfs or out / "tmpfs")


def _run(worker, inputs, block_bytes: int | None = None, **opts) -> dict:
    """``block_bytes``: fill blocks of about this size (1: one integration each)."""
    return worker.submit(_convert, inputs, ConversionOptions(**{"publish_fsync": False, **opts}),
                         block_bytes).result()


@pytest.fixture
def shm_dir():
    """A directory of its own in the real tmpfs (work-area renames need one filesystem)."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm tmpfs")
    d = Path(tempfile.mkdtemp(prefix="contimg-test-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_inspected(worker, tiny_ms) -> dict:
    return worker.submit(_inspect, str(tiny_ms)).result()


# --------------------------------------------------------------------------- tests


def test_tiny_ms_shape_frequencies_and_uvw_match_truth(tiny_inspected, tiny_group):
    _, truth = tiny_group
    d = tiny_inspected
    stations = truth["antennas"]["stations"]
    nbl = len(stations) * (len(stations) + 1) // 2
    ntimes = len(truth["times_jd"])
    assert d["nrows"] == nbl * ntimes
    assert np.all(np.diff(d["TIME"]) >= 0), "rows ordered by time"
    assert d["DATA"].shape == (nbl * ntimes, 64, 2)
    f = d["CHAN_FREQ"][0]
    assert f.size == truth["freq_hz"]["n_channels"] == 64
    assert np.all(np.diff(f) > 0)
    assert f[0] == pytest.approx(truth["freq_hz"]["min"], abs=1.0)
    assert f[-1] == pytest.approx(truth["freq_hz"]["max"], abs=1.0)
    assert np.allclose(np.diff(f), np.diff(f)[0]) and np.all(d["CHAN_WIDTH"][0] > 0)
    assert np.all(d["ANTENNA1"] <= d["ANTENNA2"])
    enu = {s: np.array(e) for s, e in zip(stations, truth["antennas"]["enu_m"], strict=True)}
    sep = np.array([np.linalg.norm(enu[b] - enu[a])
                    for a, b in zip(d["ANTENNA1"], d["ANTENNA2"], strict=True)])
    assert np.max(np.abs(np.linalg.norm(d["UVW"], axis=1) - sep)) < 1e-3
    # antenna rows are indexed by antenna number; the names are the station numbers
    assert all(d["ANT_NAME"][s] == str(s) for s in stations)
    assert d["ANT_FLAG_ROW"][0] and not d["ANT_FLAG_ROW"][stations[0]]
    assert any("channels descend" in m for m in d["HISTORY"])
    assert d["record"]["n_rows"] == d["nrows"]
    # the dead station's all-zero baselines are flagged here (calibration skips its clip)
    dead = truth["antennas"]["dead"]
    rows = np.isin(d["ANTENNA1"], dead) | np.isin(d["ANTENNA2"], dead)
    assert rows.any() and np.all(d["DATA"][rows] == 0) and d["FLAG"][rows].all()
    assert not (d["DATA"][~d["FLAG"]] == 0).any()
    assert bool(d["record"]["zeros_flagged"])
    assert any("exactly zero (dead inputs): flagged" in m for m in d["HISTORY"])


def test_tiny_ms_phase_centre_is_meridian_at_mid_time(tiny_inspected, tiny_group):
    from dsa110_contimg.simulate.core import _pointing_icrs
    from dsa110_contimg.simulate.sky import pointing_altaz

    _, truth = tiny_group
    az, alt = pointing_altaz(truth["pointing"]["dec_deg"], 37.2339)
    ra0, dec0 = _pointing_icrs(az, alt, truth["mid_jd"])
    ra, dec = np.degrees(tiny_inspected["PHASE_DIR"][0, 0])
    assert ra % 360 == pytest.approx(ra0, abs=1e-4)
    assert dec == pytest.approx(dec0, abs=1e-4)


def test_tiny_ms_visibilities_match_the_true_sky(tiny_inspected, tiny_group):
    """conj(DATA) (pyuvdata convention) on short baselines equals the injected sky:
    gains x sum of sources (flux, spectral index, primary beam) phased to the field centre."""
    from dsa110_contimg.simulate.core import BAND_CENTRE_HZ, BAND_WIDTH_HZ, _altaz
    from dsa110_contimg.simulate.gains import evaluate_gains
    from dsa110_contimg.simulate.sky import airy_power, enu_unit, pointing_altaz

    _, truth = tiny_group
    d = tiny_inspected
    f = d["CHAN_FREQ"][0]
    times_s = np.unique(d["TIME"])
    tjd = times_s / 86400.0 + 2400000.5
    ti = np.searchsorted(times_s, d["TIME"])
    ra0, dec0 = d["PHASE_DIR"][0, 0]
    az_p, alt_p = pointing_altaz(truth["pointing"]["dec_deg"], 37.2339)
    p_hat = enu_unit(np.array(az_p), np.array(alt_p))
    uvw = -d["UVW"]  # pyuvdata's convention (ant2 - ant1)
    dead = set(truth["antennas"]["dead"])
    a1, a2 = d["ANTENNA1"], d["ANTENNA2"]
    keep = (a1 != a2) & ~np.isin(a1, list(dead)) & ~np.isin(a2, list(dead))
    keep &= np.linalg.norm(uvw, axis=1) < 100.0
    assert keep.sum() > 100
    src = truth["sources"]
    ra = np.radians([s["ra_deg"] for s in src])
    dec = np.radians([s["dec_deg"] for s in src])
    az, alt = _altaz(np.degrees(ra), np.degrees(dec), tjd)
    theta = np.arccos(np.clip(enu_unit(az, alt) @ p_hat, -1, 1))  # (nsrc, nt)
    model = np.zeros((int(keep.sum()), f.size), dtype=complex)
    u, v, w = uvw[keep].T
    for k, s in enumerate(src):
        l_ = np.cos(dec[k]) * np.sin(ra[k] - ra0)
        m_ = np.sin(dec[k]) * np.cos(dec0) - np.cos(dec[k]) * np.sin(dec0) * np.cos(ra[k] - ra0)
        n_ = np.sqrt(1 - l_**2 - m_**2)
        spec = s["flux_jy"] * (f / s["ref_freq_hz"]) ** s["spectral_index"]
        pb = airy_power(theta[k][ti[keep]][:, None], f[None, :])
        phase = 2j * np.pi * (u * l_ + v * m_ + w * (n_ - 1))[:, None] * f[None, :] / C
        model += spec[None, :] * pb * np.exp(phase)
    g = evaluate_gains(truth["gains"], f, tjd, BAND_CENTRE_HZ, BAND_WIDTH_HZ, truth["mid_jd"])
    idx = {st: i for i, st in enumerate(truth["gains"]["stations"])}
    i1 = np.array([idx[x] for x in a1[keep]])
    i2 = np.array([idx[x] for x in a2[keep]])
    tk = ti[keep]
    for pol in range(2):
        expect = g[i1, tk, :, pol] * np.conj(g[i2, tk, :, pol]) * model
        got = np.conj(d["DATA"][keep][:, :, pol])
        ratio = np.sum(got * np.conj(expect)) / np.sum(np.abs(expect) ** 2)
        assert abs(ratio - 1) < 0.02, ratio
        resid = got - expect
        assert np.std(resid) < 1.5 * truth["noise_sigma_jy"] * np.sqrt(2)
    # the calibrator dominates: the mean gain-corrected amplitude is its apparent flux (the
    # other, much fainter sources add with varying phases and average out)
    cal = next(s for s in src if s["name"] == "3C286")
    corrected = np.conj(d["DATA"][keep][:, :, 0]) / (g[i1, tk, :, 0] * np.conj(g[i2, tk, :, 0]))
    assert np.abs(corrected).mean() == pytest.approx(cal["apparent_flux_jy"], rel=0.03)


def test_same_ms_as_the_plain_pyuvdata_chain(worker, tiny_ms, tiny_group, tmp_path):
    root, truth = tiny_group
    files = [str(p) for p in group_files(root, truth)]
    diffs = worker.submit(_reference_compare, files, str(tiny_ms), str(tmp_path)).result()
    err, peak = diffs.pop("DATA")
    assert err < 1e-5 * peak
    for c in ("UVW", "WEIGHT", "SIGMA", "TIME", "INTERVAL"):
        assert diffs.pop(c)[0] < 1e-6, c
    assert all(diffs.values()), diffs


def test_quirky_inputs_give_the_same_visibilities(worker, tiny_group, tiny_inspected, tmp_path):
    """Baseline-major rows, no autos, ant1>ant2 rows, ascending channels, UVW off by 30 m,
    and already-phased input all convert to the same MS visibilities."""
    root, truth = tiny_group
    files = [str(p) for p in group_files(root, truth)]
    ref = tiny_inspected
    ref_key = _keyed(ref)
    for mode, expect_notes in (("unprojected", ("no autocorrelations", "conjugated",
                                                "disagree with antenna positions by up to 3")),
                               ("phased", ("already phased",))):
        src = tmp_path / mode
        worker.submit(_quirky_copy, files, str(src), mode).result()
        out = tmp_path / f"out-{mode}"
        res = _run(worker, _inputs(sorted(src.glob("*.hdf5")), out, truth["group_id"]))
        assert res["ok"], res
        r = res["result"]
        notes = " | ".join(r.notes)
        for text in expect_notes:
            assert text in notes, (mode, notes)
        assert ("descend" in notes) == (mode == "phased")
        d = worker.submit(_inspect, str(r.ms_path)).result()
        assert np.allclose(d["PHASE_DIR"], ref["PHASE_DIR"], atol=1e-12)
        key = _keyed(d)
        common = [k for k in key if k in ref_key]
        assert len(common) == len(key) == (ref["nrows"] if mode == "phased" else
                                           ref["nrows"] - 17 * 6)
        ia = np.array([key[k] for k in common])
        ib = np.array([ref_key[k] for k in common])
        scale = np.abs(ref["DATA"]).max()
        assert np.max(np.abs(d["DATA"][ia] - ref["DATA"][ib])) < 2e-5 * scale, mode
        assert np.max(np.abs(d["UVW"][ia] - ref["UVW"][ib])) < 1e-6


def test_rerun_is_skipped_and_disk_fallback_is_reported(worker, tiny_group, tmp_path):
    root, truth = tiny_group
    inputs = _inputs(group_files(root, truth), tmp_path, truth["group_id"])
    first = _run(worker, inputs, tmpfs_headroom=1e9)  # tmpfs "too small": scratch disk
    assert first["ok"], first
    r = first["result"]
    assert r.staged_on == "disk" and not r.skipped
    assert any("staging on scratch disk" in n for n in r.notes)
    assert r.ms_path == ms_path_for(tmp_path / "products", truth["group_id"])
    assert r.ms_path.name == truth["group_id"].replace(":", "") + ".ms"
    mtimes = {p: p.stat().st_mtime_ns for p in r.ms_path.rglob("*") if p.is_file()}
    again = _run(worker, inputs)
    assert again["ok"] and again["result"].skipped
    a = again["result"]
    assert (a.n_channels, a.n_times, a.n_baselines, a.staged_on) == (64, 6, 153, "disk")
    assert {p: p.stat().st_mtime_ns for p in r.ms_path.rglob("*") if p.is_file()} == mtimes
    assert list(r.ms_path.parent.iterdir()) == [r.ms_path]
    assert not any((tmp_path / "scratch").glob(STAGE_PREFIX + "*"))


def test_ms_is_kept_in_the_work_area_while_memory_allows(worker, tiny_group, tmp_path, shm_dir):
    """With a tmpfs work area the MS is renamed there (no copy to disk); a rerun finds it;
    archive_ms later moves it, with its flag backups, to the product directory. With too
    little memory to spare it is published at once, and the MS says why."""
    from dsa110_contimg.conversion.workarea import archive_ms, flag_versions

    root, truth = tiny_group
    tmpfs = shm_dir
    work = tmpfs / "contimg-work-test"
    inputs = dataclasses.replace(_inputs(group_files(root, truth), tmp_path,
                                         truth["group_id"], tmpfs=tmpfs), work_dir=work)
    final = ms_path_for(inputs.output_dir, truth["group_id"])
    res = _run(worker, inputs, tmpfs_reserve_gb=0, keep_in_tmpfs=True)
    assert res["ok"], res
    r = res["result"]
    assert r.ms_path == work / final.name and (r.ms_path / "table.dat").is_file()
    assert not final.exists() and r.staged_on == "tmpfs"
    assert not any(tmpfs.glob(STAGE_PREFIX + "*"))
    again = _run(worker, inputs, keep_in_tmpfs=True)
    assert again["ok"] and again["result"].skipped and again["result"].ms_path == r.ms_path

    flag_versions(r.ms_path).mkdir()  # as flagdata leaves it
    (flag_versions(r.ms_path) / "FLAG_VERSION_LIST").write_text("main : working copy\n")
    assert archive_ms(r.ms_path, final, fsync=False) == final
    assert not r.ms_path.exists() and not flag_versions(r.ms_path).exists()
    assert (flag_versions(final) / "FLAG_VERSION_LIST").is_file()
    assert archive_ms(r.ms_path, final) == final  # again: nothing to do
    d = worker.submit(_inspect, str(final)).result()
    assert d["nrows"] == r.n_times * (r.n_baselines)

    shutil.rmtree(final.parent)
    big = _run(worker, inputs, tmpfs_reserve_gb=1e6, keep_in_tmpfs=True)
    assert big["ok"] and big["result"].ms_path == final, big
    assert any("not kept in tmpfs" in n for n in big["result"].notes)
    assert not any(work.glob("*.ms"))


def test_invalid_existing_ms_is_moved_aside_not_deleted(worker, tiny_group, tmp_path):
    root, truth = tiny_group
    inputs = _inputs(group_files(root, truth), tmp_path, truth["group_id"])
    final = ms_path_for(inputs.output_dir, truth["group_id"])
    final.mkdir(parents=True)
    (final / "table.dat").write_bytes(b"half a table")
    res = _run(worker, inputs)
    assert res["ok"] and not res["result"].skipped, res
    aside = [p for p in final.parent.iterdir() if ".invalid-" in p.name]
    assert len(aside) == 1 and (aside[0] / "table.dat").read_bytes() == b"half a table"


def test_missing_and_zero_subbands_still_convert(worker, tiny_group, tmp_path):
    """A missing subband becomes flagged zero channels (same grid for every group); an
    all-zero subband is not a conversion error (QA reports it): its zeros are flagged."""
    root, truth = tiny_group
    src = tmp_path / "in"
    src.mkdir()
    files = group_files(root, truth)
    for p in files:
        if not p.name.endswith("_sb07.hdf5"):
            shutil.copyfile(p, src / p.name)
    zero = next(src.glob("*_sb03.hdf5"))
    with h5py.File(zero, "r+") as h:
        h["Data/visdata"][...] = 0
    res = _run(worker, _inputs(sorted(src.glob("*.hdf5")), tmp_path, truth["group_id"]))
    assert res["ok"], res
    r = res["result"]
    assert r.n_channels == 64 and any("zero-filled and flagged" in n for n in r.notes)
    d = worker.submit(_inspect, str(r.ms_path)).result()
    f = d["CHAN_FREQ"][0]
    flagged = d["FLAG"].all(axis=(0, 2))
    assert np.allclose(np.diff(f), np.diff(f)[0])  # still one regular grid
    # sb07 is the 9th subband from the bottom (channels 32-35), sb03 the 13th (48-51)
    assert np.flatnonzero(flagged).tolist() == [32, 33, 34, 35, 48, 49, 50, 51]
    assert np.all(d["DATA"][:, flagged] == 0)
    assert any("exactly zero (dead inputs): flagged" in n for n in r.notes)


def test_a_few_nan_visibilities_are_flagged_not_fatal(worker, tiny_group, tmp_path):
    root, truth = tiny_group
    src = tmp_path / "in"
    src.mkdir()
    for p in group_files(root, truth):
        shutil.copyfile(p, src / p.name)
    f = next(src.glob("*_sb00.hdf5"))  # the highest subband: output channels 60-63
    with h5py.File(f, "r+") as h:
        vis = h["Data/visdata"][()]
        vis[100, 0, 0] = np.nan  # file channel 0 = highest frequency = output channel 63
        vis[200:204, 1, 1] = np.inf
        h["Data/visdata"][...] = vis
    res = _run(worker, _inputs(sorted(src.glob("*.hdf5")), tmp_path, truth["group_id"]),
               max_nonfinite_fraction=0.01)
    assert res["ok"], res
    assert any(f"{f.name}: 5 non-finite visibilities zeroed and flagged" in n
               for n in res["result"].notes)
    d = worker.submit(_inspect, str(res["result"].ms_path)).result()
    assert np.isfinite(d["DATA"]).all()
    dead = np.isin(d["ANTENNA1"], truth["antennas"]["dead"]) | np.isin(d["ANTENNA2"],
                                                                      truth["antennas"]["dead"])
    assert d["FLAG"][dead].all()  # the dead station's zeros
    assert d["FLAG"][100, 63, 0] and d["FLAG"][200:204, 62, 1].all()
    nan_cells = np.zeros(d["FLAG"].shape, dtype=bool)
    nan_cells[100, 63, 0] = True
    nan_cells[200:204, 62, 1] = True
    nan_cells[dead] = False  # already flagged as zeros
    live = d["FLAG"].copy()
    live[dead] = False
    assert np.array_equal(live, nan_cells)  # nothing else flagged


def test_helper_processes_give_the_same_ms(worker, tiny_group, tiny_inspected, tmp_path):
    """CONTIMG_CONVERT_PROCESSES=3: two helpers read the subbands; same bytes out."""
    root, truth = tiny_group
    res = _run(worker, _inputs(group_files(root, truth), tmp_path, truth["group_id"]),
               parallel_subbands=3)
    assert res["ok"], res
    d = worker.submit(_inspect, str(res["result"].ms_path)).result()
    for col in ("DATA", "FLAG", "UVW", "WEIGHT", "ANTENNA1", "ANTENNA2", "TIME"):
        assert np.array_equal(d[col], tiny_inspected[col]), col
    assert not any((tmp_path / "tmpfs").glob(STAGE_PREFIX + "*"))


def test_two_groups_give_two_ms_a_group_apart(worker, tiny_two_ms, tiny_two_groups):
    _, truths = tiny_two_groups
    assert [p.name for p in tiny_two_ms] == [t["group_id"].replace(":", "") + ".ms" for t in truths]
    a, b = (worker.submit(_inspect, str(p)).result() for p in tiny_two_ms)
    # one group later the meridian is 6 x 12.88 s of sidereal rotation further east (the
    # apparent-to-ICRS rotation changes the RA step by ~0.1 %)
    dra = np.degrees(b["PHASE_DIR"][0, 0, 0] - a["PHASE_DIR"][0, 0, 0])
    assert dra == pytest.approx(6 * 12.884902 * 360 / 86164.1, rel=3e-3)
    assert a["TIME"].max() < b["TIME"].min()


# ------------------------------------------------------------------ bad input


def _corrupt(kind: str, files: list[Path], dest: Path) -> Path:
    """Copy the group to ``dest`` with one bad subband; return the bad file."""
    dest.mkdir(parents=True)
    for p in files:
        shutil.copyfile(p, dest / p.name)
    bad = dest / files[5].name
    if kind == "truncated":
        size = bad.stat().st_size
        with open(bad, "r+b") as fh:
            fh.truncate(size // 2)
    elif kind == "nothdf5":
        bad.write_bytes(b"not an HDF5 file\n" * 100)
    elif kind == "times":
        with h5py.File(bad, "r+") as h:
            h["Header/time_array"][...] = h["Header/time_array"][()] + 12.884902 / 86400
    elif kind == "antennas":
        with h5py.File(bad, "r+") as h:
            a2 = h["Header/ant_2_array"][()]
            a2[a2 == 97] = 96
            h["Header/ant_2_array"][...] = a2
    elif kind == "nan":
        with h5py.File(bad, "r+") as h:
            h["Data/visdata"][...] = np.nan
    elif kind == "inf":
        with h5py.File(bad, "r+") as h:
            h["Data/visdata"][...] = np.inf
    elif kind == "duplicate":
        stamp, sb = files[9].name.split("_sb")
        bad = dest / f"{stamp[:-1]}9_sb{sb}"  # same subband, another timestamp
        shutil.copyfile(files[9], bad)
    return bad


def _channels_fault(src: str, dest: str) -> None:
    from pyuvdata import UVData

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uv = UVData()
        uv.read(src, file_type="uvh5", run_check_acceptability=False)
        uv.select(freq_chans=[0, 1, 2])
        os.remove(dest)
        uv.write_uvh5(dest, run_check=False)


BAD_CASES = {
    "truncated": "truncated",
    "nothdf5": "not an HDF5 file",
    "times": "times differ",
    "antennas": "antennas differ",
    "channels": "channel counts differ",
    "nan": "NaN/Inf",
    "inf": "NaN/Inf",
    "duplicate": "duplicate subband sb09",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES) + ["nan-parallel"])
def test_bad_input_names_the_file_and_leaves_nothing(worker, tiny_group, tmp_path, kind):
    root, truth = tiny_group
    files = group_files(root, truth)
    src = tmp_path / "in"
    kind, _, mode = kind.partition("-")
    bad = _corrupt(kind, files, src)
    if kind == "channels":
        worker.submit(_channels_fault, str(files[5]), str(bad)).result()
    res = _run(worker, _inputs(sorted(src.glob("*.hdf5")), tmp_path, truth["group_id"]),
               parallel_subbands=2 if mode == "parallel" else 1)
    assert not res["ok"]
    assert res["type"] == "BadInputError"
    assert BAD_CASES[kind] in res["message"]
    assert res["path"] == str(bad)
    products = tmp_path / "products"
    assert not any(products.rglob("*.ms")) and not any(products.rglob(".*partial*"))
    for d in (tmp_path / "tmpfs", tmp_path / "scratch"):
        assert not d.exists() or not any(d.glob(STAGE_PREFIX + "*"))


def test_validation_orders_subbands_by_frequency(tiny_group):
    root, truth = tiny_group
    files = group_files(root, truth)
    layout = validate_group(list(reversed(files)))
    assert [f.subband for f in layout.files] == list(range(15, -1, -1))
    assert [f.out_start for f in layout.files] == list(range(0, 64, 4))
    assert layout.freqs_hz.size == 64 and layout.filled.all()
    assert all(f.descending for f in layout.files)
    with pytest.raises(BadInputError, match="no subband files"):
        validate_group([])


def test_validation_reads_headers_only(tiny_group):
    """No python-casacore, no visibility reads: a fresh process shows what it imports."""
    root, truth = tiny_group
    code = ("import sys; from pathlib import Path; "
            "from dsa110_contimg.conversion.validate import validate_group; "
            f"validate_group([Path(p) for p in {[str(p) for p in group_files(root, truth)]!r}]); "
            "assert 'casacore' not in sys.modules, 'casacore imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ full disk


@pytest.fixture
def small_mount(tmp_path):
    """A 2 MB tmpfs; skipped when we cannot mount (not root / no permission)."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=False)


@pytest.mark.parametrize("where", ["staging", "ms", "publish"])
def test_full_disk_is_diskfull_naming_the_path(worker, tiny_group, tmp_path, small_mount, where):
    """A full disk is DiskFull (a StageError the daemon holds on, using no attempt)."""
    root, truth = tiny_group
    files = group_files(root, truth)
    opts = {"stage_to_tmpfs": False}
    if where == "staging":  # the input copy does not fit on the scratch disk
        inputs = _inputs(files, tmp_path, truth["group_id"], scratch=small_mount)
        opts["stage_inputs"] = True
    elif where == "ms":  # inputs read in place; the MS does not fit
        inputs = _inputs(files, tmp_path, truth["group_id"], scratch=small_mount)
        opts["stage_inputs"] = False
    else:  # the product directory is full
        inputs = _inputs(files, tmp_path, truth["group_id"], output=small_mount)
    res = _run(worker, inputs, **opts)
    assert not res["ok"] and res["type"] == "DiskFull", res
    assert "no space left on device" in res["message"]
    assert str(small_mount) in res["message"]
    assert not any(small_mount.rglob("*.ms")) and not any(small_mount.rglob(".*partial*"))
    assert not any(small_mount.glob(STAGE_PREFIX + "*"))
    assert not any((tmp_path / "scratch").glob(STAGE_PREFIX + "*")) if (tmp_path / "scratch").exists() else True


def test_full_disk_while_publishing_early(worker, tiny_group, tmp_path, small_mount, shm_dir):
    """DATA copied to the products disk while it fills (warm files) meets a full disk: the
    same DiskFull, and neither the MS nor the early partial copy is left behind."""
    root, truth = tiny_group
    work = shm_dir / "contimg-work-test"
    first = dataclasses.replace(_inputs(group_files(root, truth), tmp_path / "a", truth["group_id"],
                                        tmpfs=shm_dir), work_dir=work)
    assert _run(worker, first, tmpfs_reserve_gb=0)["ok"]  # fills the warm pool
    full = dataclasses.replace(first, output_dir=small_mount)
    res = _run(worker, full, tmpfs_reserve_gb=0, block_bytes=1)
    assert not res["ok"] and res["type"] == "DiskFull", res
    assert "no space left on device" in res["message"] and str(small_mount) in res["message"]
    assert not any(small_mount.rglob("*.ms")) and not any(small_mount.rglob(".*partial*"))
    assert not any(p.name.startswith(STAGE_PREFIX) for p in shm_dir.iterdir())


# ------------------------------------------------------------------ staging hygiene


def test_clean_stale_staging_removes_only_dead_owners(tmp_path):
    tmpfs, scratch = tmp_path / "tmpfs", tmp_path / "scratch"
    tmpfs.mkdir()
    scratch.mkdir()
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True)
    dead_pid = int(p.stdout)
    dead = tmpfs / f"{STAGE_PREFIX}2026-06-01T000000-{dead_pid}"
    dead.mkdir()
    (dead / "x.hdf5").write_bytes(b"x")
    live = scratch / f"{STAGE_PREFIX}2026-06-01T000000-{os.getpid()}"
    live.mkdir()
    recycled = scratch / f"{STAGE_PREFIX}2026-06-01T000001-{os.getpid()}"
    recycled.mkdir()  # our pid, but the owner file says another process start time
    (recycled / "owner.json").write_text(json.dumps({"pid": os.getpid(), "started": 1.0}))
    other = tmpfs / "someone-elses-dir"
    other.mkdir()
    removed = clean_stale_staging(scratch, tmpfs)
    assert sorted(removed) == sorted([dead, recycled])
    assert live.exists() and other.exists() and not dead.exists()
    assert clean_stale_staging(scratch / "missing", tmpfs / "missing") == []


def _pool(work: Path) -> list[str]:
    pool = work / "warm-columns"
    return sorted(p.name.split("-")[0] for p in pool.iterdir()) if pool.is_dir() else []


def _main_files(ms: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ms.glob("table.f*")}


def _early(ms: Path) -> list[str]:
    return [str(n) for n in (read_completion(ms) or {})["published_early"] if str(n)]


def test_warm_column_files_give_the_same_ms(worker, tiny_two_groups, tmp_path, shm_dir):
    """After a group is published its DATA/FLAG tile files wait in the work area; the next
    group of the same shape is written into them, and its MS is byte for byte the one
    written from scratch. A damaged entry is refused (that column is written fresh), the
    pool keeps at most CONTIMG_WARM_COLUMN_SETS sets, and none without the memory reserve."""
    root, truths = tiny_two_groups
    tmpfs = shm_dir
    work = tmpfs / "contimg-work-test"

    def inputs(truth: dict, out: str, warm: bool = True) -> ConversionInputs:
        i = _inputs(group_files(root, truth), tmp_path / out, truth["group_id"], tmpfs=tmpfs)
        return dataclasses.replace(i, work_dir=work) if warm else i

    fresh = _run(worker, inputs(truths[1], "fresh", warm=False))
    assert fresh["ok"] and fresh["result"].warm_columns == (), fresh
    want = _main_files(fresh["result"].ms_path)

    a = _run(worker, inputs(truths[0], "a"), tmpfs_reserve_gb=0)
    assert a["ok"] and a["result"].warm_columns == (), a
    assert _pool(work) == ["DATA", "FLAG"]
    # one integration per block: DATA, filled in place, goes to disk while later blocks
    # fill (over a's data); no partial copy is left
    b = _run(worker, inputs(truths[1], "b"), block_bytes=1, tmpfs_reserve_gb=0)
    assert b["ok"] and b["result"].warm_columns == ("DATA", "FLAG"), b
    assert _main_files(b["result"].ms_path) == want
    assert _early(b["result"].ms_path) != [] and _early(a["result"].ms_path) == []
    assert not list(b["result"].ms_path.parent.glob(".*"))
    assert _pool(work) == ["DATA", "FLAG"]  # b's files went back

    data = next((work / "warm-columns").glob("DATA-*"))
    tiles = next(p for p in data.iterdir() if p.name != "header")
    os.truncate(tiles, tiles.stat().st_size - 8)  # no longer the size its header says
    c = _run(worker, inputs(truths[1], "c"), tmpfs_reserve_gb=0)
    assert c["ok"] and c["result"].warm_columns == ("FLAG",), c
    assert _main_files(c["result"].ms_path) == want
    assert _pool(work) == ["DATA", "FLAG"]

    for entry in list((work / "warm-columns").iterdir()):  # as a concurrent group leaves
        shutil.copytree(entry, entry.with_name(entry.name + "0"))
    d = _run(worker, inputs(truths[0], "d"), tmpfs_reserve_gb=0, warm_column_sets=2)
    assert d["ok"] and d["result"].warm_columns == ("DATA", "FLAG")
    assert _pool(work) == ["DATA", "DATA", "FLAG", "FLAG"]
    e = _run(worker, inputs(truths[1], "e"), tmpfs_reserve_gb=0, warm_column_sets=1)
    assert e["ok"] and e["result"].warm_columns == ("DATA", "FLAG")
    assert _pool(work) == ["DATA", "FLAG"]
    assert _main_files(e["result"].ms_path) == want
    gap = tmp_path / "gap"  # a missing subband: its channels must not keep old data
    gap.mkdir()
    for p in group_files(root, truths[1]):
        if not p.name.endswith("_sb07.hdf5"):
            shutil.copyfile(p, gap / p.name)
    gap_in = _inputs(sorted(gap.glob("*.hdf5")), tmp_path / "gap-fresh",
                     truths[1]["group_id"], tmpfs=tmpfs)
    gap_fresh = _run(worker, gap_in)
    gap_warm = _run(worker, dataclasses.replace(gap_in, output_dir=tmp_path / "gap-warm",
                                                work_dir=work), tmpfs_reserve_gb=0)
    assert gap_fresh["ok"] and gap_warm["ok"], (gap_fresh, gap_warm)
    assert gap_warm["result"].warm_columns == ("DATA", "FLAG")
    assert (_main_files(gap_warm["result"].ms_path)
            == _main_files(gap_fresh["result"].ms_path))

    late = _run(worker, inputs(truths[1], "late"), tmpfs_reserve_gb=0, publish_early=False)
    assert late["ok"] and _early(late["result"].ms_path) == []
    assert _main_files(late["result"].ms_path) == want
    g = _run(worker, inputs(truths[1], "g"), tmpfs_reserve_gb=1e6)
    assert g["ok"] and g["result"].warm_columns == ("DATA", "FLAG")
    assert _pool(work) == []  # not enough memory to spare: nothing kept
    assert _main_files(g["result"].ms_path) == want


def test_warm_columns_with_weight_spectrum(worker, tiny_two_groups, tmp_path, shm_dir):
    """Groups whose nsamples vary by channel get WEIGHT_SPECTRUM, a third tiled column: it
    is kept and adopted like DATA and FLAG, and the MS is still the one written afresh."""
    root, truths = tiny_two_groups
    rng = np.random.default_rng(5)
    runs = {}
    for i, truth in enumerate(truths):
        src = tmp_path / f"in{i}"
        src.mkdir()
        for p in group_files(root, truth):
            shutil.copyfile(p, src / p.name)
            with h5py.File(src / p.name, "r+") as h:
                ns = h["Data/nsamples"]
                ns[...] = rng.choice([0.5, 1.0], size=ns.shape).astype(ns.dtype)
        runs[i] = _inputs(sorted(src.glob("*.hdf5")), tmp_path / f"out{i}", truth["group_id"],
                          tmpfs=shm_dir)
    fresh = _run(worker, runs[1])
    work = shm_dir / "contimg-work-test"
    warm = [_run(worker, dataclasses.replace(runs[i], output_dir=tmp_path / f"warm{i}",
                                             work_dir=work), tmpfs_reserve_gb=0)
            for i in (0, 1)]
    assert fresh["ok"] and all(w["ok"] for w in warm), (fresh, warm)
    assert warm[1]["result"].warm_columns == ("DATA", "FLAG", "WEIGHT_SPECTRUM")
    files = _main_files(warm[1]["result"].ms_path)
    assert files == _main_files(fresh["result"].ms_path)
    assert len([n for n in files if "_TSM" in n]) >= 4  # DATA, FLAG, WEIGHT_SPECTRUM, ...


def test_warm_pool_removes_what_killed_conversions_left(tmp_path):
    from dsa110_contimg.conversion.warmfiles import _remove_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".incoming-{dead.pid}-1"
    live = tmp_path / f".incoming-{os.getpid()}-2"
    for d in (orphan, live):
        d.mkdir()
        (d / "header").write_bytes(b"x")
    _remove_orphans(tmp_path)
    assert not orphan.exists() and live.exists()
