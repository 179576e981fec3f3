"""Clean masks built with scipy between tclean calls, instead of tclean's auto-multithresh.

Why: once the bright catalogued sources are peeled (``imaging.peel``), tclean's own
auto-multithresh costs more than the cleaning it guides. On a full-size group CASA spends
40-90 s per major cycle labelling and pruning ~270 candidate regions of a 3240^2 image, and
builds one more mask after the last cycle that it then throws away (it stops at the cap);
masking was 56-66 % of tclean's time. The same rules in scipy take about a second.

The rules follow auto-multithresh (CASA docs, VLA values): a region is seeded where the
residual exceeds the larger of ``noisethreshold`` x the robust rms and ``sidelobethreshold``
x the PSF's largest sidelobe x the residual peak (a bright source's sidelobes are never
masked); seed regions smaller than ``minbeamfrac`` of a beam are pruned (noise spikes); each
kept seed grows over the connected pixels above ``lownoisethreshold`` x rms, is widened by
half a beam (CASA smooths with the beam), and is added to the previous mask. Negative
emission is never masked (a continuum field has none).

:func:`run_masked_clean` drives tclean around it: one call makes the PSF and the residual
(niter 0), then each major cycle is one call with ``calcres``/``calcpsf`` off that cleans in
the mask built from the residual the previous call left.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@dataclass(frozen=True)
class MaskRules:
    noisethreshold: float = 4.25
    sidelobethreshold: float = 1.0
    lownoisethreshold: float = 1.5
    minbeamfrac: float = 0.3
    growiterations: int = 75


@dataclass(frozen=True)
class MaskRound:
    """What one mask round saw and did (recorded with the image)."""

    rms_jy: float
    peak_jy: float
    sidelobe: float
    threshold_jy: float
    regions: int
    pruned: int
    pixels: int

    def as_dict(self) -> dict[str, Any]:
        return {"rms_jy": self.rms_jy, "peak_jy": self.peak_jy, "sidelobe": self.sidelobe,
                "threshold_jy": self.threshold_jy, "regions": self.regions,
                "pruned": self.pruned, "pixels": self.pixels}


def robust_rms(image: np.ndarray, stride: int = 3) -> float:
    """1.4826 x the median absolute deviation of a strided subsample (sources barely move it)."""
    sample = image[::stride, ::stride]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return float("nan")
    med = np.median(sample)
    return float(1.4826 * np.median(np.abs(sample - med)))


def psf_sidelobe(psf: np.ndarray, bmaj_px: float) -> float:
    """The PSF's largest sidelobe: its maximum beyond 1.2 FWHM of the peak (the first null
    of an Airy-like main lobe), relative to the peak."""
    ny, nx = psf.shape
    iy, ix = np.unravel_index(int(np.argmax(psf)), psf.shape)
    peak = float(psf[iy, ix])
    if not peak > 0:
        return 1.0
    y, x = np.ogrid[:ny, :nx]
    outside = (y - iy) ** 2 + (x - ix) ** 2 > (1.2 * bmaj_px) ** 2
    vals = psf[outside]
    return float(np.abs(vals).max() / peak) if vals.size else 0.0


def beam_kernel(bmaj_px: float, bmin_px: float, bpa_deg: float) -> np.ndarray:
    """The restoring beam as an image (peak 1) out to 1.5 FWHM; rows are y (Dec), columns
    x (RA increasing leftwards, as CASA images are stored: PA east of north)."""
    half = int(math.ceil(1.5 * bmaj_px))
    y, x = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    pa = math.radians(bpa_deg)
    # axis along the major direction: north (+y) rotated towards east (-x)
    along = y * math.cos(pa) - x * math.sin(pa)
    across = y * math.sin(pa) + x * math.cos(pa)
    sa, sb = bmaj_px * FWHM_TO_SIGMA, bmin_px * FWHM_TO_SIGMA
    return np.exp(-0.5 * ((along / sa) ** 2 + (across / sb) ** 2)).astype(np.float32)


def _prune(mask: np.ndarray, min_pixels: float) -> tuple[np.ndarray, int, int]:
    """Drop connected regions smaller than ``min_pixels``: (kept mask, kept, pruned)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if not n:
        return mask, 0, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    small = sizes < min_pixels
    small[0] = True
    kept = int(n - small[1:].sum())
    return ~small[labels], kept, n - kept


def _smooth(mask: np.ndarray, kernel: np.ndarray, cut: float = 0.01) -> np.ndarray:
    """Convolve with the beam and keep what exceeds ``cut`` x the maximum (CASA's
    smoothfactor 1 / cutthreshold 0.01): each region widens by about a beam."""
    from scipy.signal import oaconvolve

    if not mask.any():
        return mask
    smoothed = oaconvolve(mask.astype(np.float32), kernel, mode="same")
    return smoothed > cut * float(smoothed.max())


