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

from ..calibration.catalog import angular_separation_deg

SURVEY_FREQ_HZ = 1.4e9
CATALOGUE_NAME = "sky_catalogue.csv"
FIELDS = ("name", "ra_deg", "dec_deg", "flux_jy", "ref_freq_hz")


def write_survey_catalogue(path: Path, sources: Iterable[dict[str, Any]], flux_error: float = 0.03,
                           seed: int = 0) -> Path:
    """Add ``sources`` (simulator truth records) to the catalogue at ``path``; entries already
    listed (within 1 arcsec) are kept as they are, so re-running never changes a flux."""
    path = Path(path)
    rows: list[dict[str, str]] = []
    if path.exists():
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
    known = [(float(r["ra_deg"]), float(r["dec_deg"])) for r in rows]
    rng = np.random.default_rng(seed)
    for s in sources:
        if any(angular_separation_deg(s["ra_deg"], s["dec_deg"], ra, dec) < 1 / 3600
               for ra, dec in known):
            continue
        flux = s["flux_jy"] * (SURVEY_FREQ_HZ / s["ref_freq_hz"]) ** s["spectral_index"]
        flux *= 1.0 + rng.normal(0.0, flux_error)
        rows.append({"name": s["name"], "ra_deg": f"{s['ra_deg']:.6f}",
                     "dec_deg": f"{s['dec_deg']:.6f}", "flux_jy": f"{flux:.4f}",
                     "ref_freq_hz": f"{SURVEY_FREQ_HZ:.0f}"})
        known.append((s["ra_deg"], s["dec_deg"]))
    tmp = path.with_name("." + path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return path
