"""Bright catalogue sources: fitted and subtracted along the drift before cleaning, restored after.

Why: the dishes do not track, so a source drifts through the fixed beam and its apparent flux
changes from one integration to the next. tclean models a static sky; for a source of several
Jy that mismatch leaves an east-west stripe at ~1 % of its flux, which biased neighbours by up to
50 % (bench-e2e, 3C286 at 15 Jy) and, because each major cycle removes only about half of it,
sets the number of major cycles. The beam along the drift is known: it is the Airy model that
the calibration sky model and the primary-beam correction already use.

So, on the imaging copy (never on the group's MS), for every known source whose apparent
flux through the drift-averaged beam exceeds ``CONTIMG_IMG_PEEL_MIN_APPARENT_JY`` (the
bundled calibrators and, when configured, the survey catalogue ``CONTIMG_CAL_FIELD_CATALOGUE``;
at most ``MAX_SOURCES``):

1. its flux density is fitted to the calibrated visibilities in ~16 frequency blocks (weighted
   linear least squares, jointly for all such sources), with the beam applied per integration
   and channel;
2. in a group calibrated with gains carried over from an earlier group, the copy is first
   phase-self-calibrated on that model (per integration and polarisation; carried-over gains
   drift by degrees in five minutes) and the fluxes are fitted again;
3. the fitted model is subtracted from the copy, which tclean then images;
4. after export, each source inside the image is added back to the restored image as a
   restoring-beam Gaussian whose peak is its fitted flux at the reference frequency times the
   drift-averaged beam at its position, exactly what the primary-beam correction divides by.

Its flux in the products is therefore the uv fit, not a deconvolution; the FITS header
(``PEELn``) and the imaging record say so, with the fitted and the catalogue values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..calibration.candidates import as_calibrator
from ..calibration.casarun import open_table, read_ms_info
from ..calibration.skymodel import (
    beam_along_drift,
    delay_path_m,
    direction_cosines,
    phasors,
    rows_to_integrations,
)
from ..catalogue import CatalogueFormatError, CatalogueUnavailable, survey_sources
from ..catalogue.reference import (
    Calibrator,
    angular_separation_deg,
    load_calibrators,
)
from ..errors import StageError
from ..instrument import PrimaryBeam
from .pbcor import drift_averaged_beam, quiet_wcs

log = structlog.get_logger(__name__)

N_BLOCKS = 16            # frequency blocks fitted independently (a subband each at full size)
PEEL_SEARCH_RADIUS_DEG = 6.0  # beyond, the beam is ~1e-4: nothing to peel
MAX_SOURCES = 40         # fitted jointly; cost grows with the square in the normal equations
#: A block whose fitted flux lies this many robust deviations (1.4826 MAD) from the source's
#: other blocks is replaced by interpolation between them: a block that lost most of its data
#: to flags, or kept a little interference, gives an ill-conditioned or biased fit (a tiny
#: group with simulated interference fitted 1175 Jy for 3C286 in one block of sixteen).
OUTLIER_SIGMA = 5.0
_MODEL_SAMPLES = 20_000_000  # source x channel x row model values held at once (160 MB)


@dataclass(frozen=True)
class PeeledSource:
    name: str
    ra_deg: float
    dec_deg: float
    catalogue_jy: float        # at the reference frequency
    flux_jy: float             # fitted, at the reference frequency
    spectral_index: float      # fitted over the blocks
    drift_beam: float          # drift-averaged beam at the source, reference frequency
    block_flux_jy: tuple[float, ...]
    restored: bool = False     # added back into the image (False: outside it)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ra_deg": self.ra_deg, "dec_deg": self.dec_deg,
                "catalogue_jy": round(self.catalogue_jy, 4), "flux_jy": round(self.flux_jy, 4),
                "spectral_index": round(self.spectral_index, 3),
                "drift_beam": round(self.drift_beam, 4), "restored": self.restored,
                "block_flux_jy": [round(v, 4) for v in self.block_flux_jy]}


def peel_candidates(field_catalogue: str | Path | None = None,
                    centre: tuple[float, float] | None = None,
                    radius_deg: float = PEEL_SEARCH_RADIUS_DEG) -> tuple[Calibrator, ...]:
    """The bundled calibrators plus the survey's sources within ``radius_deg`` of ``centre``
    (those within 1 arcmin of a calibrator are the calibrator). ``field_catalogue`` is the
    built sky catalogue or a catalogue file; an unusable one is a StageError (retried)."""
    cals = load_calibrators()
    if not field_catalogue or centre is None:
        return cals
    try:
        rows = survey_sources(Path(field_catalogue), centre[0], centre[1], radius_deg)
    except (CatalogueUnavailable, CatalogueFormatError, OSError) as exc:
        raise StageError(f"sky catalogue for peeling unusable: {exc}") from exc
    field = [as_calibrator(s) for s in rows
             if all(angular_separation_deg(s.ra_deg, s.dec_deg, c.ra_deg, c.dec_deg) > 1 / 60
                    for c in cals)]
    return (*cals, *field)


def select_bright(track_ra_deg: np.ndarray, track_dec_deg: np.ndarray, weights: np.ndarray,
                  freq_hz: float, beam: PrimaryBeam, min_apparent_jy: float,
                  catalogue: tuple[Calibrator, ...] | None = None) -> list[Calibrator]:
    """Catalogue sources at least ``min_apparent_jy`` through the drift-averaged beam, the
    brightest ``MAX_SOURCES`` of them, brightest first."""
    if min_apparent_jy <= 0:
        return []
    cands = catalogue if catalogue is not None else load_calibrators()
    ra = np.array([c.ra_deg for c in cands])
    dec = np.array([c.dec_deg for c in cands])
    power = drift_averaged_beam(ra, dec, track_ra_deg, track_dec_deg, weights, freq_hz, beam)
    apparent = np.array([c.flux_at(freq_hz) for c in cands]) * power
    order = [i for i in np.argsort(-apparent) if apparent[i] >= min_apparent_jy]
    return [cands[i] for i in order[:MAX_SOURCES]]


def _blocks(nchan: int) -> np.ndarray:
    """Start channel of each of up to N_BLOCKS contiguous frequency blocks."""
    size = max(1, int(np.ceil(nchan / N_BLOCKS)))
    return np.arange(0, nchan, size)


def _spectrum(freqs: np.ndarray, fluxes: np.ndarray, weight: np.ndarray, ref_hz: float,
              fallback_index: float) -> tuple[float, float]:
    """(flux at ref_hz, spectral index) from a weighted power-law fit to the block fluxes."""
    good = (fluxes > 0) & (weight > 0)
    if good.sum() >= 2:
        x = np.log(freqs[good] / ref_hz)
        y = np.log(fluxes[good])
        w = weight[good] * fluxes[good] ** 2  # var(log S) ~ var(S) / S^2
        slope, intercept = np.polyfit(x, y, 1, w=np.sqrt(w))
        return float(np.exp(intercept)), float(slope)
    if good.any():
        f = freqs[good][0]
        return float(fluxes[good][0] * (ref_hz / f) ** fallback_index), fallback_index
    return 0.0, fallback_index


def replace_outlier_blocks(flux: np.ndarray, diag: np.ndarray, block_freqs: np.ndarray,
                           nsigma: float = OUTLIER_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """(fluxes, replaced) with each source's outlying or unconstrained blocks replaced.

    ``flux`` and ``diag`` (the normal equations' diagonal: no data gives 0) are (block,
    source). The scatter floor of 1 % of the median keeps a bright source's smooth spectrum
    (a few per cent across the band) from rejecting its own edges.
    """
    out = flux.copy()
    replaced = np.zeros(flux.shape, dtype=bool)
    for k in range(flux.shape[1]):
        f = flux[:, k]
        ok = np.isfinite(f) & (diag[:, k] > 0)
        if ok.sum() < 3:
            continue
        med = float(np.median(f[ok]))
        # deviations in units of each block's own noise (a block with half the data
        # unflagged scatters sqrt(2) more), then in units of their robust spread
        scale = np.sqrt(np.where(ok, diag[:, k], 0.0) / np.median(diag[ok, k]))
        dev = np.abs(np.where(ok, f, med) - med)
        spread = max(1.4826 * float(np.median((dev * scale)[ok])), 0.01 * abs(med), 1e-9)
        bad = ~ok | (dev * scale > nsigma * spread)
        if bad.any() and not bad.all():
            out[bad, k] = np.interp(block_freqs[bad], block_freqs[~bad], f[~bad])
            replaced[bad, k] = True
    return out, replaced


def integration_chunks(times: np.ndarray, max_rows: int) -> list[tuple[int, int]] | None:
    """Row ranges [start, stop) made of whole integrations, about ``max_rows`` each; None when
    an integration's rows are not contiguous (the MS is not time-ordered)."""
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(times) != 0) + 1, [len(times)]])
    if len(np.unique(times)) != len(bounds) - 1:
        return None
    out, start = [], 0
    for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True):
        if b1 - start > max_rows and b0 > start:
            out.append((start, int(b0)))
            start = int(b0)
    out.append((start, len(times)))
    return out


