"""Accuracy against the simulator's truth, for any chain's caltables and images.

Used by ``bench_e2e.py`` on both the plain CASA chain and the daemon, so both are judged by
the same arithmetic. Needs casatools (call ``prepare_casa`` first); never python-casacore.

Gains: CASA solves conj(g) of the simulator's g (the MS holds the conjugate visibilities),
and only gains relative to a reference antenna are determined, so the total gain K*BP*G of
the tables is conjugated and both it and the truth are divided by the refant's before
comparing. K is evaluated about the band centre, as CASA applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MJD_JD = 2400000.5


def _total_gains(tables: Mapping[str, Path], antennas: list[int], times_mjd: np.ndarray,
                 freqs_hz: np.ndarray) -> np.ndarray:
    """K*BP*G as the calibration package evaluates it, for a bandpass in any channel order.

    ``total_gains`` interpolates BP with np.interp, which needs ascending channels; the plain
    chain's MS keeps the correlator's descending order, so its BP is interpolated here on the
    sorted channels instead (same rules: nearest solution in time, linear in frequency).
    """
    from dsa110_contimg.calibration.solve import read_caltable, total_gains

    bp = read_caltable(tables["BP"]) if "BP" in tables else None
    if bp is None or bp.freqs_hz.size < 2 or np.all(np.diff(bp.freqs_hz) > 0):
        return total_gains(dict(tables), antennas, times_mjd, freqs_hz)
    out = total_gains({k: v for k, v in tables.items() if k != "BP"}, antennas, times_mjd,
                      freqs_hz)
    order = np.argsort(bp.freqs_hz)
    values = np.where(bp.flag, np.nan, bp.values)[:, order]  # (npol, nchan, nrow)
    for a_i, ant in enumerate(antennas):
        rows = np.flatnonzero(bp.antenna == ant)
        if rows.size == 0:
            out[a_i] = np.nan
            continue
        nearest = rows[np.abs(bp.time_mjd[rows][None, :] - times_mjd[:, None]).argmin(axis=1)]
        for k, row in enumerate(nearest):
            for p in range(values.shape[0]):
                y = values[p, :, row]
                out[a_i, k, :, p] *= (np.interp(freqs_hz, bp.freqs_hz[order], y.real)
                                      + 1j * np.interp(freqs_hz, bp.freqs_hz[order], y.imag))
    return out


def gain_errors(tables: Mapping[str, Path], refant: str, ms: Path, truth: dict) -> dict[str, Any]:
    """Phase (deg rms), amplitude (% rms) and delay (ns) errors of K*BP*G against the truth.

    ``tables`` maps 'K', 'BP', 'G' to caltable paths; ``ms`` is the MS they were solved on
    (its times, channels and antenna numbering are where gains are compared).
    """
    from dsa110_contimg.calibration.casarun import read_ms_info
    from dsa110_contimg.calibration.solve import read_caltable
    from dsa110_contimg.simulate.core import BAND_CENTRE_HZ, BAND_WIDTH_HZ
    from dsa110_contimg.simulate.gains import evaluate_gains

    info = read_ms_info(ms)
    index = {info.name_of(i): i for i in info.antennas_in_data}
    stations = list(truth["gains"]["stations"])
    live = [s for s in stations if s not in truth["antennas"]["dead"] and str(s) in index]
    if int(refant) not in live:
        raise ValueError(f"reference antenna {refant} carries no data in {ms}")
    r = live.index(int(refant))
    others = np.arange(len(live)) != r
    rows = [stations.index(s) for s in live]

    sol = np.conj(_total_gains(tables, [index[str(s)] for s in live], info.times_mjd,
                               info.freqs_hz))  # (nant, ntime, nchan, npol)
    true = evaluate_gains(truth["gains"], info.freqs_hz, info.times_mjd + MJD_JD,
                          BAND_CENTRE_HZ, BAND_WIDTH_HZ, truth["mid_jd"])[rows]
    rel_true = true / true[r]
    ratio = ((sol / sol[r]) / rel_true)[others]
    out: dict[str, Any] = {
        "antennas": int(others.sum()), "refant": str(refant),
        "flagged_fraction": float(np.mean(~np.isfinite(ratio))),
        "phase_rms_deg": float(np.degrees(np.sqrt(np.nanmean(np.angle(ratio) ** 2)))),
        "amp_rms_pct": float(100 * np.sqrt(np.nanmean((np.abs(ratio) - 1) ** 2))),
        "abs_amp_rms_pct": float(100 * np.sqrt(np.nanmean(
            (np.abs(sol[others]) / np.abs(true[others]) - 1) ** 2))),
    }
    if "K" in tables:
        # K cannot tell a delay from the linear part of the bandpass phase, so compare it with
        # the least-squares delay of the true relative gain (and, for reference, with tau).
        k = read_caltable(tables["K"])
        solved = np.array([[np.nanmean(k.values[p, 0, k.antenna == index[str(s)]])
                            for p in range(k.values.shape[0])] for s in live])  # (nant, npol)
        up = np.argsort(info.freqs_hz)  # unwrap along frequency whatever the channel order
        x = info.freqs_hz[up] - BAND_CENTRE_HZ
        mean_rel = np.nanmean(rel_true, axis=1)[:, up]  # over time: (nant, nchan, npol)
        effective = np.array([[-np.polyfit(x, np.unwrap(np.angle(mean_rel[a, :, p])), 1)[0]
                               / (2 * np.pi) * 1e9 for p in range(solved.shape[1])]
                              for a in range(len(live))])
        tau = np.asarray(truth["gains"]["delay_ns"])[rows][:, :solved.shape[1]]
        d_eff = (solved - effective)[others]
        d_tau = (solved - (tau - tau[r]))[others]
        out.update(delay_rms_ns=float(np.sqrt(np.nanmean(d_eff ** 2))),
                   delay_max_ns=float(np.nanmax(np.abs(d_eff))),
                   delay_vs_injected_rms_ns=float(np.sqrt(np.nanmean(d_tau ** 2))))
    return out


def read_image(path: Path) -> tuple[np.ndarray, Any]:
    from astropy.io import fits

    with fits.open(path) as h:
        return np.squeeze(h[0].data).astype(float), h[0].header


def _image_wcs(header: Any) -> Any:
    """The image's WCS, without astropy's notes about the MJD/OBSGEO keywords it fills in."""
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def source_fluxes(image_fits: Path, truth: dict, reference: str,
                  rms_jy: float | None = None) -> list[dict[str, Any]]:
    """Fit every injected source in the image and compare with ``truth`` field ``reference``
    ('flux_at_band_centre_jy' for a primary-beam corrected image, 'apparent_flux_jy' for an
    uncorrected one). Sources off the image (or in its blanked part) are 'outside'."""
    from dsa110_contimg.qa.image import Beam, fit_point_source

    data, header = read_image(image_fits)
    beam, wcs = Beam.from_header(header), _image_wcs(header)
    if beam is None:
        raise ValueError(f"{image_fits}: no restoring beam in the header")
    rows = []
    for s in truth["sources"]:
        want = float(s[reference])
        row: dict[str, Any] = {"name": s["name"], "truth_jy": want,
                               "apparent_jy": float(s["apparent_flux_jy"]),
                               "pb_mean": float(s["pb_mean"])}
        if rms_jy:
            row["snr"] = float(s["apparent_flux_jy"]) / rms_jy
        fit = fit_point_source(data, wcs, s["ra_deg"], s["dec_deg"], beam)
        if fit is None:
            row["status"] = "outside"
        else:
            row.update(status="fitted", fit_jy=fit["flux_jy"], ratio=fit["flux_jy"] / want,
                       offset_beams=fit["offset_beams"])
        rows.append(row)
    return rows


def image_rms(path: Path | None) -> float | None:
    """Robust (MAD) rms of an image's finite pixels; for a residual this is the noise."""
    from dsa110_contimg.imaging.stats import robust_rms

    if path is None or not Path(path).exists():
        return None
    return robust_rms(read_image(Path(path))[0])


def flag_score(ms: Path, truth: dict) -> dict[str, float] | None:
    """How much of the simulated interference the MS's final flags cover (None: no RFI)."""
    if not truth.get("rfi"):
        return None
    import casatools

    from dsa110_contimg.simulate.rfi import RfiModel, score_flags

    tb = casatools.table()
    tb.open(str(ms))
    try:
        flag = tb.getcol("FLAG").any(axis=0).T  # (row, chan)
        a1, a2, tm = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2"), tb.getcol("TIME")
    finally:
        tb.close()
    tb.open(str(ms / "SPECTRAL_WINDOW"))
    try:
        freqs = tb.getcol("CHAN_FREQ")[:, 0]
    finally:
        tb.close()
    dead_ants = truth["antennas"]["dead"]
    dead = np.isin(a1, dead_ants) | np.isin(a2, dead_ants)
    return score_flags(RfiModel.from_dict(truth["rfi"]), flag, a1, a2, tm, freqs, dead)
