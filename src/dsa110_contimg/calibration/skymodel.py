"""Which calibrator a group sees, and MODEL_DATA for it (componentlist + ft, times the beam).

DSA-110 calibrates on drift scans: a group has a calibrator only when a catalogue source
*transits* during it, close enough to the pointing declination and bright enough through the
primary beam. A later group in which the source merely lingers in the beam has none and is
calibrated with the set in force.

The dishes do not track, so the calibrator drifts through the fixed (az, alt) beam during a
group (~8 % in 5 min). ``ft`` knows nothing of that, so MODEL_DATA is computed here directly:
the point-source visibility ft would write (same sign and frame, checked against ft in the
tests) times the 4.65 m Airy power at each integration and channel; without the beam the gain
amplitudes would absorb it. The model carries the calibrator's phase at its true position, so
no separate rephasing pass is needed to solve on it.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..catalogue.reference import Calibrator, angular_separation_deg, load_calibrators
from ..instrument import (
    BAND_CENTRE_HZ,
    C_M_S,
    OVRO_ALT_M,
    OVRO_LAT_DEG,
    OVRO_LON_DEG,
    PrimaryBeam,
    dish_axes_enu,
    enu_unit,
    offline_astropy,
    pointing_altaz,
)
from .casarun import MJD_S, MSInfo, open_table, read_ms_info
from .options import CalibrationOptions

log = structlog.get_logger(__name__)

DEFAULT_FREQ_HZ = BAND_CENTRE_HZ
AIRY = PrimaryBeam()
_ROWS_PER_CHUNK = 8192



def _location(itrf_m: tuple[float, float, float] | None) -> Any:
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    if itrf_m is None:
        return EarthLocation.from_geodetic(OVRO_LON_DEG * u.deg, OVRO_LAT_DEG * u.deg,
                                           OVRO_ALT_M * u.m)
    return EarthLocation.from_geocentric(*itrf_m, unit=u.m)


def hour_angle_deg(ra_deg: float, dec_deg: float, mjd: np.ndarray, location: Any) -> np.ndarray:
    """Apparent hour angle in (-180, 180] at the given UTC MJDs (negative before transit)."""
    import astropy.units as u
    from astropy.coordinates import TETE, SkyCoord
    from astropy.time import Time

    offline_astropy()
    t = Time(np.atleast_1d(mjd), format="mjd", scale="utc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IERS-A out of range: UT1-UTC < 1 s, harmless here
        app = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs").transform_to(TETE(obstime=t))
        last = t.sidereal_time("apparent", longitude=location.lon).deg
    return (last - app.ra.deg + 180.0) % 360.0 - 180.0


def apparent_flux_at_transit(cal: Calibrator, pointing_dec_deg: float, freq_hz: float,
                             beam: PrimaryBeam = AIRY) -> float:
    """Catalogue flux at ``freq_hz`` times the beam at transit (offset = declination offset)."""
    return float(cal.flux_at(freq_hz) * transit_power(beam, cal.dec_deg, pointing_dec_deg,
                                                      freq_hz))


def transit_power(beam: PrimaryBeam, dec_deg: float, pointing_dec_deg: float,
                  freq_hz: float, lat_deg: float = OVRO_LAT_DEG) -> float:
    """The beam toward a source as it transits: on the meridian, offset in elevation only
    (toward the zenith when its declination lies between the pointing's and the latitude)."""
    towards_zenith = 1.0 if pointing_dec_deg <= lat_deg else -1.0
    dm = towards_zenith * np.sin(np.radians(dec_deg - pointing_dec_deg))
    return float(beam.power_lm(0.0, dm, freq_hz))


def find_transiting_calibrator(source: Path | str | MSInfo | tuple[float, Sequence[float]],
                               options: CalibrationOptions, *,
                               pointing_dec_deg: float | None = None,
                               interval_s: float | None = None,
                               freq_hz: float | None = None,
                               candidates: Sequence[Calibrator] | None = None,
                               beam: PrimaryBeam = AIRY) -> Calibrator | None:
    """The brightest catalogue calibrator transiting during the group, or None.

    ``source`` is an MS (path or :class:`MSInfo`: times, band and pointing are read from it,
    the pointing declination defaulting to the phase centre's) or ``(pointing_dec_deg,
    integration-centre MJDs)``. A calibrator qualifies when its hour angle changes sign within
    the group's time span, it lies within ``calibrator_radius_deg`` of the pointing at
    transit, and its beam-attenuated flux is at least ``min_calibrator_flux_jy``.
    ``candidates`` default to the bundled list.
    """
    itrf = None
    if isinstance(source, tuple):
        point_dec, times = float(source[0]), np.asarray(source[1], dtype=float)
        freq = freq_hz or DEFAULT_FREQ_HZ
        if interval_s is None:
            interval_s = float(np.median(np.diff(np.unique(times)))) * MJD_S if times.size > 1 else 0.0
    else:
        info = source if isinstance(source, MSInfo) else read_ms_info(Path(source))
        times, itrf = info.times_mjd, info.itrf_centre_m
        point_dec = info.phase_centre_deg[1] if pointing_dec_deg is None else pointing_dec_deg
        freq = freq_hz or float(np.mean(info.freqs_hz))
        interval_s = info.interval_s if interval_s is None else interval_s
    if pointing_dec_deg is not None:
        point_dec = float(pointing_dec_deg)
    t0 = float(times.min()) - interval_s / 2 / MJD_S
    t1 = float(times.max()) + interval_s / 2 / MJD_S
    loc = _location(itrf)
    found: list[tuple[float, Calibrator]] = []
    for cal in (load_calibrators() if candidates is None else candidates):
        if abs(cal.dec_deg - point_dec) > options.calibrator_radius_deg:
            continue
        flux = apparent_flux_at_transit(cal, point_dec, freq, beam)
        if flux < options.min_calibrator_flux_jy:
            continue
        ha0, ha1 = hour_angle_deg(cal.ra_deg, cal.dec_deg, np.array([t0, t1]), loc)
        if ha0 <= 0.0 < ha1 and ha1 - ha0 < 90.0:
            found.append((flux, cal))
    if not found:
        return None
    flux, best = max(found, key=lambda c: c[0])
    log.info("calibrator_transits", calibrator=best.name, apparent_flux_jy=round(flux, 3),
             others=[c.name for _, c in found if c is not best])
    return best


def beam_response(cal: Calibrator, info: MSInfo, pointing_dec_deg: float,
                  beam: PrimaryBeam = AIRY) -> np.ndarray:
    """Primary-beam power toward ``cal`` per integration and channel, shape (ntime, nchan).

    The pointing is fixed in (az, alt) (transit pointing at ``pointing_dec_deg``); the source
    position is computed per integration exactly as the sky moves (ICRS -> AltAz, astropy).
    """
    return beam_responses([cal], info, pointing_dec_deg, beam)[0]


def beam_responses(sources: Sequence[Calibrator], info: MSInfo, pointing_dec_deg: float,
                   beam: PrimaryBeam = AIRY) -> np.ndarray:
    """:func:`beam_response` of many sources in one coordinate transform, (nsrc, ntime, nchan)."""
    loc = _location(info.itrf_centre_m)
    az_p, alt_p = pointing_altaz(pointing_dec_deg, float(loc.lat.deg))
    dl, dm, dn = _offsets_along_drift(np.array([s.ra_deg for s in sources], dtype=float),
                                      np.array([s.dec_deg for s in sources], dtype=float),
                                      info, az_p, alt_p)
    return beam.power_lm(dl[:, :, None], dm[:, :, None], info.freqs_hz[None, None, :],
                         dn[:, :, None])


def _offsets_along_drift(ra_deg: np.ndarray, dec_deg: np.ndarray, info: MSInfo, az_deg: float,
                         alt_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dish-frame direction cosines (l, m, n) of each source for a dish fixed at (az, alt),
    each (nsrc, ntime); n is the cosine of the angle to the pointing."""
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    offline_astropy()
    loc = _location(info.itrf_centre_m)
    p_hat, e_l, e_m = dish_axes_enu(az_deg, alt_deg)
    frame = AltAz(obstime=Time(info.times_mjd[None, :], format="mjd", scale="utc"), location=loc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = SkyCoord(np.atleast_1d(ra_deg)[:, None] * u.deg,
                     np.atleast_1d(dec_deg)[:, None] * u.deg, frame="icrs").transform_to(frame)
    s_hat = enu_unit(c.az.deg, c.alt.deg)  # (nsrc, ntime, 3)
    return s_hat @ e_l, s_hat @ e_m, s_hat @ p_hat


def beam_along_drift(ra_deg: float, dec_deg: float, info: MSInfo, az_deg: float, alt_deg: float,
                     beam: PrimaryBeam = AIRY) -> np.ndarray:
    """Beam power toward (ra, dec) for a dish fixed at (az, alt), shape (ntime, nchan)."""
    dl, dm, dn = _offsets_along_drift(np.array([ra_deg]), np.array([dec_deg]), info, az_deg,
                                      alt_deg)
    return beam.power_lm(dl[0][:, None], dm[0][:, None], info.freqs_hz[None, :], dn[0][:, None])


def delay_path_m(uvw: np.ndarray, lmn: tuple[float, float, float]) -> np.ndarray:
    """u l + v m + w (n - 1) per row (metres): the path whose phase ``ft`` writes for a point
    source at ``lmn`` (sign and frame checked against ft, see :func:`write_model`)."""
    l_, m_, n_ = lmn
    return uvw[0] * l_ + uvw[1] * m_ + uvw[2] * (n_ - 1.0)


def phasors(path_m: np.ndarray, freqs_hz: np.ndarray, dtype: type = complex,
            out: np.ndarray | None = None) -> np.ndarray:
    """exp(2 pi i nu path / c), shape (nchan, nrow). Evenly spaced channels (every MS this
    pipeline writes) are stepped by one complex multiply per channel instead of an exp per
    value, ~5x cheaper; the rounding after 768 steps is ~1e-13 rad."""
    k = 2.0 * np.pi * freqs_hz / C_M_S  # rad per metre, per channel
    d = np.diff(freqs_hz)
    if out is None:
        out = np.empty((len(freqs_hz), len(path_m)), dtype=dtype)
    if len(freqs_hz) < 3 or not np.allclose(d, d[0], rtol=1e-9, atol=1e-3):
        out[:] = np.exp(1j * k[:, None] * path_m[None, :])
        return out
    out[0] = np.exp(1j * k[0] * path_m)
    step = np.exp(1j * (k[1] - k[0]) * path_m).astype(dtype)
    for c in range(1, len(freqs_hz)):
        np.multiply(out[c - 1], step, out=out[c])
    return out


def rows_to_integrations(times_mjd: np.ndarray, row_time_s: np.ndarray) -> np.ndarray:
    """Index into ``times_mjd`` (unique integration centres) of each row's TIME (seconds)."""
    it = np.searchsorted(times_mjd, row_time_s / MJD_S - 1e-9)
    return np.clip(it, 0, len(times_mjd) - 1)


def make_componentlist(cal: Calibrator, path: Path) -> Path:
    """A one-component list: point source with the catalogue flux and spectral index.

    Not used by the stage (see :func:`write_model`); kept as the CASA reference the direct
    model is checked against, and for operators who want to reproduce a model with ``ft``.
    """
    import casatools

    if path.exists():
        import shutil

        shutil.rmtree(path)
    cl = casatools.componentlist()
    try:
        cl.addcomponent(dir=f"J2000 {cal.ra_deg}deg {cal.dec_deg}deg", flux=cal.flux_jy,
                        fluxunit="Jy", freq=f"{cal.ref_freq_hz}Hz", shape="point",
                        spectrumtype="spectral index", index=cal.spectral_index)
        cl.rename(str(path))
    finally:
        cl.close()
    return path


def direction_cosines(ra_deg: float, dec_deg: float, ra0_deg: float,
                      dec0_deg: float) -> tuple[float, float, float]:
    """(l, m, n) of (ra, dec) relative to the phase centre (ra0, dec0), same frame (J2000)."""
    a, d, a0, d0 = map(np.radians, (ra_deg, dec_deg, ra0_deg, dec0_deg))
    l_ = np.cos(d) * np.sin(a - a0)
    m_ = np.sin(d) * np.cos(d0) - np.cos(d) * np.sin(d0) * np.cos(a - a0)
    return float(l_), float(m_), float(np.sqrt(max(0.0, 1.0 - l_ * l_ - m_ * m_)))


def _ensure_model_column(tb: Any, npol: int, nchan: int) -> None:
    """Add MODEL_DATA (tiled by whole rows, ~1.5 MB tiles) unless it exists."""
    if "MODEL_DATA" in tb.colnames():
        return
    desc = tb.getcoldesc("DATA")
    desc.pop("dataManagerGroup", None)
    desc.pop("dataManagerType", None)
    desc["comment"] = "model of the calibrator (dsa110-contimg)"
    rows = int(max(8, min(4096, (1 << 20) * 1.5 // (npol * nchan * 8))))
    dminfo = {"TYPE": "TiledShapeStMan", "NAME": "ModelTiled",
              "SPEC": {"DEFAULTTILESHAPE": np.array([npol, nchan, rows], dtype=np.int32)}}
    tb.addcols({"MODEL_DATA": desc}, dminfo)


def averaging_factor(path_m: np.ndarray, n_avg: int, native_width_hz: float) -> np.ndarray:
    """Mean of exp(i k path) over ``n_avg`` native channels about their centre, per row: the
    bandwidth smearing an ``n_avg``-channel average applied to the data (real, symmetric)."""
    if n_avg <= 1:
        return np.ones_like(path_m)
    offsets = (np.arange(n_avg) - (n_avg - 1) / 2.0) * native_width_hz
    return np.cos(2.0 * np.pi * np.outer(path_m, offsets) / C_M_S).mean(axis=1)


def write_model(ms: Path, cal: Calibrator, pointing_dec_deg: float,
                info: MSInfo | None = None, n_avg: int = 1,
                native_width_hz: float = 0.0, field: Sequence[Calibrator] = (),
                beam: PrimaryBeam = AIRY) -> dict[str, Any]:
    """MODEL_DATA = sum over ``cal`` and ``field`` of
    S(nu) B(t, nu) exp(+2 pi i (u l + v m + w (n - 1)) nu / c).

    This is exactly what ``ft`` of a component list (point sources, catalogue flux and
    spectral index) writes - the sign and frame were checked against ft (tests) - times the
    primary beam per integration and channel, computed in one pass: ft + a rescaling pass
    would write MODEL_DATA, read it back and write it again (52 s instead of ~15 s at full size).
    When ``ms`` averages ``n_avg`` native channels of ``native_width_hz``, the model carries
    the same smearing as the averaged data.
    """
    t0 = time.perf_counter()
    info = info or read_ms_info(ms)
    freqs = info.freqs_hz
    sources = [cal, *field]
    spectra = [np.array([s.flux_at(f) for f in freqs]) for s in sources]
    beams = list(beam_responses(sources, info, pointing_dec_deg, beam))  # (ntime, nchan) each
    lmns = [direction_cosines(s.ra_deg, s.dec_deg, *info.phase_centre_deg) for s in sources]
    with open_table(ms, readonly=False) as tb:
        npol = int(tb.getcell("DATA", 0).shape[0])
        _ensure_model_column(tb, npol, len(freqs))
        n = int(tb.nrows())
        for start in range(0, n, _ROWS_PER_CHUNK):
            nrow = min(_ROWS_PER_CHUNK, n - start)
            it = rows_to_integrations(info.times_mjd, tb.getcol("TIME", start, nrow))
            uvw = tb.getcol("UVW", start, nrow)  # (3, nrow)
            vis = np.zeros((len(freqs), nrow), dtype=complex)
            for spectrum, power, lmn in zip(spectra, beams, lmns, strict=True):
                path = delay_path_m(uvw, lmn)
                one = phasors(path, freqs)
                one *= spectrum[:, None] * power[it].T
                if n_avg > 1:
                    one *= averaging_factor(path, n_avg, native_width_hz)[None, :]
                vis += one
            tb.putcol("MODEL_DATA", np.broadcast_to(vis.astype(np.complex64), (npol,) + vis.shape),
                      start, nrow)
    first = beams[0]
    facts = {"calibrator": cal.name, "flux_jy": cal.flux_jy, "spectral_index": cal.spectral_index,
             "ref_freq_hz": cal.ref_freq_hz, "offset_from_phase_centre_deg":
             float(np.degrees(np.arccos(np.clip(lmns[0][2], -1, 1)))), "beam_min": float(first.min()),
             "beam_max": float(first.max()), "field_sources": len(field),
             "field_apparent_jy": float(sum(sp.mean() * b.mean() for sp, b in
                                            zip(spectra[1:], beams[1:], strict=True))),
             "model_apparent_jy": float(sum((sp[None, :] * b).mean() for sp, b in
                                            zip(spectra, beams, strict=True))),
             "beam": beam.describe(),
             "duration_s": time.perf_counter() - t0}
    log.info("model_written", ms=str(ms), **{k_: (round(v, 4) if isinstance(v, float) else v)
                                            for k_, v in facts.items()})
    return facts


def field_sources(catalogue: Sequence[Calibrator], cal: Calibrator | None, info: MSInfo,
                  pointing_dec_deg: float, min_apparent_jy: float,
                  radius_deg: float = 6.0, beam: PrimaryBeam = AIRY) -> list[Calibrator]:
    """Catalogue sources other than ``cal`` whose mean apparent flux over the group (beam per
    integration, band centre) is at least ``min_apparent_jy``, brightest first."""
    return [s for s, _ in apparent_sources(catalogue, cal, info, pointing_dec_deg,
                                           min_apparent_jy, radius_deg, beam)]


def apparent_sources(catalogue: Sequence[Calibrator], cal: Calibrator | None, info: MSInfo,
                     pointing_dec_deg: float, min_apparent_jy: float, radius_deg: float = 6.0,
                     beam: PrimaryBeam = AIRY) -> list[tuple[Calibrator, float]]:
    """(source, mean apparent flux in Jy over the group at the band centre) for catalogue
    sources within ``radius_deg`` of the phase centre, other than ``cal``, at least
    ``min_apparent_jy`` bright through the beam; brightest first."""
    centre = info.phase_centre_deg
    near = [s for s in catalogue
            if angular_separation_deg(s.ra_deg, s.dec_deg, *centre) < radius_deg
            and (cal is None
                 or angular_separation_deg(s.ra_deg, s.dec_deg, cal.ra_deg, cal.dec_deg) > 1 / 60)]
    if not near:
        return []
    fc = float(np.median(info.freqs_hz))
    probe = dataclasses.replace(info, freqs_hz=np.array([fc]))
    power = beam_responses(near, probe, pointing_dec_deg, beam)[:, :, 0].mean(axis=1)
    out = [(s, float(s.flux_at(fc) * b)) for s, b in zip(near, power, strict=True)]
    return sorted([x for x in out if x[1] >= min_apparent_jy], key=lambda x: -x[1])
