"""A survey catalogue of the simulated sky: what NVSS is to the real one.

Calibration models the field from a survey catalogue (``CONTIMG_CAL_FIELD_CATALOGUE``); for
simulated data that catalogue has to describe the simulated sky. It is written the way a
1.4 GHz survey lists sources: positions, one flux density per source with a few per cent of
measurement scatter, and no spectral index (the pipeline assumes a typical one).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..catalogue.reference import angular_separation_deg

SURVEY_FREQ_HZ = 1.4e9
CATALOGUE_NAME = "sky_catalogue.csv"
FIELDS = ("name", "ra_deg", "dec_deg", "flux_jy", "ref_freq_hz")


class _PositionIndex:
    """Positions on the sky, binned by declination strip, for "is one within r?" queries."""

    def __init__(self, positions: Iterable[tuple[float, float]], strip_deg: float = 0.1) -> None:
        self.strip = strip_deg
        self.bins: dict[int, list[tuple[float, float]]] = {}
        for ra, dec in positions:
            self.add(ra, dec)

    def add(self, ra: float, dec: float) -> None:
        self.bins.setdefault(int(np.floor(dec / self.strip)), []).append((ra, dec))

    def near(self, ra: float, dec: float, radius_deg: float) -> bool:
        k = int(np.floor(dec / self.strip))
        reach = int(np.ceil(radius_deg / self.strip))
        for j in range(k - reach, k + reach + 1):
            for r2, d2 in self.bins.get(j, ()):
                if angular_separation_deg(ra, dec, r2, d2) < radius_deg:
                    return True
        return False


def write_survey_catalogue(path: Path, sources: Iterable[dict[str, Any]], flux_error: float = 0.03,
                           seed: int = 0) -> Path:
    """Add ``sources`` (simulator truth records) to the catalogue at ``path``; entries already
    listed (within 1 arcsec) are kept as they are, so re-running never changes a flux."""
    path = Path(path)
    rows: list[dict[str, str]] = []
    if path.exists():
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
    known = _PositionIndex([(float(r["ra_deg"]), float(r["dec_deg"])) for r in rows])
    rng = np.random.default_rng(seed)
    for s in sources:
        if known.near(s["ra_deg"], s["dec_deg"], 1 / 3600):
            continue
        flux = s["flux_jy"] * (SURVEY_FREQ_HZ / s["ref_freq_hz"]) ** s["spectral_index"]
        flux *= 1.0 + rng.normal(0.0, flux_error)
        rows.append({"name": s["name"], "ra_deg": f"{s['ra_deg']:.6f}",
                     "dec_deg": f"{s['dec_deg']:.6f}", "flux_jy": f"{flux:.4f}",
                     "ref_freq_hz": f"{SURVEY_FREQ_HZ:.0f}"})
        known.add(s["ra_deg"], s["dec_deg"])
    tmp = path.with_name("." + path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return path


NVSS_NAME = "sky_nvss.tdat"
NVSS_NOISE_MJY = 0.45      # NVSS's rms in Stokes I
NVSS_BEAM_ARCSEC = 45.0


def survey_view(sources: Iterable[dict[str, Any]], seed: int = 0, min_flux_jy: float = 0.005,
                flux_error: float = 0.03, noise_mjy: float = NVSS_NOISE_MJY,
                position_errors: bool = True) -> list[dict[str, Any]]:
    """What a 1.4 GHz survey like NVSS lists of the simulated sky: each source's 1.4 GHz flux
    with ``flux_error`` fractional and ``noise_mjy`` additive errors, positions shifted by
    NVSS-like errors (sigma per coordinate sqrt(0.5^2 + (0.5 beam / SNR)^2) arcsec), nothing
    below ``min_flux_jy``, and no spectral index. One generator per seed, drawn per source in
    order, so the same sky gives the same survey."""
    rng = np.random.default_rng([seed, 0x5E7])
    out = []
    for s in sources:
        true = s["flux_jy"] * (SURVEY_FREQ_HZ / s["ref_freq_hz"]) ** s["spectral_index"]
        flux = true * (1.0 + rng.normal(0.0, flux_error)) + rng.normal(0.0, noise_mjy * 1e-3)
        snr = max(flux / (noise_mjy * 1e-3), 1.0)
        sigma = np.hypot(0.5, 0.5 * NVSS_BEAM_ARCSEC / snr) if position_errors else 0.0
        d_ra, d_dec = rng.normal(0.0, sigma, 2) / 3600.0
        if flux < min_flux_jy:
            continue
        dec = s["dec_deg"] + d_dec
        ra = (s["ra_deg"] + d_ra / max(np.cos(np.radians(dec)), 1e-6)) % 360.0
        out.append({"name": s["name"], "ra_deg": ra, "dec_deg": dec, "flux_jy": flux,
                    "flux_error_jy": np.hypot(flux_error * flux, noise_mjy * 1e-3),
                    "major_arcsec": s.get("major_arcsec"), "minor_arcsec": s.get("minor_arcsec")})
    return out


def write_nvss_tdat(path: Path, listed: Iterable[dict[str, Any]]) -> Path:
    """Write survey rows (:func:`survey_view`) as HEASARC distributes NVSS: a TDAT file with
    its ``<HEADER>`` of ``field[...]`` definitions and ``line[1]`` layout, ``|``-separated
    records after ``<DATA>``, fluxes in mJy, and ``<END>``."""
    path = Path(path)
    header = [
        "<HEADER>",
        "#",
        "# TABLE: heasarc_nvss (simulated sky, written by dsa110-contimg simulate)",
        "#",
        "table_name = heasarc_nvss",
        'table_description = "NRAO VLA Sky Survey Catalog (NVSS), simulated"',
        "table_security = public",
        "#",
        "field[name] = char14 (index) // Source Designation",
        "field[ra] = float8:.5f_degree (key) // Right Ascension",
        "field[dec] = float8:.5f_degree (key) // Declination",
        "field[flux_20_cm] = float4:.2f_mJy // Integrated 1.4 GHz Flux Density",
        "field[flux_20_cm_error] = float4:.2f_mJy // Error in Flux Density",
        "field[major_axis] = float4:.1f_arcsec // Deconvolved Major Axis",
        "field[minor_axis] = float4:.1f_arcsec // Deconvolved Minor Axis",
        "#",
        "parameter_defaults = name ra dec flux_20_cm",
        "#",
        "line[1] = name ra dec flux_20_cm flux_20_cm_error major_axis minor_axis",
        "#",
        "<DATA>",
    ]

    def size(v: Any) -> str:
        return "" if v is None else f"{float(v):.1f}"

    rows = [f"{r['name'].replace('|', '_')}|{r['ra_deg']:.5f}|{r['dec_deg']:.5f}|"
            f"{r['flux_jy'] * 1e3:.2f}|{r['flux_error_jy'] * 1e3:.2f}|"
            f"{size(r.get('major_arcsec'))}|{size(r.get('minor_arcsec'))}|" for r in listed]
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text("\n".join(header + rows + ["<END>", ""]))
    tmp.replace(path)
    return path
