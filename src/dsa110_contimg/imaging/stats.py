"""Image statistics the imaging stage records and the image gate judges."""

from __future__ import annotations

from typing import Any

import numpy as np


def robust_rms(values: np.ndarray, stride: int = 1) -> float:
    """1.4826 x the median absolute deviation of the finite values (sources barely move it);
    a 2-D image with ``stride`` > 1 is subsampled every ``stride``-th pixel on both axes."""
    v = np.asarray(values, dtype=np.float64)
    if stride > 1 and v.ndim == 2:
        v = v[::stride, ::stride]
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def image_statistics(image: np.ndarray, inbeam: np.ndarray) -> dict[str, Any]:
    """rms / peak / dynamic range inside ``inbeam`` (2-D bool) of a 2-D image."""
    region = image[inbeam]
    n = int(region.size)
    finite = np.isfinite(region)
    vals = region[finite]
    out: dict[str, Any] = {"n_inbeam": n,
                           "nonfinite_fraction": float(1 - finite.mean()) if n else 1.0}
    if vals.size == 0:
        out.update(rms_jy=float("nan"), peak_jy=float("nan"), min_jy=float("nan"),
                   dynamic_range=float("nan"), n_above_5sigma=0, frac_above_5sigma=0.0,
                   artefact_ratio=float("nan"), peak_pixel=None)
        return out
    rms = robust_rms(vals)
    peak = float(vals.max())
    vmin = float(vals.min())
    masked = np.where(inbeam & np.isfinite(image), image, -np.inf)
    py, px = np.unravel_index(int(np.argmax(masked)), image.shape)
    above = int((vals > 5 * rms).sum()) if rms > 0 else 0
    out.update(rms_jy=rms, peak_jy=peak, min_jy=vmin,
               dynamic_range=peak / rms if rms > 0 else float("nan"),
               n_above_5sigma=above, frac_above_5sigma=above / vals.size,
               artefact_ratio=peak / abs(vmin) if vmin < 0 else float("inf"),
               peak_pixel=(int(px), int(py)))
    return out
