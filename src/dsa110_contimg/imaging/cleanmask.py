"""Clean masks built with scipy between tclean's major cycles, instead of its auto-multithresh.

Why: once the bright catalogued sources are peeled (``imaging.peel``), tclean's own
auto-multithresh costs more than the cleaning it guides: on a full-size image it labels and
prunes hundreds of candidate regions every major cycle, and builds one more mask after the
last cycle only to stop at the cycle cap. The same rules in numpy/scipy are an order of
magnitude cheaper and on the same MS give the same mask: the same iterations, fluxes and rms
as tclean's (``benchmarks/bench_imaging.py --masker casa|scipy``; docs/performance.md).

The rules are auto-multithresh's (CASA docs, VLA values, ``MaskRules``): seed where the
residual exceeds the larger of ``noisethreshold`` x the robust rms and ``sidelobethreshold``
x the PSF's largest sidelobe x the residual peak (so a bright source's sidelobes are not
masked); prune seed regions smaller than ``minbeamfrac`` of a beam (noise spikes); smooth
with the restoring beam and cut at 1 % (each region widens by about a beam). From the
second round the previous mask also grows (``growiterations`` dilations) into connected
emission above ``lownoisethreshold`` x rms, and is kept. Negative emission is never masked
(a continuum field has none).

:func:`run_masked_clean` runs one tclean call with these masks in place of auto-multithresh
and skips the mask for the cycle that never runs.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from .. import cores
from ..cores import CoreShare
from . import stats

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
        return asdict(self)


def robust_rms(image: np.ndarray, stride: int = 3) -> float:
    """The residual's robust rms from every ``stride``-th pixel (cheap; sources barely move it)."""
    return stats.robust_rms(image, stride)


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
    from .tclean_runner import beam_axes

    bmaj, bmin, bpa = beam_axes(beam)
    cell_arcsec = cell_rad * 206264.80624709636
    return bmaj / cell_arcsec, bmin / cell_arcsec, bpa


def _write_mask(template: Path, mask_path: Path, mask: np.ndarray) -> None:
    """Put ``mask`` (float 0/1) into the CASA mask image, creating it on the template's grid.

    An existing mask is written in place: tclean holds it open, and casacore's per-process
    table cache makes this write visible to tclean's own handle.
    """
    import casatools

    if not (mask_path / "table.dat").exists():
        shutil.rmtree(mask_path, ignore_errors=True)
        shutil.copytree(template, mask_path)
    ia = casatools.image()
    ia.open(str(mask_path))
    try:
        shape = ia.shape()
        ia.putchunk(mask.T.astype(np.float32).reshape(tuple(shape)))
    finally:
        ia.close()


class _Masker:
    """Replaces tclean's mask update: called after the residual is made and after every
    major cycle; builds the next round's mask from the residual on disk."""

    def __init__(self, imagename: str, rules: MaskRules) -> None:
        self.imagename, self.rules = imagename, rules
        self.rounds: list[MaskRound] = []
        self.previous: np.ndarray | None = None
        # from the PSF, at the first round
        self.kernel: np.ndarray | None = None
        self.area = self.sidelobe = 0.0
        self.seconds = 0.0

    def update(self, major_done: int, nmajor: int) -> None:
        if nmajor >= 0 and major_done >= nmajor:
            return  # tclean stops now: a mask for a cycle that never runs is waste
        t0 = time.monotonic()
        residual_path = Path(f"{self.imagename}.residual")
        if self.kernel is None:
            psf, info = _read_plane(Path(f"{self.imagename}.psf"))
            bmaj, bmin, bpa = _beam_px(info["beam"], info["cell_rad"])
            self.kernel = beam_kernel(bmaj, bmin, bpa)
            self.area = math.pi / (4.0 * math.log(2.0)) * bmaj * bmin
            self.sidelobe = psf_sidelobe(psf, bmaj)
            del psf
        residual, _ = _read_plane(residual_path)
        mask, info = build_mask(residual, robust_rms(residual), self.sidelobe, self.kernel,
                                self.area, self.rules, self.previous)
        del residual
        _write_mask(residual_path, Path(f"{self.imagename}.mask"), mask)
        self.previous = mask
        self.rounds.append(info)
        self.seconds += time.monotonic() - t0
        log.info("imaging.mask", round=len(self.rounds), seconds=round(time.monotonic() - t0, 2),
                 **info.as_dict())


def _rethread(share: CoreShare, major_done: int) -> None:
    """Between major cycles: as many gridding threads as cores the other processes left
    free during the last one."""
    free = share.free()
    if free is not None:
        threads, others = free
        set_ok = cores.set_omp_threads(threads)
        log.info("imaging.threads", major_done=major_done, threads=threads,
                 others_cores=round(others, 2), applied=set_ok)


def run_masked_clean(params: dict[str, Any], rules: MaskRules) -> tuple[Any, list[MaskRound]]:
    """One tclean call whose mask updates are :class:`_Masker`'s instead of auto-multithresh.

    tclean's loop (``casatasks.private.task_tclean``) calls ``PySynthesisImager.updateMask``
    after the first residual and after each major cycle; for this call only, that method
    runs ours first (writing ``<imagename>.mask``) and then CASA's own, which with
    ``usemask='user'`` and no mask file just loads it. Splitting tclean into one call per
    cycle instead cost ~15 s a call: w-projection's convolution functions are rebuilt.
    """
    from .params import AUTOMASK
    from .tclean_runner import run_tclean

    try:
        from casatasks.private.imagerhelpers.imager_base import PySynthesisImager

        PySynthesisImager.updateMask  # noqa: B018 - the hook point must exist
    except (ImportError, AttributeError) as exc:  # another CASA: its own masking still works
        log.warning("imaging.masker_unavailable", error=repr(exc), action="auto-multithresh")
        return run_tclean(params), []

    base = {k: v for k, v in params.items() if k not in AUTOMASK}
    base.update(usemask="user", mask="")
    masker = _Masker(params["imagename"], rules)
    original = PySynthesisImager.updateMask
    share = CoreShare() if cores.managed() else None

    def update_mask(imager: Any) -> bool:
        masker.update(int(imager.majorCnt), int(imager.iterpars["nmajor"]))
        if share is not None:
            _rethread(share, int(imager.majorCnt))
        return original(imager)

    PySynthesisImager.updateMask = update_mask
    try:
        out = run_tclean(base)
    finally:
        PySynthesisImager.updateMask = original
    log.info("imaging.masks_built", rounds=len(masker.rounds), seconds=round(masker.seconds, 2))
    return out, masker.rounds
