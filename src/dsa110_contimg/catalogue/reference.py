"""The bundled reference calibrators with their flux models (data/calibrators.csv: the four
Perley & Butler 2017 flux standards and 21 VLA secondaries; the file says where each number
comes from)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .sources import angular_separation_deg

__all__ = ["Calibrator", "angular_separation_deg", "get_calibrator", "load_calibrators"]


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

