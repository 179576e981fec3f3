"""Comparing recovered gains with the injected truth (tests and benchmarks)."""

from __future__ import annotations

import numpy as np

from ..instrument import C_M_S

ARCSEC_PER_RAD = 206264.806


def detrend_phase_gradient(ratio: np.ndarray, enu_m: np.ndarray,
                           freqs_hz: np.ndarray) -> dict[str, float]:
    """Phase errors after removing the best-fit linear phase gradient across the array.

    ``ratio`` is the solved over the true relative gain, (nant, ntime, nchan, npol);
    ``enu_m`` the antennas' (east, north, up) positions in the same order. A model position
    offset makes the solved phases absorb a plane across the array (phi = 2 pi nu / c
    (E dl + N dm)): that is an astrometric shift of the image, not a calibration error, so it
    is fitted per integration, channel and polarisation, removed, and reported as an angle
    (median over the fits) and in units of the synthesised beam (lambda / longest baseline).
    """
    enu = np.asarray(enu_m, dtype=float)
    design = np.column_stack([np.ones(len(enu)), enu[:, 0], enu[:, 1]])
    nant, nt, nf, npol = ratio.shape
    phase = np.angle(ratio)
    resid = np.full_like(phase, np.nan)
    offsets = []
    for t in range(nt):
        for f in range(nf):
            for p in range(npol):
                y = phase[:, t, f, p]
                ok = np.isfinite(y)
                if ok.sum() < 4:
                    continue
                coef, *_ = np.linalg.lstsq(design[ok], y[ok], rcond=None)
                resid[ok, t, f, p] = y[ok] - design[ok] @ coef
                offsets.append(np.hypot(coef[1], coef[2]) * C_M_S / (2 * np.pi * freqs_hz[f]))
    longest = max(float(np.max(np.linalg.norm(enu[:, None, :2] - enu[None, :, :2], axis=-1))),
                  1e-9)
    beam_rad = C_M_S / float(np.median(freqs_hz)) / longest
    offset = float(np.median(offsets)) if offsets else float("nan")
    return {"phase_rms_detrended_deg": float(np.degrees(np.sqrt(np.nanmean(resid ** 2)))),
            "gradient_offset_arcsec": offset * ARCSEC_PER_RAD,
            "gradient_offset_beams": offset / beam_rad}
