"""Write DSA-110-like UVH5 subband groups with a known sky and known corruptions.

Each group is 16 files ``<ts>_sbNN.hdf5`` (sb00 highest in frequency), unprojected drift scan
with the pointing declination in ``extra_keywords['phase_center_dec']`` (radians), plus
``<ts>_truth.json`` holding the sources, the gain parameters and the noise level, so every
later stage can be checked against what was put in.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ..catalogue.reference import angular_separation_deg, get_calibrator, load_calibrators
from ..instrument import offline_astropy
from .array import OVRO_ALT_M, OVRO_LAT_DEG, OVRO_LON_DEG, preset_stations, station_enu
from .counts import draw_counts_sky
from .fastsky import sum_point_sources
from .gains import draw_drift_params, draw_gain_params, evaluate_gains
from .rfi import RfiModel, draw_rfi
from .sky import airy_power, enu_unit, pointing_altaz
from .survey import CATALOGUE_NAME, NVSS_NAME, survey_view, write_nvss_tdat, write_survey_catalogue

N_SUBBANDS = 16
INTEGRATION_S = 12.884902
BAND_TOP_HZ = 1498.75e6
SUBBAND_WIDTH_HZ = 11.71875e6
BAND_CENTRE_HZ = BAND_TOP_HZ - N_SUBBANDS * SUBBAND_WIDTH_HZ / 2
BAND_WIDTH_HZ = N_SUBBANDS * SUBBAND_WIDTH_HZ
SKY_MODELS = ("preset", "counts")
COUNTS_RADIUS_DEG = 3.0  # beyond, the Airy main lobe is below 0.2 %
# sources never brighter than this through the beam are left out of the visibilities: far
# below the thermal noise of any image (they stay in the sky catalogues)
APPARENT_FLOOR_JY = 2e-5
FAULT_KINDS = ("truncated", "nothdf5", "channels", "nan", "inf", "zeros", "times", "antennas",
               "duplicate", "missing")


@dataclass(frozen=True)
class Preset:
    channels_per_subband: int
    n_times: int
    n_sources: int
    faint_flux_jy: tuple[float, float]
    field_radius_deg: float
    sefd_jy: float = 5800.0


PRESETS: dict[str, Preset] = {
    "tiny": Preset(4, 6, 3, (0.3, 1.0), 1.0),
    "small": Preset(12, 12, 5, (0.1, 0.8), 1.2),
    "full": Preset(48, 24, 8, (0.02, 1.0), 1.3),
}


def subband_freqs(sb: int, nchan: int, descending: bool) -> np.ndarray:
    """Channel centres of subband ``sb`` (sb00 at the top of the band)."""
    width = SUBBAND_WIDTH_HZ / nchan
    lo = BAND_TOP_HZ - (sb + 1) * SUBBAND_WIDTH_HZ
    f = lo + (np.arange(nchan) + 0.5) * width
    return f[::-1].copy() if descending else f


def _location():
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    return EarthLocation.from_geodetic(OVRO_LON_DEG * u.deg, OVRO_LAT_DEG * u.deg, OVRO_ALT_M * u.m)



def transit_time(ra_deg: float, dec_deg: float, after: datetime) -> datetime:
    """First meridian transit of (ra, dec) after ``after`` at OVRO."""
    offline_astropy()
    import astropy.units as u
    from astropy.coordinates import TETE, SkyCoord
    from astropy.time import Time

    t0 = Time(after)
    app = SkyCoord(ra_deg * u.deg, dec_deg * u.deg, frame="icrs").transform_to(TETE(obstime=t0))
    lst = t0.sidereal_time("apparent", longitude=OVRO_LON_DEG * u.deg).deg
    dha = (app.ra.deg - lst) % 360.0
    seconds = dha / 360.0 * 86164.0905
    return after + timedelta(seconds=seconds)


def _altaz(ra: np.ndarray, dec: np.ndarray, times_jd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    obstime = Time(times_jd[None, :], format="jd", scale="utc")
    frame = AltAz(obstime=obstime, location=_location())
    c = SkyCoord(ra[:, None] * u.deg, dec[:, None] * u.deg, frame="icrs").transform_to(frame)
    return c.az.deg, c.alt.deg


def _pointing_icrs(az: float, alt: float, jd: float) -> tuple[float, float]:
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    frame = AltAz(obstime=Time(jd, format="jd", scale="utc"), location=_location())
    c = SkyCoord(az=az * u.deg, alt=alt * u.deg, frame=frame).icrs
    return float(c.ra.deg), float(c.dec.deg)


def _draw_sources(rng: np.random.Generator, centre: tuple[float, float], preset: Preset,
                  avoid: list[tuple[float, float]], tag: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    placed = list(avoid)
    lo, hi = preset.faint_flux_jy
    while len(out) < preset.n_sources:
        r = preset.field_radius_deg * np.sqrt(rng.uniform(0.02, 1.0))
        pa = rng.uniform(0, 2 * np.pi)
        dec = centre[1] + r * np.cos(pa)
        ra = centre[0] + r * np.sin(pa) / np.cos(np.radians(dec))
        if any(angular_separation_deg(ra, dec, a, d) < 0.35 for a, d in placed):
            continue
        placed.append((ra, dec))
        flux = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        out.append({"name": f"{tag}-S{len(out) + 1}", "ra_deg": ra % 360.0, "dec_deg": dec,
                    "flux_jy": round(flux, 5), "spectral_index": round(float(rng.uniform(-1.0, 0.0)), 3),
                    "ref_freq_hz": 1.4e9, "is_calibrator": False})
    return out


def simulate_groups(outdir: Path, preset: str = "tiny", groups: int = 1, start: datetime | None = None,
                    seed: int = 0, calibrator: str = "3C286", dec_deg: float | None = None,
                    jitter_s: float = 0.0, write_delay_s: float = 0.0, chunks: int = 8,
                    faults: dict[int, str] | None = None, fault_group: int = 0,
                    descending_channels: bool = True, rfi: bool = False,
                    gain_drift: bool = False, sky_model: str = "preset",
                    cadence_s: float | None = None, counts_min_jy: float = 0.002,
                    log=None) -> list[dict[str, Any]]:
    """Write ``groups`` groups into ``outdir``; return their truth records.

    ``rfi`` adds interference of known footprint to every group (:mod:`.rfi`), recorded in
    the truth under ``rfi``. ``gain_drift`` adds the slow absolute-time gain drift of
    :func:`.gains.draw_drift_params` (the same for every run with this seed).
    ``sky_model`` 'preset' places the preset's few sources per group; 'counts' draws a
    realistic sky from 1.4 GHz source counts (:mod:`.counts`: hundreds per field, 2 mJy to a
    few Jy, with spectral indices; ``counts_min_jy`` sets the faint end). ``cadence_s`` spaces the group starts (default: back to
    back, as the telescope writes them), e.g. 3600 for one group an hour.
    Besides the truth, the sky is written as the project's CSV (``sky_catalogue.csv``) and as
    an NVSS-format TDAT survey of it (``sky_nvss.tdat``: >= 5 mJy, 3 % flux and NVSS-like
    position errors, no spectral indices).
    """
    offline_astropy()
    p = PRESETS[preset]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    faults = dict(faults or {})
    for kind in faults.values():
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; choose from {', '.join(FAULT_KINDS)}")

    cal = None if calibrator.lower() == "none" else get_calibrator(calibrator)
    point_dec = dec_deg if dec_deg is not None else (cal.dec_deg + 0.2 if cal else 30.0)
    group_len = p.n_times * INTEGRATION_S
    if start is None:
        if cal is None:
            start = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
        else:
            transit = transit_time(cal.ra_deg, cal.dec_deg, datetime(2026, 6, 1, tzinfo=UTC))
            start = transit - timedelta(seconds=group_len / 2)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    start = start.replace(microsecond=0)

    stations, dead = preset_stations(preset)
    enu_all = station_enu()
    enu = np.array([enu_all[s] for s in stations])
    gain_params = draw_gain_params(stations, 2, rng)
    if gain_drift:
        gain_params["drift"] = draw_drift_params(len(stations), 2, seed)
    az_p, alt_p = pointing_altaz(point_dec, OVRO_LAT_DEG)
    p_hat = enu_unit(np.array(az_p), np.array(alt_p))

    if sky_model not in SKY_MODELS:
        raise ValueError(f"unknown sky model {sky_model!r}; one of {', '.join(SKY_MODELS)}")
    step = group_len if cadence_s is None else float(cadence_s)
    if step < group_len:
        raise ValueError(f"cadence {step} s is shorter than a group ({group_len:.1f} s)")
    starts = [start + timedelta(seconds=k * step) for k in range(groups)]
    # One sky for the whole run: catalogue calibrators near the strip plus faint sources per group.
    sky: list[dict[str, Any]] = []
    centres = []
    for g0 in starts:
        mid_jd = _jd(g0) + group_len / 2 / 86400.0
        centres.append(_pointing_icrs(az_p, alt_p, mid_jd))
    for c in load_calibrators():
        if any(angular_separation_deg(c.ra_deg, c.dec_deg, *ce) < 4.0 for ce in centres):
            sky.append({"name": c.name, "ra_deg": c.ra_deg, "dec_deg": c.dec_deg,
                        "flux_jy": c.flux_jy, "spectral_index": c.spectral_index,
                        "ref_freq_hz": c.ref_freq_hz, "is_calibrator": True})
    if sky_model == "counts":
        sky.extend(draw_counts_sky(np.random.default_rng([seed, 0xC0]), centres,
                                   COUNTS_RADIUS_DEG, min_flux_jy=counts_min_jy,
                                   avoid=[(s["ra_deg"], s["dec_deg"]) for s in sky]))
    else:
        for k, ce in enumerate(centres):
            avoid = [(s["ra_deg"], s["dec_deg"]) for s in sky]
            sky.extend(_draw_sources(rng, ce, p, avoid, tag=f"G{k}"))

    band = np.concatenate([subband_freqs(sb, p.channels_per_subband, False)
                           for sb in range(N_SUBBANDS)])
    truths = []
    for k, g0 in enumerate(starts):
        # its own generator: the same seed gives the same sky and noise with or without
        interference = (draw_rfi(np.random.default_rng([seed, k, 0x5F1]), band, p.n_times,
                                 _noise_sigma(p)) if rfi else None)
        # a drawn sky exists only around the pointings: each group sees the part drawn
        # around its own (beyond, an artefact of drawing sources near the pointings only)
        seen = sky if sky_model != "counts" else [
            s for s in sky if angular_separation_deg(s["ra_deg"], s["dec_deg"], *centres[k])
            <= COUNTS_RADIUS_DEG + 1.0]
        truth = _write_group(outdir, preset, p, g0, stations, dead, enu, gain_params, p_hat,
                             point_dec, seen, rng, jitter_s, write_delay_s, chunks,
                             faults if k == fault_group else {}, descending_channels, seed,
                             interference, log,
                             APPARENT_FLOOR_JY if sky_model == "counts" else 0.0)
        truths.append(truth)
    write_survey_catalogue(outdir / CATALOGUE_NAME, sky, seed=seed)
    write_nvss_tdat(outdir / NVSS_NAME, survey_view(sky, seed=seed))
    return truths


def _noise_sigma(p: Preset) -> float:
    """Thermal noise (Jy) of the real or imaginary part of one visibility."""
    return float(p.sefd_jy / np.sqrt(2 * SUBBAND_WIDTH_HZ / p.channels_per_subband * INTEGRATION_S))


def _jd(dt: datetime) -> float:
    return dt.timestamp() / 86400.0 + 2440587.5


def _write_group(outdir, preset_name, p: Preset, g0: datetime, stations, dead, enu, gain_params,
                 p_hat, point_dec, sky, rng, jitter_s, write_delay_s, chunks, faults,
                 descending, seed, rfi: RfiModel | None, log,
                 floor_jy: float = 0.0) -> dict[str, Any]:
    from pyuvdata import Telescope, UVData
    from pyuvdata.utils import ECEF_from_ENU

    group_id = g0.strftime("%Y-%m-%dT%H:%M:%S")
    jd0 = _jd(g0)
    times = jd0 + (np.arange(p.n_times) + 0.5) * INTEGRATION_S / 86400.0
    mid_jd = jd0 + p.n_times * INTEGRATION_S / 2 / 86400.0
    loc = _location()
    ecef = ECEF_from_ENU(enu, center_loc=loc)
    rel = ecef - np.array([loc.x.value, loc.y.value, loc.z.value])
    telescope = Telescope.new(
        name="OVRO_DSA", location=loc, antenna_positions=rel,
        antenna_names=[str(s) for s in stations], antenna_numbers=list(stations),
        instrument="DSA", antenna_diameters=[4.65] * len(stations),
        feeds=["x", "y"], mount_type="alt-az", x_orientation="east")
    n = len(stations)
    antpairs = [(stations[i], stations[j]) for i in range(n) for j in range(i, n)]
    idx = {s: i for i, s in enumerate(stations)}
    a1 = np.array([idx[a] for a, _ in antpairs])
    a2 = np.array([idx[b] for _, b in antpairs])
    nbl = len(antpairs)

    ra = np.array([s["ra_deg"] for s in sky])
    dec = np.array([s["dec_deg"] for s in sky])
    az, alt = _altaz(ra, dec, times)  # (nsrc, nt)
    s_hat = enu_unit(az, alt)  # (nsrc, nt, 3)
    theta = np.arccos(np.clip(s_hat @ p_hat, -1, 1))  # (nsrc, nt)
    bvec = enu[a2] - enu[a1]  # (nbl, 3): pyuvdata uvw = ant2 - ant1
    # geometric delay (m) relative to the zenith phase centre, per source, time, baseline
    zen = np.array([0.0, 0.0, 1.0])
    dgeo = np.einsum("bk,stk->stb", bvec, s_hat - zen)  # (nsrc, nt, nbl)
    dead_mask = np.isin(np.array(stations)[a1], dead) | np.isin(np.array(stations)[a2], dead)
    auto = a1 == a2

    gains_all = None
    truth_sources = []
    visible = []
    for s_i, src in enumerate(sky):
        pb_c = airy_power(theta[s_i], BAND_CENTRE_HZ)
        flux_c = src["flux_jy"] * (BAND_CENTRE_HZ / src["ref_freq_hz"]) ** src["spectral_index"]
        if floor_jy > 0 and flux_c * max(float(pb_c.max()), float(airy_power(
                theta[s_i], BAND_TOP_HZ - BAND_WIDTH_HZ).max())) < floor_jy:
            continue
        visible.append(s_i)
        truth_sources.append({**src, "flux_at_band_centre_jy": flux_c,
                              "pb_mean": float(pb_c.mean()),
                              "apparent_flux_jy": float(flux_c * pb_c.mean()),
                              "transits_in_group": bool(src["is_calibrator"] and _transits(
                                  az[s_i], alt[s_i]))})

    s_flux = np.array([sky[i]["flux_jy"] for i in visible], dtype=float)
    s_ref = np.array([sky[i]["ref_freq_hz"] for i in visible], dtype=float)
    s_index = np.array([sky[i]["spectral_index"] for i in visible], dtype=float)
    dgeo_visible = np.ascontiguousarray(dgeo[visible])
    files = []
    sb_jitter = {sb: (float(rng.uniform(0, jitter_s)) if jitter_s > 0 else 0.0)
                 for sb in range(N_SUBBANDS)}
    all_freqs = []
    for sb in range(N_SUBBANDS):
        kind = faults.get(sb)
        if kind == "missing":
            continue
        nchan = p.channels_per_subband - (1 if kind == "channels" else 0)
        freqs = subband_freqs(sb, nchan, descending)
        all_freqs.append(freqs)
        width = (-1 if descending else 1) * SUBBAND_WIDTH_HZ / p.channels_per_subband
        vis = np.zeros((p.n_times, nbl, nchan), dtype=np.complex128)
        if visible:
            spec = s_flux[:, None] * (freqs[None, :] / s_ref[:, None]) ** s_index[:, None]
            amp = spec[:, None, :] * airy_power(theta[visible][:, :, None],
                                                freqs[None, None, :])  # (nsrc, nt, nf)
            sum_point_sources(amp, dgeo_visible, freqs, vis)
        if rfi is not None:
            interference = rfi.visibilities(freqs, p.n_times, bvec, ~auto)
            if interference is not None:
                vis += interference
        g = evaluate_gains(gain_params, freqs, times, BAND_CENTRE_HZ, BAND_WIDTH_HZ, mid_jd)
        gains_all = g
        data = np.empty((p.n_times, nbl, nchan, 2), dtype=np.complex64)
        sigma = p.sefd_jy / np.sqrt(2 * abs(width) * INTEGRATION_S)
        for pol in range(2):
            gp = g[a1][:, :, :, pol].transpose(1, 0, 2) * np.conj(g[a2][:, :, :, pol].transpose(1, 0, 2))
            v = vis * gp
            v[:, auto, :] += p.sefd_jy * gp[:, auto, :].real
            noise = rng.normal(0, sigma, v.shape) + 1j * rng.normal(0, sigma, v.shape)
            noise[:, auto, :] = rng.normal(0, p.sefd_jy / np.sqrt(abs(width) * INTEGRATION_S),
                                           (p.n_times, int(auto.sum()), nchan))
            v += noise
            v[:, auto, :] = v[:, auto, :].real
            v[:, dead_mask, :] = 0
            data[..., pol] = v
        data = data.reshape(p.n_times * nbl, nchan, 2)
        if kind == "nan":
            data[:] = np.nan
        elif kind == "inf":
            data[:] = np.inf
        elif kind == "zeros":
            data[:] = 0
        sb_times = times + (INTEGRATION_S / 86400.0 if kind == "times" else 0.0)
        uv = UVData.new(freq_array=freqs, polarization_array=["xx", "yy"], times=sb_times,
                        telescope=telescope, antpairs=antpairs, do_blt_outer=True,
                        time_axis_faster_than_bls=False, integration_time=INTEGRATION_S,
                        channel_width=width, data_array=data,
                        flag_array=np.zeros(data.shape, dtype=bool),
                        nsample_array=np.ones(data.shape, dtype=np.float32),
                        vis_units="uncalib",
                        history=f"dsa110-contimg simulator preset={preset_name} seed={seed}")
        uv.extra_keywords["phase_center_dec"] = float(np.radians(point_dec))
        uv.extra_keywords["applied_delays_ns"] = "0"
        if kind == "antennas":
            keep = [s for s in stations if s != stations[-1]]
            uv.select(antenna_nums=keep)
        ts = (g0 + timedelta(seconds=sb_jitter[sb])).strftime("%Y-%m-%dT%H:%M:%S")
        path = outdir / f"{ts}_sb{sb:02d}.hdf5"
        _publish(uv, path, kind, write_delay_s, chunks)
        files.append(path.name)
        if kind == "duplicate":
            dup = outdir / f"{(g0 + timedelta(seconds=2)).strftime('%Y-%m-%dT%H:%M:%S')}_sb{sb:02d}.hdf5"
            _publish(uv, dup, None, write_delay_s, chunks)
            files.append(dup.name)
        if log:
            log(f"wrote {path.name}")

    freqs_all = np.sort(np.concatenate(all_freqs)) if all_freqs else np.array([])
    truth = {
        "group_id": group_id, "preset": preset_name, "seed": seed, "files": files,
        "faults": {f"sb{k:02d}": v for k, v in faults.items()},
        "times_jd": times.tolist(), "mid_jd": mid_jd, "integration_s": INTEGRATION_S,
        "freq_hz": {"band_top": BAND_TOP_HZ, "band_centre": BAND_CENTRE_HZ,
                    "band_width": BAND_WIDTH_HZ, "n_channels": int(freqs_all.size),
                    "min": float(freqs_all.min()) if freqs_all.size else None,
                    "max": float(freqs_all.max()) if freqs_all.size else None},
        "channels_descending_in_subband": descending,
        "pointing": {"dec_deg": point_dec, "az_deg": float(p_hat[0]), "alt_deg": None},
        "antennas": {"stations": list(stations), "dead": list(dead),
                     "enu_m": enu.round(4).tolist()},
        "sefd_jy": p.sefd_jy,
        "noise_sigma_jy": _noise_sigma(p),
        "rfi": rfi.as_dict() if rfi is not None else None,
        "sources": truth_sources,
        "gains": gain_params,
        "gain_model": "g = A(t) exp(i phi(t)) B(nu) exp(-2 pi i (nu - band_centre) tau); V_pq = g_p conj(g_q) V",
    }
    az_p, alt_p = pointing_altaz(point_dec, OVRO_LAT_DEG)
    truth["pointing"].update({"az_deg": az_p, "alt_deg": alt_p})
    tpath = outdir / f"{group_id}_truth.json"
    tmp = tpath.with_name("." + tpath.name + ".tmp")
    tmp.write_text(json.dumps(truth, indent=1))
    tmp.replace(tpath)
    del gains_all
    return truth


def _transits(az: np.ndarray, alt: np.ndarray) -> bool:
    """Does the source cross the meridian during these integrations?"""
    ha_sign = np.sign(np.sin(np.radians(az)))  # east (az<180) before transit, west after
    return bool(ha_sign.min() < 0 < ha_sign.max()) or bool(np.any(np.abs(np.sin(np.radians(az))) < 1e-4))


def _publish(uv, path: Path, kind: str | None, write_delay_s: float, chunks: int) -> None:
    tmp = path.with_name("." + path.name + ".partial")
    if kind == "nothdf5":
        tmp.write_bytes(b"this is not an HDF5 file\n" * 100)
        tmp.replace(path)
        return
    uv.write_uvh5(str(tmp), clobber=True)
    if kind == "truncated":
        size = tmp.stat().st_size
        with open(tmp, "r+b") as fh:
            fh.truncate(size // 2)
    if write_delay_s <= 0:
        tmp.replace(path)
        return
    # Write in place, slowly, as the correlator does: visible before it is complete.
    payload = tmp.read_bytes()
    tmp.unlink()
    step = max(1, len(payload) // max(1, chunks))
    with open(path, "wb") as fh:
        for off in range(0, len(payload), step):
            fh.write(payload[off:off + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(write_delay_s / max(1, chunks))
