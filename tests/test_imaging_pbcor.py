"""The drift-averaged primary beam against an independent AltAz computation (no CASA)."""

from __future__ import annotations

import numpy as np
import pytest

from dsa110_contimg.imaging.msinfo import pointing_icrs
from dsa110_contimg.imaging.pbcor import beam_on_wcs, drift_averaged_beam
from dsa110_contimg.instrument import PrimaryBeam, offline_astropy
from dsa110_contimg.simulate.array import OVRO_ALT_M, OVRO_LAT_DEG, OVRO_LON_DEG
from dsa110_contimg.simulate.sky import airy_power, enu_unit, pointing_altaz

AIRY = PrimaryBeam.airy(4.65)
FREQ = 1.405e9


def _location():
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    return EarthLocation.from_geodetic(OVRO_LON_DEG * u.deg, OVRO_LAT_DEG * u.deg, OVRO_ALT_M * u.m)


def _track(dec: float, n: int = 24, span_s: float = 309.2):
    """Beam-centre track of a full-length group transiting at 2026-06-01 05:00 UTC."""
    offline_astropy()
    mjd0 = 61192.0 + 5 / 24
    times = (mjd0 * 86400.0) + np.linspace(-span_s / 2, span_s / 2, n)
    az, alt = pointing_altaz(dec, OVRO_LAT_DEG)
    ra, de = pointing_icrs(az, alt, None, times, location=_location())
    return times, az, alt, ra, de


def _altaz_truth(ra: float, dec: float, times_s: np.ndarray, az: float, alt: float) -> float:
    """The simulator's way: the source in AltAz at each time, angle to the fixed pointing."""
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    frame = AltAz(obstime=Time(times_s / 86400.0, format="mjd", scale="utc"), location=_location())
    c = SkyCoord(np.full(times_s.size, ra) * u.deg, np.full(times_s.size, dec) * u.deg,
                 frame="icrs").transform_to(frame)
    s_hat = enu_unit(c.az.deg, c.alt.deg)
    p_hat = enu_unit(np.array(az), np.array(alt))
    theta = np.arccos(np.clip(s_hat @ p_hat, -1, 1))
    return float(airy_power(theta, FREQ).mean())


def test_drift_averaged_beam_matches_altaz_truth_over_a_full_group():
    times, az, alt, ra_t, dec_t = _track(30.7)
    mid = len(times) // 2
    for d_ra, d_dec in [(0.0, 0.0), (0.8, 0.3), (-1.2, -0.5), (0.3, 1.4)]:
        ra = float(ra_t[mid]) + d_ra
        dec = float(dec_t[mid]) + d_dec
        truth = _altaz_truth(ra, dec, times, az, alt)
        ours = float(drift_averaged_beam(ra, dec, ra_t, dec_t, None, FREQ, AIRY))
        assert ours == pytest.approx(truth, abs=2e-4)
        # and the difference from a single mid-group beam is large enough to matter
        single = float(drift_averaged_beam(ra, dec, ra_t[mid:mid + 1], dec_t[mid:mid + 1], None,
                                           FREQ, AIRY))
        if d_ra or d_dec:
            assert abs(single - truth) > 5 * abs(ours - truth)


def test_weights_follow_the_unflagged_data():
    times, az, alt, ra_t, dec_t = _track(30.7, n=4)
    ra, dec = float(ra_t[0]), float(dec_t[0])
    only_first = drift_averaged_beam(ra, dec, ra_t, dec_t, np.array([1, 0, 0, 0]), FREQ, AIRY)
    assert float(only_first) == pytest.approx(1.0, abs=1e-9)


def test_beam_on_a_wcs_grid_interpolates_accurately():
    from astropy.wcs import WCS

    times, az, alt, ra_t, dec_t = _track(30.7)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = [float(ra_t[12]), float(dec_t[12])]
    w.wcs.crpix = [601.0, 601.0]
    w.wcs.cdelt = [-12.0 / 3600, 12.0 / 3600]
    shape = (1200, 1200)
    fast = beam_on_wcs(w, shape, ra_t, dec_t, None, FREQ, AIRY, max_nodes=128)
    ys, xs = np.mgrid[0:1200:37, 0:1200:41]
    ra, dec = w.pixel_to_world_values(xs, ys)
    exact = drift_averaged_beam(ra, dec, ra_t, dec_t, None, FREQ, AIRY)
    assert np.max(np.abs(fast[ys, xs] - exact)) < 1e-4
    # 1.1 deg of drift in a full group smears the beam: its peak is ~0.96, not 1
    assert 0.9 < fast.max() < 0.99
    peak_y, peak_x = np.unravel_index(np.argmax(fast), shape)
    assert abs(peak_x - 600) < 10 and abs(peak_y - 600) < 10