def phase_gains(x: np.ndarray, a1: np.ndarray, a2: np.ndarray, nant: int,
                iterations: int = 100, tol: float = 1e-7) -> np.ndarray:
    """Unit-modulus antenna gains g with x_ab ~ g_a conj(g_b) |x_ab| (alternating least squares).

    ``x`` is, per baseline, sum over channels of w conj(model) data; antennas without data keep
    g = 1. The overall phase is arbitrary and cancels in g_a conj(g_b)."""
    g = np.ones(nant, dtype=complex)
    for _ in range(iterations):
        to_a1, to_a2 = x * g[a2], np.conj(x) * g[a1]
        s = (np.bincount(a1, weights=to_a1.real, minlength=nant)
             + 1j * np.bincount(a1, weights=to_a1.imag, minlength=nant)
             + np.bincount(a2, weights=to_a2.real, minlength=nant)
             + 1j * np.bincount(a2, weights=to_a2.imag, minlength=nant))
        mag = np.abs(s)
        new = np.where(mag > 0, s / np.where(mag > 0, mag, 1.0), g)
        new = g + new  # damped: the midpoint, back onto the unit circle
        new /= np.where(np.abs(new) > 0, np.abs(new), 1.0)
        if np.max(np.abs(new - g)) < tol:
            return new
        g = new
    return g


