"""The instrument: where DSA-110 is, its dishes, its primary beam, and physical constants.

A leaf module: every stage, QA and the simulator may use it; it imports nothing of the
package above ``errors`` and ``configbase``.

The primary beam is one setting (:class:`BeamOptions`, ``CONTIMG_BEAM_*``) that the sky
model, peeling and the primary-beam correction all evaluate through :class:`PrimaryBeam`,
so a product made with one beam is never corrected with another. Three forms:

- ``airy``: a uniformly illuminated dish of ``dish_diameter_m``, (2 J1(x)/x)^2 with
  x = pi D sin(theta) / lambda (what the real system assumes, D = 4.65 m);
- ``gaussian``: exp(-4 ln 2 theta^2 / FWHM^2) with FWHM = ``gaussian_factor`` lambda / D,
  the usual description of a tapered feed (~1.2 lambda/D);
- ``fits``: a measured (or modelled) power pattern on a grid in the dish frame, from a FITS
  image: axis 1 ``L`` and axis 2 ``M`` are direction cosines from the pointing (L along
  increasing azimuth, M along increasing elevation), an optional axis 3 ``FREQ`` (Hz; the
  pattern is interpolated linearly between planes and held at the nearest one outside), power
  1 on axis. Outside the grid the power is 0.

Beams are evaluated at dish-frame offsets (l, m): :func:`dish_axes_enu` and
:func:`dish_axes_icrs` give the frame for a transit pointing (DSA-110 points on the meridian,
so the elevation axis is the local north (facing south) or south (facing north)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .configbase import setting
from .errors import ConfigError

C_M_S = 299_792_458.0
SIDEREAL_DAY_S = 86164.0905

OVRO_LAT_DEG = 37.2339
OVRO_LON_DEG = -118.2825
OVRO_ALT_M = 1222.0
DISH_DIAMETER_M = 4.65
# Band centre of DSA-110 (1311.25-1498.75 MHz), used when no MS says otherwise.
BAND_CENTRE_HZ = 1405.0e6

BEAM_KINDS = ("airy", "gaussian", "fits")


@dataclass(frozen=True)
class BeamOptions:
    """The primary-beam model, one setting for every stage that needs the beam."""

    kind: str = setting("CONTIMG_BEAM_MODEL", "airy", "Primary-beam model used by the sky model, peeling and primary-beam correction alike: 'airy' (uniformly illuminated dish of CONTIMG_BEAM_DISH_DIAMETER_M), 'gaussian' (FWHM = CONTIMG_BEAM_GAUSSIAN_FACTOR x lambda/D) or 'fits' (the image CONTIMG_BEAM_FITS)", choices=BEAM_KINDS)
    dish_diameter_m: float = setting("CONTIMG_BEAM_DISH_DIAMETER_M", DISH_DIAMETER_M, "Dish diameter D of the beam model (m)", minimum=0.1)
    gaussian_factor: float = setting("CONTIMG_BEAM_GAUSSIAN_FACTOR", 1.2, "Gaussian beam: FWHM in units of lambda/D", minimum=0.1)
    fits_path: str = setting("CONTIMG_BEAM_FITS", "", "Beam image for CONTIMG_BEAM_MODEL=fits: power on axes L, M (direction cosines in the dish frame: along increasing azimuth and elevation) and optionally FREQ (Hz), 1 on axis")


@dataclass(frozen=True)
class PrimaryBeam:
    """A circularly symmetric power pattern; picklable, so it crosses to worker processes."""

    kind: str = "airy"
    dish_diameter_m: float = DISH_DIAMETER_M
    gaussian_factor: float = 1.2
    fits_path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in BEAM_KINDS:
            raise ValueError(f"unknown beam model {self.kind!r}; one of {', '.join(BEAM_KINDS)}")
        if self.kind == "fits" and not self.fits_path:
            raise ValueError("a 'fits' beam needs the path of its image")

    @classmethod
    def from_options(cls, options: BeamOptions) -> PrimaryBeam:
        """The configured beam; a FITS beam is read (and checked) now, so a bad file stops
        start-up with one line rather than failing every group."""
        beam = cls(options.kind, float(options.dish_diameter_m), float(options.gaussian_factor),
                   options.fits_path if options.kind == "fits" else "")
        if beam.kind == "fits":
            _load_fits_beam(beam.fits_path)
        return beam

    def power_lm(self, dl: np.ndarray | float, dm: np.ndarray | float,
                 freq_hz: np.ndarray | float,
                 dn: np.ndarray | float | None = None) -> np.ndarray:
        """Power at dish-frame direction cosines (l, m) from the pointing (arrays broadcast);
        ``dn``, the cosine of the angle to the pointing, when given puts directions behind
        the dish (dn <= 0) at zero (l, m alone cannot tell front from back)."""
        l_, m_ = np.asarray(dl, dtype=float), np.asarray(dm, dtype=float)
        if self.kind != "fits":
            out = self.power(np.arcsin(np.clip(np.hypot(l_, m_), 0.0, 1.0)), freq_hz)
        else:
            out = _load_fits_beam(self.fits_path).power(l_, m_, np.asarray(freq_hz, dtype=float))
        if dn is None:
            return out
        return np.where(np.asarray(dn, dtype=float) > 0.0, out, 0.0)

    @classmethod
    def airy(cls, dish_diameter_m: float = DISH_DIAMETER_M) -> PrimaryBeam:
        return cls("airy", dish_diameter_m)

    def power(self, theta_rad: np.ndarray | float, freq_hz: np.ndarray | float) -> np.ndarray:
        """Power at angular offset ``theta_rad`` from the pointing (arrays broadcast); for a
        FITS beam the mean over position angle (for sizing images, not for correcting them)."""
        theta = np.asarray(theta_rad, dtype=float)
        freq = np.asarray(freq_hz, dtype=float)
        if self.kind == "airy":
            return airy_power(theta, freq, self.dish_diameter_m)
        if self.kind == "fits":
            angles = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
            r = np.sin(theta)[..., None]
            return _load_fits_beam(self.fits_path).power(
                r * np.cos(angles), r * np.sin(angles), freq[..., None]).mean(axis=-1)
        fwhm = self.gaussian_factor * C_M_S / freq / self.dish_diameter_m
        return np.exp(-4.0 * math.log(2.0) * (theta / fwhm) ** 2)

    def radius_at_level(self, level: float, freq_hz: float) -> float:
        """Smallest offset (deg) where the power falls to ``level`` (0 < level < 1); for a
        FITS beam the largest such offset over position angle, so an image sized by it holds
        the beam down to ``level`` in every direction."""
        from scipy.optimize import brentq

        if not 0.0 < level < 1.0:
            raise ValueError("level must lie in (0, 1)")
        if self.kind == "fits":
            return _load_fits_beam(self.fits_path).radius_at_level(level, freq_hz)
        # the first null of the Airy pattern is 1.22 lambda/D; the Gaussian falls smoothly
        hi = 1.2197 * C_M_S / freq_hz / self.dish_diameter_m * (
            0.999 if self.kind == "airy" else 3.0 * self.gaussian_factor)
        return math.degrees(brentq(lambda t: float(self.power(t, freq_hz)) - level, 0.0, hi))

    def describe(self) -> str:
        """One line for FITS headers and product records."""
        if self.kind == "airy":
            return f"airy D={self.dish_diameter_m:g}m"
        if self.kind == "fits":
            return f"fits {Path(self.fits_path).name}"
        return f"gaussian FWHM={self.gaussian_factor:g} lambda/D, D={self.dish_diameter_m:g}m"

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "description": self.describe()}
        if self.kind == "fits":
            out.update(fits_path=self.fits_path, sha256=_load_fits_beam(self.fits_path).sha256)
        else:
            out.update(dish_diameter_m=self.dish_diameter_m, gaussian_factor=self.gaussian_factor)
        return out


@dataclass(frozen=True)
class FitsBeam:
    """A gridded power pattern: ``values`` (nfreq, nm, nl) on ascending ``l``, ``m`` axes."""

    path: str
    l_axis: np.ndarray
    m_axis: np.ndarray
    freqs_hz: np.ndarray  # empty: one plane for every frequency
    values: np.ndarray
    sha256: str

    def power(self, dl: np.ndarray, dm: np.ndarray, freq_hz: np.ndarray) -> np.ndarray:
        from scipy.interpolate import RegularGridInterpolator

        dl, dm, f = np.broadcast_arrays(np.asarray(dl, float), np.asarray(dm, float),
                                        np.asarray(freq_hz, float))
        pts = np.stack([dm.ravel(), dl.ravel()], axis=-1)
        planes = [RegularGridInterpolator((self.m_axis, self.l_axis), v, bounds_error=False,
                                          fill_value=0.0)(pts) for v in self.values]
        if len(planes) == 1:
            return planes[0].reshape(dl.shape)
        fr = np.clip(f.ravel(), self.freqs_hz[0], self.freqs_hz[-1])
        k = np.clip(np.searchsorted(self.freqs_hz, fr) - 1, 0, len(self.freqs_hz) - 2)
        w = (fr - self.freqs_hz[k]) / (self.freqs_hz[k + 1] - self.freqs_hz[k])
        stack = np.stack(planes)  # (nfreq, npoints)
        idx = np.arange(fr.size)
        return ((1 - w) * stack[k, idx] + w * stack[k + 1, idx]).reshape(dl.shape)

    def radius_at_level(self, level: float, freq_hz: float) -> float:
        r = np.linspace(0.0, float(min(np.abs(self.l_axis).max(), np.abs(self.m_axis).max())),
                        2001)
        worst = 0.0
        for a in np.linspace(0.0, 2 * np.pi, 36, endpoint=False):
            p = self.power(r * np.cos(a), r * np.sin(a), np.full(r.shape, freq_hz))
            below = np.flatnonzero(p <= level)
            worst = max(worst, float(r[below[0]] if below.size else r[-1]))
        return math.degrees(math.asin(min(worst, 1.0)))


@lru_cache(maxsize=4)
def _load_fits_beam(path: str) -> FitsBeam:
    """Read and check a beam image (ConfigError naming the file and the problem)."""
    import hashlib

    from astropy.io import fits

    where = f"CONTIMG_BEAM_FITS: {path}"
    try:
        raw = Path(path).read_bytes()
        with fits.open(path) as hdul:
            hdu = hdul[0]
            data = np.asarray(hdu.data, dtype=float)
            h = hdu.header
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot be read as FITS ({exc})") from None
    if data.ndim not in (2, 3) and not (data.ndim == 4 and data.shape[0] == 1):
        raise ConfigError(f"{where}: expected axes L, M[, FREQ], found {data.ndim} axes")
    data = data.reshape(data.shape[-3:] if data.ndim >= 3 else (1,) + data.shape)

    def axis(n: int, size: int) -> np.ndarray:
        crval, cdelt = float(h.get(f"CRVAL{n}", 0.0)), float(h.get(f"CDELT{n}", 0.0))
        crpix = float(h.get(f"CRPIX{n}", 1.0))
        if cdelt == 0:
            raise ConfigError(f"{where}: CDELT{n} is missing or zero")
        return crval + (np.arange(size) + 1 - crpix) * cdelt

    types = [str(h.get(f"CTYPE{n}", "")).strip().upper() for n in (1, 2, 3)]
    if types[0] != "L" or types[1] != "M":
        raise ConfigError(f"{where}: axes 1 and 2 must be CTYPE 'L' and 'M' (direction "
                          f"cosines in the dish frame), found {types[0]!r}, {types[1]!r}")
    l_ax, m_ax = axis(1, data.shape[2]), axis(2, data.shape[1])
    freqs = np.array([])
    if data.shape[0] > 1:
        if types[2] != "FREQ":
            raise ConfigError(f"{where}: axis 3 must be FREQ (Hz), found {types[2]!r}")
        freqs = axis(3, data.shape[0])
    if l_ax[0] > l_ax[-1]:
        l_ax, data = l_ax[::-1], data[:, :, ::-1]
    if m_ax[0] > m_ax[-1]:
        m_ax, data = m_ax[::-1], data[:, ::-1, :]
    if freqs.size and freqs[0] > freqs[-1]:
        freqs, data = freqs[::-1], data[::-1]
    if not np.all(np.isfinite(data)):
        raise ConfigError(f"{where}: holds NaN or Inf")
    beam = FitsBeam(path, l_ax, m_ax, freqs, np.ascontiguousarray(data),
                    hashlib.sha256(raw).hexdigest()[:16])
    centre = beam.power(np.zeros(max(1, freqs.size)), np.zeros(max(1, freqs.size)),
                        freqs if freqs.size else np.zeros(1))
    if not np.allclose(centre, 1.0, atol=0.02):
        raise ConfigError(f"{where}: power on axis is {np.round(centre, 3).tolist()}, "
                          "expected 1 (a normalised power pattern)")
    return beam


def dish_axes_enu(az_deg: float, alt_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pointing, l axis, m axis) as ENU unit vectors for a dish at (az, alt): l along
    increasing azimuth, m along increasing elevation."""
    az, alt = math.radians(az_deg), math.radians(alt_deg)
    p = enu_unit(np.array(az_deg), np.array(alt_deg))
    e_l = np.array([math.cos(az), -math.sin(az), 0.0])
    e_m = np.array([-math.sin(alt) * math.sin(az), -math.sin(alt) * math.cos(az), math.cos(alt)])
    return p, e_l, e_m


