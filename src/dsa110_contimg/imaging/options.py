"""Settings slice for the imaging stage."""

from __future__ import annotations

from dataclasses import dataclass

from ..configbase import setting


@dataclass(frozen=True)
class ImagingOptions:
    tier: str = setting("CONTIMG_IMG_TIER", "standard", "Quality tier", choices=("quick", "standard", "deep"))
    robust: float = setting("CONTIMG_IMG_ROBUST", 0.5, "Briggs robust parameter", minimum=-2, maximum=2)
    deconvolver: str = setting("CONTIMG_IMG_DECONVOLVER", "hogbom", "tclean deconvolver", choices=("hogbom", "multiscale", "clark"))
    pb_level: float = setting("CONTIMG_IMG_PB_LEVEL", 0.2, "Image out to where the primary beam falls to this level; the pb-corrected image is blanked below it and image QA measures inside it", minimum=0.01, maximum=0.9)
    pixels_per_beam: float = setting("CONTIMG_IMG_PIXELS_PER_BEAM", 4.0, "Cells across lambda_min/B_max (the Briggs 0.5 beam is ~1.3x wider, so ~5 cells across it)", minimum=2)
    max_imsize: int = setting("CONTIMG_IMG_MAX_IMSIZE", 3240, "Largest image side in pixels (3240 at 4 cells per beam: +-1.86 deg at full size; mask, minor cycles and FFTs scale with it)", minimum=64)
    threshold_sigma: float = setting("CONTIMG_IMG_THRESHOLD_SIGMA", 5.0, "Clean down to this multiple of the estimated noise", minimum=0.5)
    wproj_max_phase_rad: float = setting("CONTIMG_IMG_WPROJ_MAX_PHASE_RAD", 0.5, "Use w-projection when the w-term phase pi*w_max*theta^2 at the field edge exceeds this (radians); also the per-plane error bound", minimum=0.01)
    max_smearing_loss: float = setting("CONTIMG_IMG_MAX_SMEARING_LOSS", 0.01, "Image from a copy with channels averaged as far as this extra bandwidth-smearing loss of peak flux at the image edge allows (0: native channels); the copy also drops fully flagged rows", minimum=0, maximum=0.1)
    peel_min_apparent_jy: float = setting("CONTIMG_IMG_PEEL_MIN_APPARENT_JY", 0.01, "Sources of the bundled calibrator list and of CONTIMG_CAL_FIELD_CATALOGUE at least this bright through the drift-averaged beam (Jy) are fitted with their per-integration beam, subtracted before cleaning and restored after (0: off)", minimum=0)
    selfcal_min_apparent_jy: float = setting("CONTIMG_IMG_SELFCAL_MIN_APPARENT_JY", 3.0, "Groups calibrated with a set solved on an earlier group: when the peeled sources add up to at least this apparent flux (Jy), the imaging copy is first phase-self-calibrated on them per integration (0: never)", minimum=0)
    masker: str = setting("CONTIMG_IMG_MASKER", "scipy", "Who builds the clean mask once the bright sources are peeled: 'scipy' (auto-multithresh's rules, built between tclean's major cycles, ~2 s a round) or 'casa' (tclean's own auto-multithresh, 40-90 s per cycle at full size)", choices=("scipy", "casa"))
    keep_residual: bool = setting("CONTIMG_IMG_KEEP_RESIDUAL", True, "Publish the residual image as FITS beside the image (the QA gate reads its mean)")
    quicklook: bool = setting("CONTIMG_IMG_QUICKLOOK", True, "Write a quick-look PNG beside the FITS")
