"""The simulator writes correlator-like groups whose truth matches what is in the data."""

import json
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
from pyuvdata import UVData

from dsa110_contimg.simulate import simulate_groups
from dsa110_contimg.simulate.core import BAND_CENTRE_HZ, BAND_WIDTH_HZ
from dsa110_contimg.simulate.gains import evaluate_gains


def _read(files):
    uv = UVData()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uv.read([str(f) for f in files], file_type="uvh5", run_check_acceptability=False)
    return uv


def test_cli_writes_tiny_group_with_requested_shape(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "simulate", str(tmp_path),
                        "--preset", "tiny", "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("*_sb??.hdf5"))
    assert len(files) == 16
    truth = json.loads(next(tmp_path.glob("*_truth.json")).read_text())
    assert [f.name for f in files] == sorted(truth["files"])
    tops = []
    for f in files:
        uv = _read([f])
        assert uv.Ntimes == 6 and uv.Nfreqs == 4 and uv.Npols == 2
        assert list(uv.polarization_array) == [-5, -6]  # XX, YY
        assert np.all(np.diff(uv.freq_array) < 0), "channels descend within a subband"
        assert uv.extra_keywords["phase_center_dec"] == pytest.approx(np.radians(truth["pointing"]["dec_deg"]))
        assert np.allclose(uv.integration_time, 12.884902)
        tops.append(uv.freq_array.max())
    assert np.all(np.diff(tops) < 0), "sb00 is the highest subband"
    assert max(tops) < 1498.75e6 and min(tops) > 1311.25e6
    uv = _read(files)
    assert uv.Nfreqs == 64 and uv.Nbls == 17 * 18 // 2
    assert set(truth["antennas"]["dead"]) == {97}
    dead = uv.get_data(20, 97)
    assert np.all(dead == 0)


def test_calibrator_flux_in_visibilities_matches_truth(tiny_group):
    root, truth = tiny_group
    uv = _read(sorted(root / n for n in truth["files"]))
    cal = next(s for s in truth["sources"] if s["name"] == "3C286")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uv.phase(lon=np.radians(cal["ra_deg"]), lat=np.radians(cal["dec_deg"]), cat_name="3C286",
                 epoch="J2000")
    stations = truth["gains"]["stations"]
    times = np.unique(uv.time_array)
    g = evaluate_gains(truth["gains"], uv.freq_array, times, BAND_CENTRE_HZ, BAND_WIDTH_HZ,
                       truth["mid_jd"])
    idx = {s: i for i, s in enumerate(stations)}
    ratios = []
    for a, b in uv.get_antpairs():
        if a == b or 97 in (a, b):
            continue
        d = uv.get_data(a, b)  # (nt, nf, npol)
        corr = g[idx[a]] * np.conj(g[idx[b]])
        ratios.append(d / corr)
    v = np.mean(ratios, axis=0)  # average over baselines: other sources and noise average down
    assert np.degrees(np.abs(np.angle(v.mean()))) < 3
    assert abs(v.real.mean() / cal["apparent_flux_jy"] - 1) < 0.03


def test_faults_jitter_and_slow_writes(tmp_path):
    truths = simulate_groups(tmp_path, preset="tiny", groups=1, seed=5, jitter_s=4.0,
                             faults={3: "truncated", 5: "nan", 2: "channels", 7: "missing",
                                     9: "duplicate", 11: "nothdf5"})
    t = truths[0]
    names = sorted(p.name for p in tmp_path.glob("*_sb??.hdf5"))
    assert not any(n.endswith("_sb07.hdf5") for n in names)
    assert sum(n.endswith("_sb09.hdf5") for n in names) == 2
    stamps = {n.split("_sb")[0] for n in names}
    assert len(stamps) > 1, "jitter spreads the file timestamps"
    by_sb = {n[-7:-5]: tmp_path / n for n in names}
    with pytest.raises(OSError):
        h5py.File(by_sb["03"], "r")["Data/visdata"][...]
    with pytest.raises(OSError):
        h5py.File(by_sb["11"], "r")
    assert np.isnan(_read([by_sb["05"]]).data_array).all()
    assert _read([by_sb["02"]]).Nfreqs == 3
    assert t["faults"] == {"sb03": "truncated", "sb05": "nan", "sb02": "channels",
                           "sb07": "missing", "sb09": "duplicate", "sb11": "nothdf5"}


def test_rfi_is_the_only_difference_and_matches_its_truth(tmp_path):
    """The same seed with and without interference: the data differ by exactly the recorded
    interference seen through the gains, on cross-correlations, fixed in phase over time."""
    from dsa110_contimg.simulate.rfi import RfiModel

    clean_t = simulate_groups(tmp_path / "clean", preset="tiny", groups=1, seed=4)[0]
    rfi_t = simulate_groups(tmp_path / "rfi", preset="tiny", groups=1, seed=4, rfi=True)[0]
    assert clean_t["rfi"] is None and rfi_t["rfi"] is not None
    model = RfiModel.from_dict(rfi_t["rfi"])
    clean = _read(sorted(tmp_path / "clean" / n for n in clean_t["files"]))
    dirty = _read(sorted(tmp_path / "rfi" / n for n in rfi_t["files"]))
    times = np.unique(dirty.time_array)
    freqs = dirty.freq_array
    amp = model.amplitude(freqs, times.size)
    hit = amp > 0
    assert 0 < hit.mean() < 0.2
    assert hit[model.burst_time_index].sum() > hit[0].sum(), "the burst is in one integration"
    g = evaluate_gains(rfi_t["gains"], freqs, times, BAND_CENTRE_HZ, BAND_WIDTH_HZ,
                       rfi_t["mid_jd"])
    idx = {s: i for i, s in enumerate(rfi_t["gains"]["stations"])}
    for a, b in [(20, 21), (20, 55), (24, 31), (25, 25), (20, 97)]:
        diff = dirty.get_data(a, b) - clean.get_data(a, b)  # (nt, nf, npol)
        if a == b or 97 in (a, b):  # autocorrelations and the dead antenna: untouched
            assert np.all(diff == 0)
            continue
        seen = diff / (g[idx[a]] * np.conj(g[idx[b]]))
        assert np.all(np.abs(seen[~hit]) < 1e-3)
        assert np.allclose(np.abs(seen[hit]), np.broadcast_to(amp[..., None], seen.shape)[hit],
                           rtol=1e-4)
        lines = hit.all(axis=0)  # persistent lines: same phase in every integration
        assert lines.any()
        phase = np.angle(seen[:, lines, 0])
        assert np.allclose(np.angle(np.exp(1j * (phase - phase[0]))), 0, atol=1e-3)
