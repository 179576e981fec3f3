"""A quick-look PNG for astronomers skimming the night: image, beam ellipse, colour bar.

Matplotlib's object API with the Agg canvas (no pyplot, so no global figure state and no
display needed in a worker process). Large images are max-pooled to ~1200 pixels (a stride
would drop the 6-pixel point sources of a 4096^2 image; the pooled noise looks biased a little
positive, which a quick look can afford). The colour scale runs from -3 to 100 sigma (less if
the peak is lower) with an arcsinh stretch: noise, faint sources and the artefacts around the
calibrator are all visible, the calibrator saturates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .stats import robust_rms


def _max_pool(data: np.ndarray, step: int) -> np.ndarray:
    """Block maximum over step x step pixels (NaN-aware); the grid matches data[::step, ::step]."""
    if step == 1:
        return data
    ny, nx = data.shape
    py, px = -ny % step, -nx % step
    padded = np.pad(data, ((0, py), (0, px)), constant_values=np.nan)
    blocks = padded.reshape(padded.shape[0] // step, step, padded.shape[1] // step, step)
    with np.errstate(all="ignore"):
        finite = np.isfinite(blocks).any(axis=(1, 3))
        out = np.where(finite, np.nanmax(np.where(np.isfinite(blocks), blocks, -np.inf),
                                         axis=(1, 3)), np.nan)
    return out.astype(np.float32)


def write_quicklook(fits_path: Path, png_path: Path, title: str = "",
                    pb: np.ndarray | None = None, pb_level: float | None = None,
                    rms: float | None = None, max_pixels: int = 1200) -> Path:
    """Render ``fits_path`` (a restored image) to ``png_path``; returns the path.

    ``rms`` is the stage's in-beam noise (so the caption matches the QA numbers); without it
    the whole image's robust rms is used.
    """
    from astropy.io import fits
    from astropy.visualization import AsinhStretch, ImageNormalize
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Ellipse

    with fits.open(fits_path) as hdul:
        header = hdul[0].header
        data = np.squeeze(hdul[0].data).astype(np.float32)
    from .pbcor import quiet_wcs

    wcs = quiet_wcs(header).celestial
    step = max(1, int(np.ceil(max(data.shape) / max_pixels)))
    shown = _max_pool(data, step)
    wcs_shown = wcs[::step, ::step] if step > 1 else wcs
    sigma = rms if rms is not None and np.isfinite(rms) and rms > 0 else robust_rms(data)
    finite = data[np.isfinite(data)]
    peak = float(finite.max()) if finite.size else 1.0
    if not np.isfinite(sigma) or sigma <= 0:
        sigma = max(abs(peak), 1e-6) / 100.0
    vmin, vmax = -3.0 * sigma, max(10.0 * sigma, min(0.25 * peak, 100.0 * sigma))
    norm = ImageNormalize(vmin=vmin * 1e3, vmax=vmax * 1e3, stretch=AsinhStretch(a=0.1))

    fig = Figure(figsize=(8.0, 7.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1, projection=wcs_shown)
    im = ax.imshow(shown * 1e3, origin="lower", cmap="inferno", norm=norm)
    cb = fig.colorbar(im, ax=ax, pad=0.02, fraction=0.046)
    cb.set_label("mJy/beam")
    ax.set_xlabel("RA (ICRS)")
    ax.set_ylabel("Dec (ICRS)")
    if pb is not None and pb_level is not None:
        pb_shown = pb[::step, ::step][: shown.shape[0], : shown.shape[1]] if step > 1 else pb
        ax.contour(pb_shown, levels=[pb_level, 0.5], colors=["cyan", "cyan"],
                   linestyles=["dotted", "dashed"], linewidths=0.8)
    bmaj, bmin, bpa = (header.get(k) for k in ("BMAJ", "BMIN", "BPA"))
    if bmaj and bmin:
        pix = abs(float(header["CDELT2"])) * step
        ny, nx = shown.shape
        w, h = bmin / pix, bmaj / pix
        cx, cy = 0.06 * nx + h / 2, 0.06 * ny + h / 2
        # BPA is east of north; on an RA-decreasing x axis that is counter-clockwise from +y
        ax.add_patch(Ellipse((cx, cy), width=w, height=h, angle=float(bpa or 0.0),
                             facecolor="none", edgecolor="white", linewidth=1.2))
        beam = f"beam {bmaj * 3600:.1f}\u2033 \u00d7 {bmin * 3600:.1f}\u2033, PA {bpa or 0:.0f}\u00b0"
    else:
        beam = "no restoring beam"
    freq = header.get("RESTFRQ") or header.get("CRVAL3")
    sub = f"{beam}  |  rms {sigma * 1e3:.2f} mJy/beam  |  peak {peak:.3g} Jy/beam"
    if freq:
        sub += f"  |  {float(freq) / 1e6:.1f} MHz"
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=9)
    png_path = Path(png_path)
    fig.savefig(png_path, format="png")
    return png_path
