"""Run tclean from a built parameter dict and judge it by its outputs, not its return code.

tclean returns normally when it writes an all-NaN image (one NaN visibility suffices) or when
the restoring-beam fit fails, so success here means: the image, residual and PSF exist, every
pixel is finite, and the beam is a positive ellipse. The stop code is recorded, and the two
divergence codes are logged as warnings (the image QA sees the consequences).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..errors import StageError

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = tuple(f".{kind}{tt}" for kind in ("image", "residual", "psf", "model", "sumwt",
                                                   "pb", "weight", "image.pbcor")
                       for tt in ("", ".tt0", ".tt1", ".tt2")) + (".mask", ".alpha", ".alpha.error")

STOPCODES = {
    0: "no stopping criterion reached", 1: "niter reached", 2: "threshold reached",
    3: "force stop", 4: "no change in peak residual across two major cycles",
    5: "peak residual increased more than 3x from the previous major cycle (divergence)",
    6: "peak residual increased more than 3x from the minimum reached (divergence)",
    7: "zero mask", 8: "nsigma threshold reached", 9: "nmajor (major-cycle cap) reached",
}
DIVERGED = (5, 6)
ZERO_MASK = 7


class NonFiniteImage(StageError):
    """tclean wrote NaN/Inf pixels (typically unflagged NaN visibilities)."""


@dataclass(frozen=True)
class TcleanOutputs:
    image: Path
    residual: Path
    psf: Path
    model: Path
    bmaj_arcsec: float
    bmin_arcsec: float
    bpa_deg: float
    peak_jy: float
    iterdone: int
    nmajordone: int
    stopcode: int
    stopreason: str
    duration_s: float


def clear_image_products(imagename: str) -> None:
    """Remove a previous run's CASA images (tclean refuses or appends otherwise)."""
    for suffix in IMAGE_SUFFIXES:
        p = Path(imagename + suffix)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_tclean(params: dict[str, Any]) -> TcleanOutputs:
    """Call ``casatasks.tclean(**params)`` and validate what it wrote."""
    import casatasks

    imagename = params["imagename"]
    clear_image_products(imagename)
    log.info("imaging.tclean.start", imagename=imagename, imsize=params["imsize"],
             cell=params["cell"], gridder=params["gridder"], threshold=params["threshold"],
             niter=params["niter"], nmajor=params.get("nmajor"))
    t0 = time.monotonic()
    try:
        summary = casatasks.tclean(**params) or {}
    except Exception as exc:  # CASA raises bare RuntimeError/AssertionError for everything
        raise StageError(f"tclean failed: {type(exc).__name__}: {exc}") from exc
    duration = time.monotonic() - t0
    suffix = ".tt0" if params.get("deconvolver") == "mtmfs" else ""
    outputs = validate_outputs(imagename, summary, duration, suffix)
    log.info("imaging.tclean.done", imagename=imagename, duration_s=round(duration, 2),
             iterdone=outputs.iterdone, nmajor=outputs.nmajordone, stop=outputs.stopreason,
             bmaj=round(outputs.bmaj_arcsec, 2), bmin=round(outputs.bmin_arcsec, 2))
    if outputs.stopcode in DIVERGED:
        log.warning("imaging.tclean.diverged", imagename=imagename, stop=outputs.stopreason)
    return outputs


def validate_outputs(imagename: str, summary: dict, duration_s: float,
                     suffix: str = "") -> TcleanOutputs:
    """Check the images exist, are finite and carry a beam (``suffix`` '.tt0' for mtmfs)."""
    import casatools

    paths = {s: Path(f"{imagename}.{s}{suffix}") for s in ("image", "residual", "psf", "model")}
    missing = [str(p) for p in paths.values() if not (p / "table.dat").exists()]
    if missing:
        raise StageError(f"tclean returned but did not write {', '.join(missing)}")
    ia = casatools.image()
    ia.open(str(paths["image"]))
    try:
        pixels = ia.getchunk()
        beam = ia.restoringbeam()
    finally:
        ia.close()
    finite = np.isfinite(pixels)
    if not finite.all():
        raise NonFiniteImage(f"tclean wrote {100 * (1 - finite.mean()):.3g} % non-finite "
                             f"pixels in {paths['image']}")
    try:
        bmaj, bmin, bpa = beam_axes(beam)
    except (KeyError, TypeError):
        raise StageError(f"{paths['image']} has no restoring beam (PSF fit failed?)") from None
    if not (bmaj > 0 and bmin > 0 and np.isfinite(bmaj) and np.isfinite(bmin)):
        raise StageError(f"{paths['image']} has a degenerate restoring beam {bmaj}x{bmin} arcsec")
    code = int(summary.get("stopcode", 0)) if isinstance(summary, dict) else 0
    return TcleanOutputs(
        image=paths["image"], residual=paths["residual"], psf=paths["psf"], model=paths["model"],
        bmaj_arcsec=bmaj, bmin_arcsec=bmin, bpa_deg=bpa, peak_jy=float(pixels.max()),
        iterdone=int(summary.get("iterdone", 0)), nmajordone=int(summary.get("nmajordone", 0)),
        stopcode=code, stopreason=STOPCODES.get(code, f"stop code {code}"), duration_s=duration_s)


def beam_axes(beam: dict) -> tuple[float, float, float]:
    """(major, minor in arcsec, PA in degrees) of a CASA restoring-beam record; raises
    KeyError/TypeError when it holds no beam."""
    if "major" not in beam:  # per-plane beams: one plane here, take it
        beam = beam.get("beams", {}).get("*0", {}).get("*0", beam)
    return _arcsec(beam["major"]), _arcsec(beam["minor"]), _deg(beam["positionangle"])


def _arcsec(q: dict) -> float:
    scale = {"arcsec": 1.0, "arcmin": 60.0, "deg": 3600.0, "rad": 206264.80624709636}
    return float(q["value"]) * scale[q["unit"]]


def _deg(q: dict) -> float:
    scale = {"deg": 1.0, "rad": 57.29577951308232}
    return float(q["value"]) * scale[q["unit"]]
