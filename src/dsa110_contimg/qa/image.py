"""Image QA gate: is this image fit to publish, and does its flux scale agree with the catalogue?

Reads only the FITS products (so it can re-judge any archived image), inside the primary
beam (pb >= the level the stage blanked at; a central disc when no beam model is on disk).

Failures (block the group): non-finite pixels, an empty image (rms 0 or no positive peak),
rms above the ceiling, dynamic range (peak / robust rms) below the floor, a degenerate,
too-elongated or undersampled restoring beam.
Warnings (alert only): the calibrator's pb-corrected flux off the catalogue, a residual mean
far from zero, too many pixels above 5 sigma, rms far above the expected thermal noise.

Metrics: ``rms_jy`` (1.4826 x MAD, robust to sources), ``peak_jy``, ``dynamic_range`` =
peak / rms (what CONTIMG_QA_IMG_MIN_DYNAMIC_RANGE gates), ``peak_snr`` = peak / expected
thermal noise (radiometer, from the stage), ``artefact_ratio`` = peak / |most negative pixel|,
``frac_above_5sigma``, ``residual_mean_sigma``, beam and the calibrator comparison.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging.stats import image_statistics, robust_rms
from .options import ImageQAThresholds
from .result import GateBuilder, QAResult

FWHM_TO_SIGMA2 = 4.0 * math.log(2.0)


@dataclass(frozen=True)
class Beam:
    bmaj_deg: float
    bmin_deg: float
    bpa_deg: float

    @classmethod
    def from_header(cls, header) -> Beam | None:
        try:
            b = cls(float(header["BMAJ"]), float(header["BMIN"]), float(header.get("BPA", 0.0)))
        except (KeyError, TypeError, ValueError):
            return None
        return b


def _axes_px(wcs) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit vectors (pixels) pointing north and east, and the pixel size in degrees."""
    m = wcs.celestial.pixel_scale_matrix  # d(world)/d(pixel), degrees
    inv = np.linalg.inv(m)
    # world offsets (dRA*cos(dec) ~ east, dDec = north) -> pixel offsets
    east = inv @ np.array([1.0, 0.0])
    north = inv @ np.array([0.0, 1.0])
    scale = float(np.sqrt(abs(np.linalg.det(m))))
    return north / np.linalg.norm(north), east / np.linalg.norm(east), scale