class _FieldModel:
    """The sources' unit-flux model visibilities and the block-wise normal equations that fit
    their fluxes: flux constant within each frequency block, one (nsrc x nsrc) system per
    block."""

    def __init__(self, ms: Path, sources: list[Calibrator], az_deg: float, alt_deg: float,
                 beam: PrimaryBeam) -> None:
        self.info = info = read_ms_info(ms)
        self.freqs = freqs = info.freqs_hz
        self.starts = _blocks(len(freqs))
        self.ends = np.append(self.starts[1:], len(freqs))
        self.nsrc, self.nblk = len(sources), len(self.starts)
        self.beams = [beam_along_drift(s.ra_deg, s.dec_deg, info, az_deg, alt_deg, beam)
                      for s in sources]
        self.lmns = [direction_cosines(s.ra_deg, s.dec_deg, *info.phase_centre_deg)
                     for s in sources]
        self.block_freqs = np.add.reduceat(freqs, self.starts) / (self.ends - self.starts)
        self._scratch: list[np.ndarray] = []

    def models(self, tb: Any, start: int, nrow: int) -> np.ndarray:
        """Unit-flux visibilities of every source, (nsrc, nchan, nrow), single precision.

        Written into one buffer kept for the whole peel: a fresh 200 MB array per chunk
        would go to the kernel for new pages every time."""
        nsrc, freqs = self.nsrc, self.freqs
        it = rows_to_integrations(self.info.times_mjd, tb.getcol("TIME", start, nrow))
        uvw = tb.getcol("UVW", start, nrow)
        size = nsrc * len(freqs) * nrow
        if not self._scratch or self._scratch[0].size < size:
            self._scratch[:] = [np.empty(size, dtype=np.complex64)]
        m = self._scratch[0][:size].reshape(nsrc, len(freqs), nrow)
        steps = np.flatnonzero(np.diff(it)) + 1  # rows of one integration share a beam
        spans = list(zip(np.r_[0, steps], np.r_[steps, nrow], strict=True))
        for k, (lmn, b) in enumerate(zip(self.lmns, self.beams, strict=True)):
            phasors(delay_path_m(uvw, lmn), freqs, out=m[k])
            for r0, r1 in spans:
                m[k, :, r0:r1] *= b[it[r0]][:, None].astype(np.float32)
        return m

    @staticmethod
    def read(tb: Any, start: int, nrow: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(DATA, DATA with flagged and non-finite values zeroed, their weights)."""
        data = tb.getcol("DATA", start, nrow)  # (npol, nchan, nrow)
        ok = ~tb.getcol("FLAG", start, nrow) & np.isfinite(data)
        wt = np.where(ok, tb.getcol("WEIGHT", start, nrow)[:, None, :], 0.0)
        return data, np.where(ok, data, 0), wt

    def block_views(self, m: np.ndarray) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(b, c0, c1, block b of every source as float32 re, im pairs: (nsrc, 2 n)) per block."""
        for b, (c0, c1) in enumerate(zip(self.starts, self.ends, strict=True)):
            yield b, c0, c1, m[:, c0:c1, :].reshape(self.nsrc, -1).view(np.float32)

    def accumulate(self, m: np.ndarray, clean: np.ndarray, wt: np.ndarray,
                   normal: np.ndarray | None, rhs: np.ndarray) -> None:
        """Add a chunk's weighted normal equations, one (nsrc x nsrc) system per block (the
        matrix only depends on the model and the weights: None skips it).

        Only the real parts are wanted: Re(conj(a) b) = a.re b.re + a.im b.im, so the
        products run on the interleaved float32 views (half the flops of the complex ones,
        and no conjugated copy)."""
        wsum = wt.sum(axis=0).astype(np.float32)  # the model is the same in both polarisations
        z = (wt * clean).sum(axis=0).astype(np.complex64)
        for b, c0, c1, mb in self.block_views(m):
            rhs[b] += mb @ np.ascontiguousarray(z[c0:c1]).reshape(-1).view(np.float32)
            if normal is not None:  # a @ a.T of one array: numpy uses the symmetric product
                a = mb * np.repeat(np.sqrt(wsum[c0:c1].reshape(-1)), 2)
                normal[b] += a @ a.T

    def combine(self, flux: np.ndarray, m: np.ndarray) -> np.ndarray:
        """The model of all sources, (nchan, nrow): sum_k flux[block of c, k] m[k, c, r].

        The fluxes are real and constant within a block, so each block is one float32
        vector-matrix product on the interleaved view (an einsum over channels is ~4x
        slower)."""
        out = np.empty(m.shape[1:], dtype=np.complex64)
        for b, c0, c1, mb in self.block_views(m):
            out[c0:c1] = (flux[b].astype(np.float32) @ mb).view(np.complex64).reshape(c1 - c0, -1)
        return out

    def solve(self, normal: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fluxes per block and source, which of them were replaced as outliers)."""
        flux = np.full((self.nblk, self.nsrc), np.nan)
        for b in range(self.nblk):
            if np.all(np.diag(normal[b]) > 0):
                flux[b] = np.linalg.lstsq(normal[b], rhs[b], rcond=None)[0]
        flux, replaced = replace_outlier_blocks(flux, np.diagonal(normal, axis1=1, axis2=2),
                                                self.block_freqs)
        # a source without three constrained blocks: not subtracted
        return np.nan_to_num(flux), replaced


def _selfcal_pass(tb: Any, fm: _FieldModel, chunks: list[tuple[int, int]], flux: np.ndarray,
                  normal: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Phase-self-calibrate DATA in place on the fitted model, per integration and
    polarisation, and fit the fluxes again on the corrected data (same model and weights:
    the normal matrix stands). Returns (flux, replaced, the antenna phases applied)."""
    nant = len(fm.info.antenna_names)
    rhs = np.zeros((fm.nblk, fm.nsrc))
    phases = []
    for s0, s1 in chunks:
        nrow = s1 - s0
        data, clean, wt = fm.read(tb, s0, nrow)
        m = fm.models(tb, s0, nrow)
        model = fm.combine(flux, m)
        times = tb.getcol("TIME", s0, nrow)
        a1, a2 = tb.getcol("ANTENNA1", s0, nrow), tb.getcol("ANTENNA2", s0, nrow)
        x = (wt * np.conj(model)[None] * clean).sum(axis=1)  # (npol, nrow)
        corr = np.ones((data.shape[0], nrow), dtype=complex)
        for t in np.unique(times):
            rows = np.flatnonzero(times == t)
            for p in range(data.shape[0]):
                g = phase_gains(x[p, rows], a1[rows], a2[rows], nant)
                corr[p, rows] = np.conj(g[a1[rows]]) * g[a2[rows]]
                live = g[np.unique(np.concatenate([a1[rows], a2[rows]]))]
                phases.append(np.angle(live * np.exp(-1j * np.angle(live.mean()))))
        data = (data * corr[:, None, :]).astype(data.dtype)
        tb.putcol("DATA", data, s0, nrow)
        fm.accumulate(m, np.where(wt > 0, data, 0), wt, None, rhs)
    flux, replaced = fm.solve(normal, rhs)
    return flux, replaced, phases


def peel_sources(ms: Path, sources: list[Calibrator], az_deg: float, alt_deg: float,
                 ref_freq_hz: float, beam: PrimaryBeam, track_ra_deg: np.ndarray,
                 track_dec_deg: np.ndarray, weights: np.ndarray,
                 selfcal_min_jy: float = float("inf")) -> tuple[list[PeeledSource], dict[str, Any]]:
    """Fit ``sources`` to DATA of ``ms`` and subtract them in place (see the module docstring).

    When their apparent flux adds up to ``selfcal_min_jy`` or more, the data are first
    phase-self-calibrated on them, per integration and polarisation (gains carried over from
    an earlier group drift by degrees in five minutes; a source of several Jy measures that
    to a fraction of a degree, and the correction helps every source in the field)."""
    if not sources:
        return [], {"applied": False}
    t0 = time.perf_counter()
    fm = _FieldModel(ms, sources, az_deg, alt_deg, beam)
    nsrc, nblk = fm.nsrc, fm.nblk
    drift = drift_averaged_beam(np.array([s.ra_deg for s in sources]),
                                np.array([s.dec_deg for s in sources]), track_ra_deg,
                                track_dec_deg, weights, ref_freq_hz, beam)
    selfcal: dict[str, Any] = {"applied": False}
    with open_table(ms, readonly=False) as tb:
        n = int(tb.nrows())
        rows_per_chunk = max(256, _MODEL_SAMPLES // (nsrc * len(fm.freqs)))
        by_time = integration_chunks(tb.getcol("TIME"), rows_per_chunk)
        chunks = by_time or [(s0, min(n, s0 + rows_per_chunk)) for s0 in range(0, n, rows_per_chunk)]
        normal, rhs = np.zeros((nblk, nsrc, nsrc)), np.zeros((nblk, nsrc))
        for s0, s1 in chunks:
            data, clean, wt = fm.read(tb, s0, s1 - s0)
            fm.accumulate(fm.models(tb, s0, s1 - s0), clean, wt, normal, rhs)
        flux, replaced = fm.solve(normal, rhs)
        apparent = float(np.sum(np.maximum(flux.mean(axis=0), 0.0) * drift))
        if apparent >= selfcal_min_jy and by_time is not None:
            flux, replaced, phases = _selfcal_pass(tb, fm, chunks, flux, normal)
            spread = np.concatenate(phases) if phases else np.zeros(1)
            selfcal = {"applied": True, "apparent_jy": round(apparent, 3),
                       "phase_rms_deg": round(float(np.degrees(np.sqrt(np.mean(spread ** 2)))), 3)}
        elif apparent >= selfcal_min_jy:
            log.warning("imaging.selfcal_skipped", ms=str(ms), reason="rows not time-ordered")
        for s0, s1 in chunks:
            model = fm.combine(flux, fm.models(tb, s0, s1 - s0))
            data = tb.getcol("DATA", s0, s1 - s0)
            tb.putcol("DATA", (data - model[None]).astype(data.dtype), s0, s1 - s0)
    if not np.isfinite(flux).all():
        raise StageError(f"bright-source fit on {ms} gave non-finite fluxes")
    out = []
    for k, s in enumerate(sources):
        s_ref, alpha = _spectrum(fm.block_freqs, flux[:, k],
                                 np.where(replaced[:, k], 0.0, normal[:, k, k]), ref_freq_hz,
                                 s.spectral_index)
        out.append(PeeledSource(s.name, s.ra_deg, s.dec_deg, s.flux_at(ref_freq_hz), s_ref, alpha,
                                float(drift[k]), tuple(float(v) for v in flux[:, k])))
    log.info("imaging.peeled", ms=str(ms), duration_s=round(time.perf_counter() - t0, 2),
             sources={p.name: round(p.flux_jy, 3) for p in out}, selfcal=selfcal,
             blocks_replaced={p.name: int(replaced[:, k].sum()) for k, p in enumerate(out)
                              if replaced[:, k].any()})
    return out, selfcal


def restore_sources(image_fits: Path, peeled: list[PeeledSource], bmaj_arcsec: float,
                    bmin_arcsec: float, bpa_deg: float) -> list[PeeledSource]:
    """Add each peeled source inside the image back as a restoring-beam Gaussian (apparent
    flux: fitted flux x drift-averaged beam); returns them with ``restored`` set."""
    if not peeled:
        return []
    from dataclasses import replace

    from astropy.io import fits

    out = []
    with fits.open(image_fits, mode="update") as hdul:
        hdu = hdul[0]
        plane = hdu.data.reshape(hdu.data.shape[-2:])  # a view: (ny, nx)
        wcs = quiet_wcs(hdu.header).celestial
        ny, nx = plane.shape
        radius = int(np.ceil(3.0 * bmaj_arcsec / (abs(wcs.wcs.cdelt[1]) * 3600.0))) + 1
        pa = np.radians(bpa_deg)
        for i, p in enumerate(peeled):
            x, y = (float(v) for v in wcs.world_to_pixel_values(p.ra_deg, p.dec_deg))
            inside = 0 <= x <= nx - 1 and 0 <= y <= ny - 1
            if inside:
                x0, x1 = max(0, int(x) - radius), min(nx, int(x) + radius + 1)
                y0, y1 = max(0, int(y) - radius), min(ny, int(y) + radius + 1)
                gx, gy = np.meshgrid(np.arange(x0, x1), np.arange(y0, y1))
                ra, dec = wcs.pixel_to_world_values(gx, gy)
                east = ((ra - p.ra_deg + 180.0) % 360.0 - 180.0) * np.cos(np.radians(p.dec_deg)) * 3600
                north = (dec - p.dec_deg) * 3600.0
                major = east * np.sin(pa) + north * np.cos(pa)
                minor = east * np.cos(pa) - north * np.sin(pa)
                g = np.exp(-4 * np.log(2) * ((major / bmaj_arcsec) ** 2 + (minor / bmin_arcsec) ** 2))
                plane[y0:y1, x0:x1] += (p.flux_jy * p.drift_beam * g).astype(plane.dtype)
            hdu.header[f"PEEL{i + 1}"] = (f"{p.name[:30]} {p.flux_jy:.4f} Jy",
                                          "peeled, uv fit; " +
                                          ("restored" if inside else "outside image"))
            out.append(replace(p, restored=inside))
        hdul.flush()
    return out
