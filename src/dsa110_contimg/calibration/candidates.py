"""Which calibrators can transit through the beam at a pointing declination.

Without a sky catalogue: the bundled reference list (the four flux standards and 21 bright
VLA calibrators). With one (``contimg catalog build``): every source of the catalogue that
the selection rule of :func:`..catalogue.select_calibrators` accepts - unresolved on
DSA-110's baselines (VLA L-band quality P or S in ``vla_config``, or compact in NVSS), at
least ``min_calibrator_flux_jy`` through the beam at transit, and isolated - plus the bundled
standards, whose flux models (Perley & Butler 2017) win over any catalogue row of the same
source.
"""

from __future__ import annotations

from pathlib import Path

from ..catalogue import CatalogueSource, SkyCatalogue, angular_separation_deg, select_calibrators
from ..catalogue.reference import Calibrator, load_calibrators
from ..catalogue.sources import DEFAULT_SPECTRAL_INDEX
from ..instrument import BAND_CENTRE_HZ, PrimaryBeam
from .options import CalibrationOptions
from .skymodel import transit_power

SAME_SOURCE_DEG = 30.0 / 3600.0
# neighbours dimmer than this cannot fail a candidate's isolation test: not worth reading
_NEIGHBOUR_MIN_JY = 0.05


def as_calibrator(src: CatalogueSource) -> Calibrator:
    """A catalogue row as the sky model's source type (survey index when none is listed)."""
    return Calibrator(name=src.name, ra_deg=float(src.ra_deg), dec_deg=float(src.dec_deg),
                      flux_jy=float(src.flux_jy),
                      spectral_index=float(DEFAULT_SPECTRAL_INDEX if src.spectral_index is None
                                           else src.spectral_index),
                      ref_freq_hz=float(src.ref_freq_hz or 1.4e9), kind=str(src.origin))


def calibrator_candidates(catalogue_db: Path | None, pointing_dec_deg: float,
                          options: CalibrationOptions, beam: PrimaryBeam) -> list[Calibrator]:
    """Bundled calibrators plus the catalogue's selection near ``pointing_dec_deg``.

    Raises ``CatalogueUnavailable`` when ``catalogue_db`` is given but cannot be read."""
    bundled = list(load_calibrators())
    if catalogue_db is None:
        return bundled
    reach = options.calibrator_radius_deg + options.calibrator_isolation_deg
    with SkyCatalogue.open(Path(catalogue_db)) as cat:
        rows = cat.dec_band(pointing_dec_deg - reach, pointing_dec_deg + reach,
                            min(_NEIGHBOUR_MIN_JY, options.min_calibrator_flux_jy))
    chosen = select_calibrators(
        rows, pointing_dec_deg, options.calibrator_radius_deg, options.min_calibrator_flux_jy,
        lambda off_deg: transit_power(beam, pointing_dec_deg + off_deg, pointing_dec_deg,
                                      BAND_CENTRE_HZ),
        options.calibrator_isolation_deg, options.calibrator_isolation_ratio,
        options.calibrator_vla_config, freq_hz=BAND_CENTRE_HZ)
    out = list(bundled)
    for src, _ in chosen:
        if any(angular_separation_deg(src.ra_deg, src.dec_deg, b.ra_deg, b.dec_deg)
               < SAME_SOURCE_DEG for b in bundled):
            continue
        out.append(as_calibrator(src))
    return out
