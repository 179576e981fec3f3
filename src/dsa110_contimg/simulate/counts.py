"""A realistic radio sky: sources drawn from 1.4 GHz source counts around the pointings.

NVSS lists ~53 sources per square degree above 2.5 mJy and ~0.044 above 1 Jy; between the two
the integral counts follow N(>S) = 53 deg^-2 (S / 2.5 mJy)^-1.18 closely enough for a sky
model's purpose (the brightest few sources dominate what calibration sees). Spectral indices
are drawn around -0.7 (steep-spectrum sources) with a 0.3 spread. Sources are drawn in the
union of discs around the group centres, each disc only where no earlier disc reached, so an
overlapping strip of groups has one uniform density.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..catalogue import angular_separation_deg

COUNTS_PER_DEG2_AT_2P5MJY = 53.0
COUNTS_SLOPE = 1.18


def draw_counts_sky(rng: np.random.Generator, centres: Sequence[tuple[float, float]],
                    radius_deg: float, min_flux_jy: float = 0.002, max_flux_jy: float = 5.0,
                    avoid: Sequence[tuple[float, float]] = (), avoid_deg: float = 0.05,
                    ) -> list[dict[str, Any]]:
    """Sources (simulator truth records) within ``radius_deg`` of any of ``centres``."""
    n_per_deg2 = COUNTS_PER_DEG2_AT_2P5MJY * (
        (min_flux_jy / 0.0025) ** -COUNTS_SLOPE - (max_flux_jy / 0.0025) ** -COUNTS_SLOPE)
    area = 2 * np.pi * (1 - np.cos(np.radians(radius_deg))) * (180 / np.pi) ** 2
    out: list[dict[str, Any]] = []
    done: list[tuple[float, float]] = []
    for k, (ra0, dec0) in enumerate(centres):
        n = rng.poisson(n_per_deg2 * area)
        # uniform on the spherical cap about (ra0, dec0)
        cos_r = rng.uniform(np.cos(np.radians(radius_deg)), 1.0, n)
        r = np.degrees(np.arccos(cos_r))
        pa = rng.uniform(0, 2 * np.pi, n)
        d0 = np.radians(dec0)
        rr = np.radians(r)
        dec = np.arcsin(np.sin(d0) * np.cos(rr) + np.cos(d0) * np.sin(rr) * np.cos(pa))
        ra = np.radians(ra0) + np.arctan2(np.sin(pa) * np.sin(rr) * np.cos(d0),
                                          np.cos(rr) - np.sin(d0) * np.sin(dec))
        ra, dec = np.degrees(ra) % 360.0, np.degrees(dec)
        # inverse of the truncated power law N(>S)
        u = rng.uniform(0, 1, n)
        a, b = min_flux_jy ** -COUNTS_SLOPE, max_flux_jy ** -COUNTS_SLOPE
        flux = (a - u * (a - b)) ** (-1.0 / COUNTS_SLOPE)
        alpha = rng.normal(-0.7, 0.3, n)
        keep = np.ones(n, bool)
        for rc, dc in done:
            keep &= angular_separation_deg(ra, dec, rc, dc) > radius_deg
        for ra_a, dec_a in avoid:
            keep &= angular_separation_deg(ra, dec, ra_a, dec_a) > avoid_deg
        done.append((ra0, dec0))
        for i in np.flatnonzero(keep):
            out.append({"name": f"C{k}-{len(out) + 1}", "ra_deg": float(ra[i]),
                        "dec_deg": float(dec[i]), "flux_jy": round(float(flux[i]), 6),
                        "spectral_index": round(float(alpha[i]), 3), "ref_freq_hz": 1.4e9,
                        "is_calibrator": False})
    return out
