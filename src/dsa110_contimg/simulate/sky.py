"""Sky and beam models shared by the simulator and the pipeline's own checks."""

from __future__ import annotations

import numpy as np
from scipy.special import j1

from .array import DISH_DIAMETER_M

C_M_S = 299_792_458.0


def airy_power(theta_rad: np.ndarray, freq_hz: np.ndarray | float,
               diameter_m: float = DISH_DIAMETER_M) -> np.ndarray:
    """Power pattern of a uniformly illuminated dish: (2 J1(x)/x)^2, x = pi D sin(theta)/lambda."""
    x = np.pi * diameter_m * np.sin(theta_rad) * np.asarray(freq_hz) / C_M_S
    x = np.where(np.abs(x) < 1e-9, 1e-9, x)
    return (2.0 * j1(x) / x) ** 2


def pointing_altaz(dec_deg: float, lat_deg: float) -> tuple[float, float]:
    """(az, alt) in degrees of a transit pointing at declination ``dec_deg``."""
    alt = 90.0 - abs(lat_deg - dec_deg)
    az = 0.0 if dec_deg > lat_deg else 180.0
    return az, alt


def enu_unit(az_deg: np.ndarray, alt_deg: np.ndarray) -> np.ndarray:
    az, alt = np.radians(az_deg), np.radians(alt_deg)
    return np.stack([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1)