def fit_point_source(image: np.ndarray, wcs, ra_deg: float, dec_deg: float, beam: Beam,
                     search_beams: float = 1.0) -> dict[str, Any] | None:
    """Fit a point source (the restoring beam, fixed shape) near (ra, dec).

    Free parameters: amplitude and position; the fit uses the pixels inside the half-power
    ellipse around the brightest pixel within ``search_beams`` x bmaj of the asked position.
    For an unresolved source the amplitude is its flux density; the returned offset is along
    the beam's axes in units of that axis' FWHM. None when the position is off the image or
    the region holds no finite pixels.
    """
    from scipy.optimize import least_squares

    ny, nx = image.shape
    x0, y0 = (float(v) for v in wcs.celestial.world_to_pixel_values(ra_deg, dec_deg))
    if not (0 <= x0 < nx and 0 <= y0 < ny):  # also False for NaN (beyond the projection)
        return None
    north, east, cell = _axes_px(wcs)
    pa = math.radians(beam.bpa_deg)
    e_maj = north * math.cos(pa) + east * math.sin(pa)
    e_min = -north * math.sin(pa) + east * math.cos(pa)
    fmaj, fmin = beam.bmaj_deg / cell, beam.bmin_deg / cell  # FWHM in pixels
    r = int(math.ceil(max(3.0, search_beams * fmaj)))
    xa, xb = max(0, int(round(x0)) - r), min(nx, int(round(x0)) + r + 1)
    ya, yb = max(0, int(round(y0)) - r), min(ny, int(round(y0)) + r + 1)
    gy, gx = np.mgrid[ya:yb, xa:xb]
    box = image[ya:yb, xa:xb]

    def q(xc: float, yc: float) -> np.ndarray:
        d = np.stack([gx - xc, gy - yc], axis=-1)
        return (d @ e_maj / fmaj) ** 2 + (d @ e_min / fmin) ** 2

    near = (q(x0, y0) <= search_beams ** 2) & np.isfinite(box)
    if not near.any():
        return None
    iy, ix = np.unravel_index(int(np.argmax(np.where(near, box, -np.inf))), box.shape)
    xs, ys = float(gx[iy, ix]), float(gy[iy, ix])
    use = (q(xs, ys) <= 0.25) & np.isfinite(box)  # the half-power ellipse
    if use.sum() < 3:
        return None
    px, py, pv = gx[use], gy[use], box[use]

    def resid(p: np.ndarray) -> np.ndarray:
        d = np.stack([px - p[1], py - p[2]], axis=-1)
        qq = (d @ e_maj / fmaj) ** 2 + (d @ e_min / fmin) ** 2
        return p[0] * np.exp(-FWHM_TO_SIGMA2 * qq) - pv

    fit = least_squares(resid, x0=[float(box[iy, ix]), xs, ys], method="lm")
    amp, xc, yc = (float(v) for v in fit.x)
    ra_fit, dec_fit = (float(v) for v in wcs.celestial.pixel_to_world_values(xc, yc))
    d = np.array([xc - x0, yc - y0])
    return {"flux_jy": amp, "ra_deg": ra_fit, "dec_deg": dec_fit, "x": xc, "y": yc,
            "offset_major_beams": float(d @ e_maj / fmaj),
            "offset_minor_beams": float(d @ e_min / fmin),
            "offset_beams": float(math.hypot(d @ e_maj / fmaj, d @ e_min / fmin)),
            "offset_arcsec": float(np.linalg.norm(d) * cell * 3600.0),
            "n_pixels": int(use.sum())}


# ----------------------------------------------------------------- loading products
@dataclass
class _Products:
    image: np.ndarray
    header: Any
    wcs: Any
    pbcor: np.ndarray | None
    residual: np.ndarray | None
    pb: np.ndarray | None
    pb_level: float | None
    paths: dict[str, str]


def _sibling(image_fits: Path, kind: str) -> Path:
    name = image_fits.name
    stem = name[: -len(".image.fits")] if name.endswith(".image.fits") else image_fits.stem
    return image_fits.with_name(f"{stem}.{kind}.fits")


def _read2d(path: Path | None) -> tuple[np.ndarray | None, Any]:
    from astropy.io import fits

    if path is None or not Path(path).exists():
        return None, None
    with fits.open(path) as hdul:
        return np.squeeze(hdul[0].data).astype(np.float64), hdul[0].header.copy()


def _load(result_or_fits: Any) -> _Products:
    from ..imaging.pbcor import quiet_wcs

    if isinstance(result_or_fits, str | Path):
        image_fits = Path(result_or_fits)
        pbcor_fits, residual_fits, pb_fits = (_sibling(image_fits, k)
                                              for k in ("pbcor", "residual", "pb"))
    else:
        image_fits = Path(result_or_fits.image_fits)
        pbcor_fits = getattr(result_or_fits, "pbcor_fits", None)
        residual_fits = getattr(result_or_fits, "residual_fits", None)
        pb_fits = getattr(result_or_fits, "pb_fits", None)
    image, header = _read2d(image_fits)
    if image is None:
        raise FileNotFoundError(f"no image at {image_fits}")
    pbcor, pbcor_header = _read2d(pbcor_fits)
    residual, _ = _read2d(residual_fits)
    pb, _ = _read2d(pb_fits)
    level = None
    if pbcor_header is not None and "PBLEVEL" in pbcor_header:
        level = float(pbcor_header["PBLEVEL"])
    paths = {"image": str(image_fits), "pbcor": str(pbcor_fits) if pbcor is not None else None,
             "residual": str(residual_fits) if residual is not None else None,
             "pb": str(pb_fits) if pb is not None else None}
    return _Products(image, header, quiet_wcs(header), pbcor, residual, pb, level, paths)


