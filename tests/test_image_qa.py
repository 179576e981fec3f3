"""Image QA gate on synthetic FITS products with known content (no CASA)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from dsa110_contimg.catalogue.reference import get_calibrator
from dsa110_contimg.qa.image import Beam, check_image_quality, fit_point_source
from dsa110_contimg.qa.options import ImageQAThresholds

CAL = get_calibrator("3C286")
FREQ = 1.405e9
N = 256
CELL = 6.0 / 3600  # deg
BMAJ, BMIN, BPA = 40.0 / 3600, 25.0 / 3600, 60.0


def _header(bmaj=BMAJ, bmin=BMIN, bpa=BPA, centre=(CAL.ra_deg + 0.05, CAL.dec_deg + 0.1)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---SIN", "DEC--SIN"]
    w.wcs.crval = list(centre)
    w.wcs.crpix = [N / 2 + 1, N / 2 + 1]
    w.wcs.cdelt = [-CELL, CELL]
    h = w.to_header()
    h["BMAJ"], h["BMIN"], h["BPA"] = bmaj, bmin, bpa
    h["BUNIT"] = "Jy/beam"
    h["RESTFRQ"] = FREQ
    h["NOISEEXP"] = 0.001
    return h


def _gaussian(h, ra, dec, flux, bmaj=BMAJ, bmin=BMIN, bpa=BPA) -> np.ndarray:
    """A point source rendered in sky coordinates (independent of the fitter's pixel algebra)."""
    w = WCS(h)
    yy, xx = np.mgrid[0:N, 0:N]
    pra, pdec = w.pixel_to_world_values(xx, yy)
    east = (pra - ra) * math.cos(math.radians(dec))
    north = pdec - dec
    pa = math.radians(bpa)
    a = north * math.cos(pa) + east * math.sin(pa)  # along the major axis (PA east of north)
    b = -north * math.sin(pa) + east * math.cos(pa)
    return flux * np.exp(-4 * math.log(2) * ((a / bmaj) ** 2 + (b / bmin) ** 2))


def _beam(h) -> np.ndarray:
    w = WCS(h)
    yy, xx = np.mgrid[0:N, 0:N]
    ra, dec = w.pixel_to_world_values(xx, yy)
    c = np.radians(h["CRVAL1"]), np.radians(h["CRVAL2"])
    cosd = (np.sin(np.radians(dec)) * np.sin(c[1]) +
            np.cos(np.radians(dec)) * np.cos(c[1]) * np.cos(np.radians(ra) - c[0]))
    theta = np.degrees(np.arccos(np.clip(cosd, -1, 1)))
    return np.exp(-(theta / 0.25) ** 2)  # a narrow toy beam so the edge falls below 0.2


def _write(tmp: Path, image, h, pb=None, residual=None, pbcor=True, level=0.2) -> Path:
    stem = tmp / "2026-06-01T044606"
    fits.PrimaryHDU(image.astype(np.float32), h).writeto(f"{stem}.image.fits", overwrite=True)
    if pb is not None:
        fits.PrimaryHDU(pb.astype(np.float32), h).writeto(f"{stem}.pb.fits", overwrite=True)
        if pbcor:
            ph = h.copy()
            ph["PBLEVEL"] = level
            with np.errstate(invalid="ignore", divide="ignore"):
                corr = np.where(pb >= level, image / pb, np.nan)
            fits.PrimaryHDU(corr.astype(np.float32), ph).writeto(f"{stem}.pbcor.fits",
                                                                 overwrite=True)
    if residual is not None:
        fits.PrimaryHDU(residual.astype(np.float32), h).writeto(f"{stem}.residual.fits",
                                                                overwrite=True)
    return Path(f"{stem}.image.fits")


def _good(tmp: Path, cal_scale: float = 1.0, noise: float = 0.001, residual_offset: float = 0.0):
    rng = np.random.default_rng(3)
    h = _header()
    pb = _beam(h)
    sky = _gaussian(h, CAL.ra_deg, CAL.dec_deg, CAL.flux_at(FREQ) * cal_scale)
    x, y = WCS(h).world_to_pixel_values(CAL.ra_deg, CAL.dec_deg)
    pb_at_cal = pb[int(round(float(y))), int(round(float(x)))]
    resid = rng.normal(0, noise, (N, N)) + residual_offset
    image = sky * pb_at_cal + rng.normal(0, noise, (N, N))
    return _write(tmp, image, h, pb=pb, residual=resid), pb_at_cal


def test_point_source_fit_recovers_flux_and_position_with_a_rotated_beam():
    h = _header()
    w = WCS(h)
    ra, dec = w.pixel_to_world_values(130.37, 121.81)  # off the pixel grid
    img = _gaussian(h, float(ra), float(dec), 2.5)
    fit = fit_point_source(img, w, float(ra), float(dec), Beam(BMAJ, BMIN, BPA))
    assert fit["flux_jy"] == pytest.approx(2.5, rel=1e-4)
    assert fit["offset_beams"] < 1e-3
    # a fit asked 20" away along the major axis still lands on the source
    pa = math.radians(BPA)
    ra2 = float(ra) + 20 / 3600 * math.sin(pa) / math.cos(math.radians(float(dec)))
    dec2 = float(dec) + 20 / 3600 * math.cos(pa)
    fit2 = fit_point_source(img, w, ra2, dec2, Beam(BMAJ, BMIN, BPA))
    assert fit2["flux_jy"] == pytest.approx(2.5, rel=1e-4)
    assert fit2["offset_major_beams"] == pytest.approx(-20 / 40, abs=0.01)
    assert abs(fit2["offset_minor_beams"]) < 0.01
    # with the PA sign wrong, the fit is visibly poorer: the convention matters
    bad = fit_point_source(img, w, float(ra), float(dec), Beam(BMAJ, BMIN, -BPA))
    assert abs(bad["flux_jy"] / 2.5 - 1) > 0.03
    assert fit_point_source(img, w, float(ra) + 5, float(dec), Beam(BMAJ, BMIN, BPA)) is None


def test_good_image_passes_with_calibrator_flux_on_the_catalogue(tmp_path):
    path, _ = _good(tmp_path)
    qa = check_image_quality(path, ImageQAThresholds(), calibrator="3C286")
    assert qa.passed, qa.failures
    assert not qa.warnings, qa.warnings
    m = qa.metrics
    assert m["rms_jy"] == pytest.approx(0.001, rel=0.1)
    assert m["dynamic_range"] == pytest.approx(m["peak_jy"] / m["rms_jy"])
    assert m["peak_snr"] == pytest.approx(m["peak_jy"] / 0.001)
    assert m["calibrator"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert m["bmaj_arcsec"] == pytest.approx(40.0) and m["beam_pixels"] == pytest.approx(25 / 6)
    assert m["nonfinite_fraction"] == 0 and abs(m["residual_mean_sigma"]) < 0.1
    assert qa.duration_s > 0
    passed, metrics = qa  # unpacks as (passed, metrics)
    assert passed and metrics is qa.metrics


def test_calibrator_flux_off_the_catalogue_warns(tmp_path):
    path, _ = _good(tmp_path, cal_scale=0.7)
    qa = check_image_quality(path, ImageQAThresholds(), calibrator="3C286")
    assert qa.passed  # a warning, not a failure
    assert any("3C286" in w and "catalogue" in w for w in qa.warnings)
    assert qa.metrics["calibrator"]["ratio"] == pytest.approx(0.7, abs=0.01)


def test_unknown_or_absent_calibrator_warns(tmp_path):
    path, _ = _good(tmp_path)
    assert any("not in the catalogue" in w
               for w in check_image_quality(path, ImageQAThresholds(), "NOPE").warnings)
    assert any("outside" in w
               for w in check_image_quality(path, ImageQAThresholds(), "3C48").warnings)


def test_nan_image_fails(tmp_path):
    h = _header()
    image = np.random.default_rng(0).normal(0, 0.001, (N, N))
    image[:, : N // 3] = np.nan
    qa = check_image_quality(_write(tmp_path, image, h, pb=_beam(h)), ImageQAThresholds())
    assert not qa.passed and "NaN/Inf" in qa.reason


def test_empty_image_fails(tmp_path):
    h = _header()
    qa = check_image_quality(_write(tmp_path, np.zeros((N, N)), h, pb=_beam(h)),
                             ImageQAThresholds())
    assert not qa.passed and "empty" in qa.reason


def test_noise_only_image_fails_dynamic_range(tmp_path):
    h = _header()
    image = np.random.default_rng(1).normal(0, 0.001, (N, N))
    qa = check_image_quality(_write(tmp_path, image, h, pb=_beam(h)), ImageQAThresholds())
    assert not qa.passed and "dynamic range" in qa.reason


def test_bad_beams_fail(tmp_path):
    h = _header(bmaj=BMIN * 12)
    image = _gaussian(h, CAL.ra_deg, CAL.dec_deg, 5.0, bmaj=BMIN * 12) + \
        np.random.default_rng(2).normal(0, 0.001, (N, N))
    qa = check_image_quality(_write(tmp_path, image, h), ImageQAThresholds())
    assert not qa.passed and "axis ratio" in qa.reason
    h = _header(bmaj=1.6 * CELL, bmin=1.5 * CELL)
    qa = check_image_quality(_write(tmp_path, image, h), ImageQAThresholds())
    assert not qa.passed and "undersampled" in qa.reason
    h = _header()
    del h["BMAJ"]
    qa = check_image_quality(_write(tmp_path, image, h), ImageQAThresholds())
    assert not qa.passed and "restoring beam" in qa.reason


def test_residual_offset_and_excess_noise_warn(tmp_path):
    path, _ = _good(tmp_path, residual_offset=0.003)
    qa = check_image_quality(path, ImageQAThresholds())
    assert qa.passed and any("residual mean" in w for w in qa.warnings)
    assert not any("expected thermal noise" in w for w in qa.warnings)
    path, _ = _good(tmp_path, noise=0.05)  # 50 x NOISEEXP
    qa = check_image_quality(path, ImageQAThresholds(warn_rms_over_expected=20.0))
    assert any("expected thermal noise" in w for w in qa.warnings)
    assert not any("residual mean" in w for w in qa.warnings)


def test_thresholds_decide(tmp_path):
    path, _ = _good(tmp_path)
    assert not check_image_quality(path, ImageQAThresholds(max_rms_jy=1e-4)).passed
    assert not check_image_quality(path, ImageQAThresholds(min_dynamic_range=1e6)).passed


def test_missing_products_fail_with_a_reason(tmp_path):
    qa = check_image_quality(tmp_path / "nothing.image.fits", ImageQAThresholds())
    assert not qa.passed and "unreadable" in qa.reason
