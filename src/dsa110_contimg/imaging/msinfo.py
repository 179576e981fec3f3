"""Read what imaging needs from an MS (casatools ``table``), and refuse unusable ones early.

One pass over FLAG (in row chunks, so memory stays flat at full size) gives the unflagged
count per row; UVW of the live rows gives the longest baseline, max |w| and the uv sample for
the Briggs noise penalty. The visibility noise is measured on a few thousand rows spread over
the MS, from the XX - YY difference (unpolarised sky cancels, calibrated noise does not); a
robust (MAD) estimate so the odd strong polarised source does not matter.

An MS with no rows, everything flagged, or unflagged samples that are all NaN/Inf/zero raises
``BadInputError``: tclean would either fail or, worse, return an all-NaN image with a success
code (measured: one NaN in 2 % of rows blanks the whole image), and re-running cannot help.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import structlog

from ..errors import BadInputError
from ..instrument import offline_astropy, pointing_altaz
from ..products import CONVERSION_RECORD
from .params import MSSummary

log = structlog.get_logger(__name__)

_COLUMNS = {"corrected": "CORRECTED_DATA", "data": "DATA", "model": "MODEL_DATA"}
_SAMPLE_ROWS = 4000
_CHUNK_SAMPLES = 16_000_000  # flags read per chunk (bytes of bool)


def data_column_name(datacolumn: str) -> str:
    try:
        return _COLUMNS[datacolumn.lower()]
    except KeyError:
        raise ValueError(f"datacolumn {datacolumn!r} is not one of {', '.join(_COLUMNS)}") from None


def summarize_ms(ms_path: Path, datacolumn: str = "corrected") -> MSSummary:
    """Summarise ``ms_path`` for the builder; ``BadInputError`` when nothing can be imaged."""
    import casatools

    ms_path = Path(ms_path)
    column = data_column_name(datacolumn)
    if not (ms_path / "table.dat").exists():
        raise BadInputError("not a measurement set (no table.dat)", path=str(ms_path))
    tb = casatools.table()
    tb.open(str(ms_path))
    try:
        nrows = int(tb.nrows())
        if nrows == 0:
            raise BadInputError("the MS has no rows", path=str(ms_path))
        if column not in tb.colnames():
            raise BadInputError(f"the MS has no {column} column to image (datacolumn="
                                f"{datacolumn!r})", path=str(ms_path))
        a1 = tb.getcol("ANTENNA1")
        a2 = tb.getcol("ANTENNA2")
        uvw = tb.getcol("UVW")  # (3, nrow)
        times = tb.getcol("TIME")
        interval = tb.getcol("INTERVAL")
        flag_row = tb.getcol("FLAG_ROW")
        keywords = tb.getkeywords()
        live_count = _unflagged_per_row(tb, nrows)
        live_count[(a1 == a2) | flag_row] = 0
        n_unflagged = int(live_count.sum())
        if n_unflagged == 0:
            raise BadInputError("every cross-correlation is flagged: nothing to image",
                                path=str(ms_path))
        shape = tb.getcell(column, int(np.argmax(live_count > 0))).shape  # (ncorr, nchan)
        sample = _sample_rows(tb, column, live_count)
    finally:
        tb.close()

    live = live_count > 0
    nonfinite_frac, zero_frac, vis_sigma = _noise_from_sample(*sample)
    if nonfinite_frac >= 1.0:
        raise BadInputError(f"every sampled unflagged {column} value is NaN/Inf",
                            path=str(ms_path))
    if nonfinite_frac > 0:
        raise BadInputError(
            f"{100 * nonfinite_frac:.2g} % of sampled unflagged {column} values are NaN/Inf; "
            "tclean would blank the whole image (flag them upstream)", path=str(ms_path))
    if zero_frac >= 0.99:
        raise BadInputError(f"unflagged {column} values are all zero", path=str(ms_path))
    if zero_frac > 0.01:
        # unflagged zeros are imaged as zero-flux samples and bias every flux low
        log.warning("imaging.unflagged_zeros", ms=str(ms_path), fraction=round(zero_frac, 4))

    uv = uvw[:2, live].T.copy()
    max_uv = float(np.max(np.hypot(uv[:, 0], uv[:, 1])))
    max_w = float(np.max(np.abs(uvw[2, live])))
    utimes, tidx = np.unique(times, return_inverse=True)
    tweights = np.bincount(tidx, weights=live_count, minlength=utimes.size)
    keep = tweights > 0
    utimes, tweights = utimes[keep], tweights[keep]
    freqs, chans, diam, centre_itrf, telescope, observer, pc = _subtables(ms_path, a1[live], a2[live])
    ants = np.unique(np.concatenate([a1[live], a2[live]]))

    offline_astropy()
    mid_s = float(0.5 * (utimes.min() + utimes.max()))
    az, alt, source = _pointing_altaz(keywords, pc, centre_itrf, mid_s)
    p_ra, p_dec = pointing_icrs(az, alt, centre_itrf, np.array([mid_s]))
    summary = MSSummary(
        ms_path=str(ms_path), datacolumn=datacolumn.lower(), n_rows=nrows,
        n_unflagged=n_unflagged, n_corr=int(shape[0]), n_antennas=int(ants.size),
        n_channels=int(freqs.size), freq_min_hz=float(freqs.min()),
        freq_max_hz=float(freqs.max()), max_uv_m=max_uv, max_w_m=max_w,
        phase_centre_ra_deg=pc[0], phase_centre_dec_deg=pc[1],
        pointing_ra_deg=float(p_ra[0]), pointing_dec_deg=float(p_dec[0]),
        pointing_az_deg=az, pointing_alt_deg=alt, pointing_source=source,
        times_mjd_s=tuple(float(t) for t in utimes),
        time_weights=tuple(float(w) for w in tweights),
        integration_s=float(np.median(interval[live])), dish_diameter_m=diam,
        telescope=telescope, observer=observer, vis_sigma_jy=vis_sigma,
        array_itrf_m=tuple(float(x) for x in centre_itrf),
        sampled_nonfinite_fraction=nonfinite_frac, sampled_zero_fraction=zero_frac, uv_m=uv,
        chan_width_hz=chans[0], chans_per_spw=chans[1])
    log.info("imaging.ms_summary", ms=str(ms_path), rows=nrows, unflagged=n_unflagged,
             antennas=summary.n_antennas, max_uv_m=round(max_uv, 1), max_w_m=round(max_w, 1),
             vis_sigma_jy=vis_sigma, pointing=source)
    return summary


def count_unflagged_nonfinite(ms_path: Path, datacolumn: str) -> int:
    """Unflagged NaN/Inf values in the whole data column (chunked; the slow, thorough check
    made only after tclean has produced a non-finite image the sampled check missed)."""
    import casatools

    column = data_column_name(datacolumn)
    tb = casatools.table()
    tb.open(str(ms_path))
    try:
        nrows = int(tb.nrows())
        cell = tb.getcell("FLAG", 0).shape if nrows else (1, 1)
        step = max(1, _CHUNK_SAMPLES // 8 // max(1, int(np.prod(cell))))
        bad = 0
        for start in range(0, nrows, step):
            n = min(step, nrows - start)
            data = tb.getcol(column, start, n)
            flags = tb.getcol("FLAG", start, n)
            bad += int((~np.isfinite(data) & ~flags).sum())
    finally:
        tb.close()
    return bad


def _unflagged_per_row(tb, nrows: int) -> np.ndarray:
    cell = tb.getcell("FLAG", 0).shape
    step = max(1, _CHUNK_SAMPLES // max(1, int(np.prod(cell))))
    out = np.empty(nrows, dtype=np.int64)
    for start in range(0, nrows, step):
        n = min(step, nrows - start)
        f = tb.getcol("FLAG", start, n)  # (ncorr, nchan, n)
        out[start:start + n] = (~f).sum(axis=(0, 1))
    return out


def _sample_rows(tb, column: str, live_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data, flags) of ~_SAMPLE_ROWS rows in 8 contiguous blocks spread over the MS.

    Contiguous blocks, not a row stride: a stride touches every storage tile and would read
    most of a 5 GB column.
    """
    nrows = live_count.size
    nblocks = 8
    block = max(1, min(nrows, _SAMPLE_ROWS // nblocks))
    starts = np.unique(np.linspace(0, nrows - block, nblocks).astype(int))
    datas, flags = [], []
    for start in starts:
        d = tb.getcol(column, int(start), block)
        f = tb.getcol("FLAG", int(start), block)
        dead = live_count[start:start + block] == 0
        datas.append(d)
        flags.append(f | dead[None, None, :])
    return np.concatenate(datas, axis=2), np.concatenate(flags, axis=2)


def _noise_from_sample(data: np.ndarray, flags: np.ndarray) -> tuple[float, float, float | None]:
    """(non-finite fraction, zero fraction, per-correlation real-part sigma) of the sample."""
    good = ~flags
    n_good = int(good.sum())
    if n_good == 0:
        return 0.0, 0.0, None
    vals = data[good]
    finite = np.isfinite(vals)
    nonfinite = 1.0 - float(finite.mean())
    zero = float((vals[finite] == 0).mean()) if finite.any() else 0.0
    ok = good & np.isfinite(data)
    if data.shape[0] >= 2:
        both = ok[0] & ok[-1]
        diff = (data[0] - data[-1])[both]
        scale = math.sqrt(2.0)  # the difference of two correlations
    else:
        both = ok[0, 1:] & ok[0, :-1]
        diff = (data[0, 1:] - data[0, :-1])[both]
        scale = math.sqrt(2.0)
    if diff.size < 10:
        return nonfinite, zero, None
    comps = np.concatenate([diff.real, diff.imag])
    mad = float(np.median(np.abs(comps - np.median(comps))))
    sigma = 1.4826 * mad / scale
    return nonfinite, zero, (sigma if sigma > 0 else None)


def _subtables(ms_path: Path, a1: np.ndarray, a2: np.ndarray):
    import casatools

    tb = casatools.table()
    tb.open(str(ms_path / "SPECTRAL_WINDOW"))
    try:
        chan = tb.getvarcol("CHAN_FREQ")
        freqs = np.concatenate([np.ravel(v) for v in chan.values()])
        widths = tb.getvarcol("CHAN_WIDTH")
        chan_width = float(max(np.max(np.abs(np.ravel(v))) for v in widths.values()))
        chans_per_spw = math.gcd(*(np.ravel(v).size for v in chan.values()))  # every window divides
    finally:
        tb.close()
    used = np.unique(np.concatenate([a1, a2]))
    tb.open(str(ms_path / "ANTENNA"))
    try:
        diam_all = tb.getcol("DISH_DIAMETER")
        pos = tb.getcol("POSITION")  # (3, nant) ITRF metres
    finally:
        tb.close()
    diam = float(np.median(diam_all[used]))
    centre = pos[:, used].mean(axis=1)
    telescope, observer = "", ""
    tb.open(str(ms_path / "OBSERVATION"))
    try:
        if tb.nrows():
            telescope = str(tb.getcell("TELESCOPE_NAME", 0))
            observer = str(tb.getcell("OBSERVER", 0))
    finally:
        tb.close()
    tb.open(str(ms_path / "FIELD"))
    try:
        pd = tb.getcol("PHASE_DIR")  # (2, npoly, nfield) radians
        ref = tb.getcolkeywords("PHASE_DIR").get("MEASINFO", {}).get("Ref", "J2000")
    finally:
        tb.close()
    if ref not in ("J2000", "ICRS"):
        log.warning("imaging.phase_dir_frame", frame=ref, note="treated as ICRS")
    pc = (math.degrees(float(pd[0, 0, 0])) % 360.0, math.degrees(float(pd[1, 0, 0])))
    return freqs, (chan_width, chans_per_spw), diam, centre, telescope, observer, pc


def _location(centre_itrf: np.ndarray):
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    return EarthLocation.from_geocentric(*centre_itrf, unit=u.m)


def _pointing_altaz(keywords: dict, pc: tuple[float, float], centre_itrf: np.ndarray,
                    mid_s: float) -> tuple[float, float, str]:
    """The drift scan's fixed (az, alt) and where it came from.

    In order: the conversion stage's record (``contimg_conversion.pointing_dec_deg``: the
    declination it phased to, after its own fallbacks), the correlator's ``phase_center_dec``
    (radians, kept by conversion in ``pyuvdata_extra``), both on the meridian as DSA-110
    always points; otherwise the phase centre at mid-group, which conversion puts on the
    meridian at the pointing declination, so it is the beam centre unless the MS was rephased.
    """
    loc = _location(centre_itrf)
    lat = float(loc.lat.deg)
    record = keywords.get(CONVERSION_RECORD)
    if isinstance(record, dict) and "pointing_dec_deg" in record:
        az, alt = pointing_altaz(float(record["pointing_dec_deg"]), lat)
        return float(az), float(alt), "contimg_conversion.pointing_dec_deg"
    extra = keywords.get("pyuvdata_extra")
    if isinstance(extra, dict) and "phase_center_dec" in extra:
        az, alt = pointing_altaz(math.degrees(float(extra["phase_center_dec"])), lat)
        return float(az), float(alt), "pyuvdata_extra.phase_center_dec"
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    frame = AltAz(obstime=Time(mid_s / 86400.0, format="mjd", scale="utc"), location=loc)
    c = SkyCoord(pc[0] * u.deg, pc[1] * u.deg, frame="icrs").transform_to(frame)
    return float(c.az.deg), float(c.alt.deg), "phase centre at mid-group"


def pointing_icrs(az_deg: float, alt_deg: float, centre_itrf: np.ndarray | None,
                  times_mjd_s: np.ndarray, location=None) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (ra, dec) in degrees of the fixed (az, alt) pointing at each time."""
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    loc = location if location is not None else _location(centre_itrf)
    t = Time(np.asarray(times_mjd_s, dtype=float) / 86400.0, format="mjd", scale="utc")
    frame = AltAz(obstime=t, location=loc)
    n = t.size
    c = SkyCoord(az=np.full(n, az_deg) * u.deg, alt=np.full(n, alt_deg) * u.deg, frame=frame).icrs
    return np.asarray(c.ra.deg), np.asarray(c.dec.deg)