def inbeam_mask(shape: tuple[int, int], pb: np.ndarray | None, level: float | None) -> np.ndarray:
    """Pixels where the beam model is at least ``level``; else the inscribed central disc."""
    if pb is not None and pb.shape == shape:
        return np.isfinite(pb) & (pb >= (level if level is not None else 0.2))
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    return np.hypot(xx - (nx - 1) / 2, yy - (ny - 1) / 2) <= min(nx, ny) / 2


# ----------------------------------------------------------------- the gate
def check_image_quality(result_or_fits: Any, thresholds: ImageQAThresholds,
                        calibrator: str | None = None) -> QAResult:
    """Judge an image (an ``ImagingResult`` or the path of its ``*.image.fits``)."""
    t0 = time.monotonic()
    g = GateBuilder("image")
    try:
        p = _load(result_or_fits)
    except (FileNotFoundError, OSError) as exc:
        g.fail_if(True, f"image products unreadable: {exc}")
        return g.result(time.monotonic() - t0)
    g.metrics["paths"] = p.paths
    mask = inbeam_mask(p.image.shape, p.pb, p.pb_level)
    stats = image_statistics(p.image, mask)
    g.metrics.update({k: v for k, v in stats.items() if k != "peak_pixel"})
    if stats["peak_pixel"] is not None:
        ra, dec = p.wcs.celestial.pixel_to_world_values(*stats["peak_pixel"])
        g.metrics["peak_ra_deg"], g.metrics["peak_dec_deg"] = float(ra), float(dec)
    rms, peak = stats["rms_jy"], stats["peak_jy"]

    g.fail_if(stats["n_inbeam"] == 0, "no pixels inside the primary beam")
    g.fail_if(stats["nonfinite_fraction"] > thresholds.max_nonfinite_fraction,
              f"{100 * stats['nonfinite_fraction']:.3g} % of in-beam pixels are NaN/Inf "
              f"(limit {100 * thresholds.max_nonfinite_fraction:.3g} %)")
    empty = not (np.isfinite(rms) and rms > 0)
    g.fail_if(empty, "image is empty: no finite pixels or zero rms (no data gridded?)")
    if not empty:
        g.fail_if(not peak > 0, f"image has no positive peak (peak {peak:.3g} Jy/beam)")
        g.fail_if(rms > thresholds.max_rms_jy,
                  f"rms {rms:.3g} Jy/beam above the limit {thresholds.max_rms_jy:g}")
        dr = stats["dynamic_range"]
        g.fail_if(not dr >= thresholds.min_dynamic_range,
                  f"dynamic range {dr:.3g} below the limit {thresholds.min_dynamic_range:g}")
        g.warn_if(stats["frac_above_5sigma"] > thresholds.warn_fraction_above_5sigma,
                  f"{100 * stats['frac_above_5sigma']:.2g} % of in-beam pixels above 5 rms")
        expected = p.header.get("NOISEEXP")
        if expected:
            g.metrics["noise_expected_jy"] = float(expected)
            g.metrics["peak_snr"] = peak / float(expected)
            g.metrics["rms_over_expected"] = rms / float(expected)
            g.warn_if(rms / float(expected) > thresholds.warn_rms_over_expected,
                      f"rms is {rms / float(expected):.3g} x the expected thermal noise")
    _check_beam(g, p, thresholds)
    _check_residual(g, p, mask, rms, thresholds)
    if calibrator:
        _check_calibrator(g, p, mask, calibrator, thresholds)
    return g.result(time.monotonic() - t0)


