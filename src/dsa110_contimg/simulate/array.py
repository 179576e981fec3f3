"""The DSA-110 array as the simulator lays it out.

Station numbering follows the real array (1..117, outriggers 103-117, 96 stations with
data); the coordinates are a synthetic T of the real array's extent (~2.5 km E-W, ~1.5 km
N-S), dense near the centre. Swap in the surveyed station file when it is to hand.
"""

from __future__ import annotations

import numpy as np

from ..instrument import DISH_DIAMETER_M, OVRO_ALT_M, OVRO_LAT_DEG, OVRO_LON_DEG

__all__ = ["DISH_DIAMETER_M", "OVRO_ALT_M", "OVRO_LAT_DEG", "OVRO_LON_DEG", "station_enu",
           "preset_stations"]
N_STATIONS = 117
LIVE_STATIONS = tuple(range(1, 97))


def station_enu() -> dict[int, np.ndarray]:
    """East/North/Up (m) of every station relative to the array centre."""
    pos: dict[int, np.ndarray] = {}
    for i, k in enumerate(range(-25, 26)):  # stations 1..51: E-W arm, 26 at the centre
        east = 1250.0 * np.sign(k) * (abs(k) / 25) ** 1.5
        pos[i + 1] = np.array([east, 0.0, 0.0])
    for j in range(45):  # stations 52..96: N-S arm going north
        pos[52 + j] = np.array([0.0, 30.0 + 1470.0 * (j / 44) ** 1.5, 0.0])
    for j in range(6):  # stations 97..102: spare pads south of the E-W arm (no data)
        pos[97 + j] = np.array([-20.0 * (j + 1), -25.0, 0.0])
    for j in range(15):  # stations 103..117: outriggers, not connected
        ang = 2 * np.pi * j / 15
        pos[103 + j] = np.array([3000.0 * np.cos(ang), 2500.0 * np.sin(ang), 0.0])
    return pos


def preset_stations(preset: str) -> tuple[list[int], list[int]]:
    """(stations in the files, stations whose data the correlator leaves at zero)."""
    if preset == "tiny":
        live = list(range(20, 32)) + list(range(52, 56))
        return sorted(live + [97]), [97]
    if preset == "small":
        live = list(range(14, 38)) + list(range(52, 59))
        return sorted(live + [97, 98]), [97, 98]
    if preset == "full":
        return list(range(1, N_STATIONS + 1)), [s for s in range(1, N_STATIONS + 1)
                                                 if s not in LIVE_STATIONS]
    raise ValueError(f"unknown preset {preset!r}")
