"""One catalogue source, and the project's one angular-separation function.

Every catalogue the package reads (VLA calibrator list, NVSS, the project's CSV, the bundled
flux standards) becomes a :class:`CatalogueSource`, so selection, cone search and coverage
code never care which file a source came from; ``origin`` says it when it matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import overload

import numpy as np

ORIGINS = ("nvss", "vla", "csv", "standard")
DEFAULT_REF_FREQ_HZ = 1.4e9
DEFAULT_SPECTRAL_INDEX = -0.7
VLA_CONFIGS = "ABCD"


@dataclass(frozen=True, slots=True)
class CatalogueSource:
    """A point (or Gaussian) source: J2000 position in degrees, flux density in Jy at ``ref_freq_hz``.

    ``spectral_index`` (S ~ nu^alpha) is None when the catalogue does not give one;
    ``major_arcsec``/``minor_arcsec`` are deconvolved sizes when known (None: unknown or
    point-like). ``vla_lband_codes`` holds the four quality letters (configurations A, B, C, D)
    of the VLA list's 20 cm line, e.g. ``"XXSP"``; None for sources not from that list.
    """

    name: str
    ra_deg: float
    dec_deg: float
    flux_jy: float
    spectral_index: float | None = None
    ref_freq_hz: float = DEFAULT_REF_FREQ_HZ
    major_arcsec: float | None = None
    minor_arcsec: float | None = None
    origin: str = "csv"
    vla_lband_codes: str | None = None

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise ValueError(f"origin {self.origin!r} is not one of {', '.join(ORIGINS)}")
        if self.vla_lband_codes is not None and len(self.vla_lband_codes) != 4:
            raise ValueError(f"vla_lband_codes {self.vla_lband_codes!r} must have 4 letters")

    def flux_at(self, freq_hz: float, default_index: float = DEFAULT_SPECTRAL_INDEX) -> float:
        """Flux density (Jy) at ``freq_hz``: a power law from ``ref_freq_hz``.

        ``default_index`` stands in when the catalogue gives no spectral index (-0.7 is the
        typical optically thin synchrotron spectrum of the faint radio sky).
        """
        alpha = default_index if self.spectral_index is None else self.spectral_index
        return self.flux_jy * (freq_hz / self.ref_freq_hz) ** alpha

    def lband_code(self, config: str) -> str | None:
        """The VLA 20 cm quality letter for array configuration ``config`` (A-D), if known."""
        if self.vla_lband_codes is None:
            return None
        return self.vla_lband_codes[vla_config_index(config)]


def vla_config_index(config: str) -> int:
    """0-3 for VLA configuration A-D; ValueError for anything else."""
    if len(config) != 1 or config.upper() not in VLA_CONFIGS:
        raise ValueError(f"VLA configuration {config!r} is not one of A, B, C, D")
    return VLA_CONFIGS.index(config.upper())


@overload
def angular_separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float: ...
@overload
def angular_separation_deg(ra1: np.ndarray | float, dec1: np.ndarray | float,
                           ra2: np.ndarray | float, dec2: np.ndarray | float) -> np.ndarray: ...


def angular_separation_deg(ra1, dec1, ra2, dec2):
    """Great-circle separation (deg) of two positions (deg); floats or broadcasting arrays.

    Vincenty's form (atan2 of the cross and dot products): accurate at every separation,
    unlike the arccos form, which loses all precision below ~1 arcsec, and the haversine,
    which degrades near 180 deg. Plain floats in give a float out (no numpy overhead).
    """
    if all(isinstance(v, (int, float)) for v in (ra1, dec1, ra2, dec2)):
        d1, d2 = math.radians(dec1), math.radians(dec2)
        dra = math.radians(ra2 - ra1)
        sd1, cd1, sd2, cd2 = math.sin(d1), math.cos(d1), math.sin(d2), math.cos(d2)
        cdra = math.cos(dra)
        num = math.hypot(cd2 * math.sin(dra), cd1 * sd2 - sd1 * cd2 * cdra)
        return math.degrees(math.atan2(num, sd1 * sd2 + cd1 * cd2 * cdra))
    d1, d2 = np.radians(dec1), np.radians(dec2)
    dra = np.radians(np.subtract(ra2, ra1))
    sd1, cd1, sd2, cd2 = np.sin(d1), np.cos(d1), np.sin(d2), np.cos(d2)
    cdra = np.cos(dra)
    num = np.hypot(cd2 * np.sin(dra), cd1 * sd2 - sd1 * cd2 * cdra)
    return np.degrees(np.arctan2(num, sd1 * sd2 + cd1 * cd2 * cdra))