def _check_beam(g: GateBuilder, p: _Products, t: ImageQAThresholds) -> None:
    beam = Beam.from_header(p.header)
    if beam is None or not (beam.bmaj_deg > 0 and beam.bmin_deg > 0):
        g.fail_if(True, "no valid restoring beam in the image header")
        return
    cell = abs(float(p.header["CDELT2"]))
    ratio = beam.bmaj_deg / beam.bmin_deg
    g.metrics.update(bmaj_arcsec=beam.bmaj_deg * 3600, bmin_arcsec=beam.bmin_deg * 3600,
                     bpa_deg=beam.bpa_deg, beam_axis_ratio=ratio,
                     beam_pixels=beam.bmin_deg / cell, cell_arcsec=cell * 3600)
    g.fail_if(ratio > t.max_beam_axis_ratio,
              f"beam axis ratio {ratio:.3g} above the limit {t.max_beam_axis_ratio:g}")
    g.fail_if(beam.bmin_deg / cell < t.min_beam_pixels,
              f"beam minor axis spans {beam.bmin_deg / cell:.2g} cells (< {t.min_beam_pixels:g}): "
              "undersampled")


def _check_residual(g: GateBuilder, p: _Products, mask: np.ndarray, rms: float,
                    t: ImageQAThresholds) -> None:
    if p.residual is None or p.residual.shape != p.image.shape:
        g.metrics["residual_mean_jy"] = None
        return
    vals = p.residual[mask]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return
    mean = float(vals.mean())
    g.metrics["residual_mean_jy"] = mean
    g.metrics["residual_rms_jy"] = robust_rms(vals)
    if np.isfinite(rms) and rms > 0:
        g.metrics["residual_mean_sigma"] = mean / rms
        g.warn_if(abs(mean / rms) > t.max_residual_mean_sigma,
                  f"residual mean {mean / rms:+.2g} rms (limit {t.max_residual_mean_sigma:g}): "
                  "uncleaned flux or a negative bowl")


def _check_calibrator(g: GateBuilder, p: _Products, mask: np.ndarray, name: str,
                      t: ImageQAThresholds) -> None:
    from ..catalogue.reference import get_calibrator

    try:
        cal = get_calibrator(name)
    except KeyError:
        g.warn_if(True, f"calibrator {name!r} is not in the catalogue: flux not checked")
        return
    freq = float(p.header.get("RESTFRQ") or p.header.get("CRVAL3"))
    expected = cal.flux_at(freq)
    info: dict[str, Any] = {"name": cal.name, "catalogue_flux_jy": expected, "freq_hz": freq}
    g.metrics["calibrator"] = info
    beam = Beam.from_header(p.header)
    if p.pbcor is None or beam is None:
        g.warn_if(True, f"{cal.name}: no pb-corrected image to measure the flux in")
        return
    x, y = (float(v) for v in p.wcs.celestial.world_to_pixel_values(cal.ra_deg, cal.dec_deg))
    inside = False
    if math.isfinite(x) and math.isfinite(y):
        ix, iy = int(round(x)), int(round(y))
        inside = 0 <= iy < mask.shape[0] and 0 <= ix < mask.shape[1] and bool(mask[iy, ix])
    if not inside:
        g.warn_if(True, f"{cal.name} lies outside the primary-beam-corrected area: flux not checked")
        return
    fit = fit_point_source(p.pbcor, p.wcs, cal.ra_deg, cal.dec_deg, beam)
    if fit is None:
        g.warn_if(True, f"{cal.name}: could not fit the source in the pb-corrected image")
        return
    ratio = fit["flux_jy"] / expected
    info.update(measured_flux_jy=fit["flux_jy"], ratio=ratio,
                offset_arcsec=fit["offset_arcsec"], offset_beams=fit["offset_beams"])
    g.warn_if(abs(ratio - 1) > t.calibrator_flux_tolerance,
              f"{cal.name}: pb-corrected flux {fit['flux_jy']:.3g} Jy is {ratio:.3g} x the "
              f"catalogue {expected:.3g} Jy (tolerance {100 * t.calibrator_flux_tolerance:g} %)")