def build_mask(residual: np.ndarray, rms: float, sidelobe: float, kernel: np.ndarray,
               beam_area_px: float, rules: MaskRules, previous: np.ndarray | None = None
               ) -> tuple[np.ndarray, MaskRound]:
    """The clean mask (bool, residual's shape) for the next minor cycle; see the module doc."""
    from scipy import ndimage

    finite = np.where(np.isfinite(residual), residual, 0.0)
    peak = float(finite.max())
    threshold = max(rules.noisethreshold * rms, rules.sidelobethreshold * sidelobe * peak)
    min_pixels = rules.minbeamfrac * beam_area_px
    seeds, regions, pruned = _prune(finite > threshold, min_pixels)
    mask = _smooth(seeds, kernel)
    if previous is not None and previous.any():
        # the previous mask grows into connected emission above the low-noise threshold
        low = finite > rules.lownoisethreshold * rms
        grown = ndimage.binary_dilation(previous, iterations=rules.growiterations, mask=low)
        grown, _, _ = _prune(grown & ~previous, min_pixels)
        mask |= _smooth(grown, kernel) | previous
    info = MaskRound(rms_jy=rms, peak_jy=peak, sidelobe=sidelobe, threshold_jy=threshold,
                     regions=regions, pruned=pruned, pixels=int(mask.sum()))
    return mask, info


# ----------------------------------------------------------------------- the tclean driver
def _read_plane(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import casatools

    ia = casatools.image()
    ia.open(str(path))
    try:
        pix = ia.getchunk()
        beam = ia.restoringbeam()
        incr = ia.coordsys().increment(format="n", type="direction")["numeric"]
    finally:
        ia.close()
    # CASA stores [x (RA), y (Dec), ...]: rows of the returned plane are y
    plane = np.asarray(pix).reshape(pix.shape[0], pix.shape[1]).T
    return plane, {"beam": beam, "cell_rad": float(abs(incr[0]))}


def _beam_px(beam: dict[str, Any], cell_rad: float) -> tuple[float, float, float]:
    """(major, minor FWHM in pixels, PA in degrees) from an image's restoring-beam record."""
    from .tclean_runner import _arcsec, _deg

    if "major" not in beam:
        beam = beam.get("beams", {}).get("*0", {}).get("*0", beam)
    cell_arcsec = cell_rad * 206264.80624709636
    return (_arcsec(beam["major"]) / cell_arcsec, _arcsec(beam["minor"]) / cell_arcsec,
            _deg(beam["positionangle"]))


def _write_mask(template: Path, mask_path: Path, mask: np.ndarray) -> None:
    """A CASA mask image (float 0/1) on the template's grid."""
    import casatools

    if mask_path.exists():
        shutil.rmtree(mask_path)
    shutil.copytree(template, mask_path)
    ia = casatools.image()
    ia.open(str(mask_path))
    try:
        shape = ia.shape()
        ia.putchunk(mask.T.astype(np.float32).reshape(tuple(shape)))
    finally:
        ia.close()


def run_masked_clean(params: dict[str, Any], rules: MaskRules) -> tuple[Any, list[MaskRound]]:
    """tclean with masks from :func:`build_mask`; ``params['nmajor']`` major cycles.

    Returns the final call's validated outputs (iterations and cycles summed over the calls,
    duration over the whole) and the mask rounds.
    """
    from .tclean_runner import run_tclean

    t0 = time.monotonic()
    imagename = params["imagename"]
    cycles = max(1, int(params["nmajor"]))
    base = {k: v for k, v in params.items() if k not in {
        "sidelobethreshold", "noisethreshold", "lownoisethreshold", "minbeamfrac",
        "negativethreshold", "minpercentchange", "growiterations", "mask"}}
    base.update(usemask="user", mask="")
    first = run_tclean({**base, "niter": 0})
    psf, psf_info = _read_plane(first.psf)
    bmaj_px, bmin_px, bpa = _beam_px(psf_info["beam"], psf_info["cell_rad"])
    area_px = math.pi / (4.0 * math.log(2.0)) * bmaj_px * bmin_px
    kernel = beam_kernel(bmaj_px, bmin_px, bpa)
    sidelobe = psf_sidelobe(psf, bmaj_px)
    del psf
    mask_path = Path(f"{imagename}.mask")
    rounds: list[MaskRound] = []
    previous: np.ndarray | None = None
    iterdone = nmajor = 0
    out = first
    for i in range(cycles):
        residual, _ = _read_plane(first.residual)
        rms = robust_rms(residual)
        mask, info = build_mask(residual, rms, sidelobe, kernel, area_px, rules, previous)
        del residual
        rounds.append(info)
        log.info("imaging.mask", round=i + 1, **info.as_dict())
        if not mask.any():
            break  # nothing above the thresholds: the residual is noise
        _write_mask(first.residual, mask_path, mask)
        previous = mask
        # restart from the residual, PSF and model the previous call left (no re-gridding);
        # every call restores, so the image is complete whichever call is the last
        out = run_tclean({**base, "nmajor": 1, "calcres": False, "calcpsf": False},
                         clear=False)
        iterdone += out.iterdone
        nmajor += out.nmajordone
        if out.stopcode not in (0, 9):  # threshold, nsigma or niter reached: done
            break
    return replace(out, iterdone=iterdone, nmajordone=nmajor,
                   duration_s=time.monotonic() - t0), rounds
