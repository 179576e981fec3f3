"""The bundled calibrator list (see data/calibrators.csv for where the numbers come from)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Calibrator:
    name: str
    ra_deg: float
    dec_deg: float
    flux_jy: float
    spectral_index: float
    ref_freq_hz: float
    kind: str

    def flux_at(self, freq_hz: float) -> float:
        return self.flux_jy * (freq_hz / self.ref_freq_hz) ** self.spectral_index


def _sexagesimal(text: str, hours: bool) -> float:
    sign = -1.0 if text.strip().startswith("-") else 1.0
    d, m, s = (abs(float(x)) for x in text.strip().lstrip("+-").split(":"))
    value = sign * (d + m / 60 + s / 3600)
    return value * 15.0 if hours else value


@lru_cache(maxsize=1)
def load_calibrators() -> tuple[Calibrator, ...]:
    text = resources.files("dsa110_contimg").joinpath("data/calibrators.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return tuple(
        Calibrator(name=r["name"], ra_deg=_sexagesimal(r["ra_hms"], True),
                   dec_deg=_sexagesimal(r["dec_dms"], False), flux_jy=float(r["flux_jy"]),
                   spectral_index=float(r["spectral_index"]), ref_freq_hz=float(r["ref_freq_hz"]),
                   kind=r["kind"])
        for r in rows
    )


def get_calibrator(name: str) -> Calibrator:
    for cal in load_calibrators():
        if cal.name.lower() == name.lower():
            return cal
    raise KeyError(f"{name!r} is not in the bundled calibrator list")


def angular_separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


SURVEY_DEFAULT_INDEX = -0.7  # typical of the sources a 1.4 GHz survey lists (no index given)


def load_sky_catalogue(path: str | Path) -> tuple[Calibrator, ...]:
    """A survey catalogue (CSV: name, ra_deg, dec_deg, flux_jy; optional spectral_index and
    ref_freq_hz, default -0.7 at 1.4 GHz) for modelling the field around a calibrator."""
    from ..errors import ConfigError

    p = Path(path)
    try:
        with p.open() as fh:
            rows = list(csv.DictReader(fh))
        return tuple(
            Calibrator(name=r["name"], ra_deg=float(r["ra_deg"]), dec_deg=float(r["dec_deg"]),
                       flux_jy=float(r["flux_jy"]),
                       spectral_index=float(r.get("spectral_index") or SURVEY_DEFAULT_INDEX),
                       ref_freq_hz=float(r.get("ref_freq_hz") or 1.4e9), kind="survey")
            for r in rows)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"CONTIMG_CAL_FIELD_CATALOGUE: {p} is unreadable ({type(exc).__name__}: "
                          f"{exc}); it needs columns name, ra_deg, dec_deg, flux_jy") from exc