def dish_axes_icrs(ra_deg: np.ndarray, dec_deg: np.ndarray,
                   lat_deg: float = OVRO_LAT_DEG) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pointing, l axis, m axis) as ICRS unit vectors, each (..., 3), for transit pointings
    at (ra, dec): on the meridian the elevation axis is local north when the dish faces south
    (dec below the latitude) and south when it faces north; azimuth increases to the west
    when facing south, to the east when facing north (matches :func:`pointing_altaz`)."""
    a, d = np.radians(ra_deg), np.radians(dec_deg)
    p = np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], axis=-1)
    east = np.stack([-np.sin(a), np.cos(a), np.zeros_like(a)], axis=-1)
    north = np.stack([-np.sin(d) * np.cos(a), -np.sin(d) * np.sin(a), np.cos(d)], axis=-1)
    facing_north = (np.asarray(dec_deg) > lat_deg)[..., None]
    return p, np.where(facing_north, east, -east), np.where(facing_north, -north, north)


def offline_astropy() -> None:
    """No IERS downloads on the telescope host, and no refusal to use the bundled table when
    it is older than astropy's 30-day limit: astropy then raises for any recent date, and the
    UT1-UTC it would need is < 1 s, far below what a 5-minute drift scan cares about.
    Process-wide; every module that uses astropy time or frames calls it first."""
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None


def airy_power(theta_rad: np.ndarray | float, freq_hz: np.ndarray | float,
               diameter_m: float = DISH_DIAMETER_M) -> np.ndarray:
    """Power pattern of a uniformly illuminated dish: (2 J1(x)/x)^2, x = pi D sin(theta)/lambda."""
    from scipy.special import j1

    x = np.pi * diameter_m * np.sin(theta_rad) * np.asarray(freq_hz) / C_M_S
    x = np.where(np.abs(x) < 1e-9, 1e-9, x)
    return (2.0 * j1(x) / x) ** 2


def pointing_altaz(dec_deg: float, lat_deg: float = OVRO_LAT_DEG) -> tuple[float, float]:
    """(az, alt) in degrees of a transit pointing at declination ``dec_deg``."""
    alt = 90.0 - abs(lat_deg - dec_deg)
    az = 0.0 if dec_deg > lat_deg else 180.0
    return az, alt


def enu_unit(az_deg: np.ndarray, alt_deg: np.ndarray) -> np.ndarray:
    """East/North/Up unit vectors of (az, alt) directions (degrees), shape (..., 3)."""
    az, alt = np.radians(az_deg), np.radians(alt_deg)
    return np.stack([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1)
