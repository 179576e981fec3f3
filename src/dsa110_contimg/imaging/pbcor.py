"""Primary-beam correction for a drift scan: the configured beam model averaged over the group.

DSA-110 dishes stay at a fixed (az, alt) while the sky drifts through the beam (0.3 deg in a
tiny group, 1.1 deg in a full one at dec 30). Each integration sees the sky through a beam
centred on the fixed (az, alt) converted to ICRS at that time, so the image -- a weighted sum
over integrations -- is the sky times the *time-averaged* beam. We evaluate that average in
the image's own frame (every pixel's ICRS direction from the FITS WCS), weighting each
integration by its unflagged visibility count, at the image's reference frequency (the band
centre). Averaging over frequency too would change the correction by < 0.2 % across this
13 % band, so we keep the single frequency the flux is quoted at.

The beam is smooth on degree scales: it is computed on a coarse grid (every ``step`` pixels)
and interpolated bicubically, which keeps a 4096^2 image to a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog

from ..instrument import PrimaryBeam, dish_axes_icrs

log = structlog.get_logger(__name__)


def quiet_wcs(header):
    """astropy WCS without the FITSFixedWarning chatter about MJD-OBS/OBSGEO it fills in."""
    import warnings

    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _unit(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def drift_averaged_beam(ra_deg: np.ndarray, dec_deg: np.ndarray, track_ra_deg: np.ndarray,
                        track_dec_deg: np.ndarray, weights: np.ndarray | None, freq_hz: float,
                        beam: PrimaryBeam) -> np.ndarray:
    """Mean beam power over the beam-centre track at each (ra, dec) (any array shape)."""
    x = _unit(np.asarray(ra_deg, float), np.asarray(dec_deg, float))
    p, e_l, e_m = dish_axes_icrs(np.atleast_1d(np.asarray(track_ra_deg, float)),
                                 np.atleast_1d(np.asarray(track_dec_deg, float)))  # (k, 3)
    w = np.ones(len(e_l)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    out = np.zeros(x.shape[:-1])
    for pk, lk, mk, wk in zip(p, e_l, e_m, w, strict=True):
        out += wk * beam.power_lm(x @ lk, x @ mk, freq_hz, x @ pk)
    return out


def beam_on_wcs(wcs, shape: tuple[int, int], track_ra_deg: np.ndarray, track_dec_deg: np.ndarray,
                weights: np.ndarray | None, freq_hz: float, beam: PrimaryBeam,
                max_nodes: int = 256) -> np.ndarray:
    """The drift-averaged beam on every pixel of a celestial WCS grid of ``shape`` (ny, nx)."""
    from scipy.interpolate import RectBivariateSpline

    ny, nx = shape
    step = max(1, int(np.ceil(max(ny, nx) / max_nodes)))
    xs = np.unique(np.append(np.arange(0, nx, step), nx - 1))
    ys = np.unique(np.append(np.arange(0, ny, step), ny - 1))
    gx, gy = np.meshgrid(xs, ys)
    ra, dec = wcs.celestial.pixel_to_world_values(gx, gy)
    coarse = drift_averaged_beam(ra, dec, track_ra_deg, track_dec_deg, weights, freq_hz, beam)
    if step == 1:
        return coarse
    k = min(3, len(xs) - 1, len(ys) - 1)
    spline = RectBivariateSpline(ys, xs, coarse, kx=k, ky=k)
    return spline(np.arange(ny), np.arange(nx))


def write_beam_and_pbcor(image_fits: Path, pb_fits: Path, pbcor_fits: Path, track_ra_deg,
                         track_dec_deg, weights, freq_hz: float, beam: PrimaryBeam,
                         cutoff: float) -> np.ndarray:
    """Write the beam model and image / beam (blank below ``cutoff``); return the 2-D beam."""
    from astropy.io import fits

    with fits.open(image_fits) as hdul:
        header = hdul[0].header.copy()
        data = hdul[0].data.astype(np.float32)
    wcs = quiet_wcs(header)
    ny, nx = data.shape[-2:]
    pb = beam_on_wcs(wcs, (ny, nx), track_ra_deg, track_dec_deg, weights, freq_hz, beam)
    desc = beam.describe()
    pb_header = header.copy()
    pb_header["BUNIT"] = ""
    for key in ("BMAJ", "BMIN", "BPA"):
        pb_header.remove(key, ignore_missing=True)
    pb_header["PBMODEL"] = (desc[:68], "CONTIMG_BEAM_*")
    pb_header["PBTRACK"] = (len(np.atleast_1d(track_ra_deg)), "drift pointings averaged")
    fits.PrimaryHDU(pb.astype(np.float32).reshape(data.shape), pb_header).writeto(
        pb_fits, overwrite=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(pb >= cutoff, data / pb.reshape(data.shape[-2:]), np.nan)
    header["PBCOR"] = (True, "divided by the drift-averaged primary beam")
    header["PBLEVEL"] = (float(cutoff), "blanked where the beam is below this")
    header["PBMODEL"] = (desc[:68], "CONTIMG_BEAM_*")
    fits.PrimaryHDU(corr.astype(np.float32), header).writeto(pbcor_fits, overwrite=True)
    log.info("imaging.pbcor", pbcor=str(pbcor_fits), pb_min=float(pb.min()),
             pb_max=float(pb.max()), cutoff=cutoff)
    return pb
