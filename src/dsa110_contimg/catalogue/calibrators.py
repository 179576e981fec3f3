"""Calibrators: the bundled lists, the selection rule, and how much of the day they cover.

The selection rule (:func:`select_calibrators`) for a transit array pointed at one
declination, applied to any catalogue's sources:

1. near the pointing: |dec - pointing_dec| <= ``radius_deg`` (the source transits through
   the primary beam);
2. unresolved on DSA-110's baselines: :func:`is_unresolved`;
3. bright enough where it transits: apparent flux = flux_at(``freq_hz``) x
   beam(|dec - pointing_dec|) >= ``min_apparent_jy``;
4. isolated: no other source within ``isolation_radius_deg`` is brighter (apparent) than
   ``isolation_max_ratio`` x the candidate; a confusing neighbour corrupts the gain solution.
   Entries within ``same_source_arcsec`` of the candidate are the same source from another
   catalogue, not neighbours; among such duplicates only the first (standard, then VLA, NVSS,
   CSV) is returned.

Coverage: a gain solution is valid for ±``window_h`` hours of its calibrator's transit, so
each calibrator covers an interval of LST; :func:`transit_coverage` is the fraction of the
sidereal day in their union.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .formats import parse_csv
from .reference import load_calibrators
from .sources import CatalogueSource, angular_separation_deg, vla_config_index

LBAND_FREQ_HZ = 1.405e9  # DSA-110's band centre (1311-1499 MHz)
SIDEREAL_PER_SOLAR = 1.0027379093
DEG_PER_SOLAR_HOUR = 15.0 * SIDEREAL_PER_SOLAR  # LST (=RA) degrees swept in one solar hour
_ORIGIN_PREFERENCE = {"standard": 0, "vla": 1, "nvss": 2, "csv": 3}


def data_file(name: str) -> Path:
    """Path of a file in the package's ``data`` directory."""
    return Path(str(resources.files("dsa110_contimg").joinpath("data", name)))


@functools.cache
def bundled_vla_calibrators() -> tuple[CatalogueSource, ...]:
    """The VLA Calibrator Manual's sources with a 20 cm flux >= 0.5 Jy (data/vla_calibrators_lband.csv).

    Written by ``scripts/make_vla_calibrator_list.py``; keeps each source's four L-band
    quality codes so that :func:`is_unresolved` can choose the array configuration at run time.
    """
    return tuple(parse_csv(data_file("vla_calibrators_lband.csv"), origin="vla"))


@functools.cache
def bundled_reference_sources() -> tuple[CatalogueSource, ...]:
    """The 25 rows of data/calibrators.csv: origin 'standard' for the four flux standards
    (3C48, 3C147, 3C286, 3C295; Perley & Butler 2017), 'vla' for the secondaries."""
    return tuple(CatalogueSource(c.name, c.ra_deg, c.dec_deg, c.flux_jy, c.spectral_index,
                                 c.ref_freq_hz, None, None,
                                 "standard" if c.kind == "standard" else "vla", None)
                 for c in load_calibrators())


def bundled_sources() -> tuple[CatalogueSource, ...]:
    """Everything the package bundles: the VLA L-band list and the reference list."""
    return bundled_vla_calibrators() + bundled_reference_sources()


def is_unresolved(src: CatalogueSource, config: str = "C", max_major_arcsec: float = 30.0) -> bool:
    """Point-like on DSA-110's baselines?

    Flux standards: yes (their models are known). Sources with VLA L-band codes: the code for
    VLA configuration ``config`` is P (< 3 % amplitude closure errors) or S (3-10 %); C
    (baselines to 3.4 km) is the closest match to DSA-110's ~2.5 km. Others (NVSS, CSV):
    no size given, or a major axis <= ``max_major_arcsec`` (NVSS's beam is 45").
    """
    if src.origin == "standard":
        return True
    code = src.lband_code(config)
    if code is not None:
        return code in "PS"
    vla_config_index(config)  # a bad configuration is an error whatever the source
    return src.major_arcsec is None or src.major_arcsec <= max_major_arcsec


def _dedupe_key(src: CatalogueSource, apparent: float) -> tuple:
    return (_ORIGIN_PREFERENCE[src.origin], -apparent, src.name)


def select_calibrators(sources: Sequence[CatalogueSource], pointing_dec_deg: float, radius_deg: float,
                       min_apparent_jy: float, beam: Callable[[float], float],
                       isolation_radius_deg: float, isolation_max_ratio: float, config: str = "C", *,
                       freq_hz: float = LBAND_FREQ_HZ, max_major_arcsec: float = 30.0,
                       same_source_arcsec: float = 10.0) -> list[tuple[CatalogueSource, float]]:
    """Calibrators for a pointing, as (source, apparent Jy at transit), brightest first.

    See the module docstring for the rule. ``beam(offset_deg)`` is the primary beam's power
    at an offset from the pointing (1 on axis), supplied by the caller. ``sources`` must
    include the would-be neighbours (everything within ``radius_deg + isolation_radius_deg``
    of the pointing declination) for the isolation test to mean anything.
    """
    vla_config_index(config)
    reach = radius_deg + max(isolation_radius_deg, 0.0)
    near = [s for s in sources if abs(s.dec_deg - pointing_dec_deg) <= reach]
    if not near:
        return []
    apparent = np.array([s.flux_at(freq_hz) * float(beam(abs(s.dec_deg - pointing_dec_deg)))
                         for s in near])
    ra = np.array([s.ra_deg for s in near])
    dec = np.array([s.dec_deg for s in near])
    same = same_source_arcsec / 3600.0
    chosen: list[tuple[int, float]] = []
    for i, s in enumerate(near):
        if (abs(s.dec_deg - pointing_dec_deg) > radius_deg or apparent[i] < min_apparent_jy
                or not is_unresolved(s, config, max_major_arcsec)):
            continue
        if isolation_radius_deg > 0:
            window = np.abs(dec - s.dec_deg) <= isolation_radius_deg
            window[i] = False
            idx = np.flatnonzero(window)
            if idx.size:
                sep = angular_separation_deg(s.ra_deg, s.dec_deg, ra[idx], dec[idx])
                rivals = idx[(sep <= isolation_radius_deg) & (sep > same)]
                if np.any(apparent[rivals] > isolation_max_ratio * apparent[i]):
                    continue
        chosen.append((i, float(apparent[i])))
    # one entry per physical source: the preferred catalogue's among coincident candidates
    chosen.sort(key=lambda c: _dedupe_key(near[c[0]], c[1]))
    kept: list[tuple[int, float]] = []
    for i, app in chosen:
        if all(angular_separation_deg(near[i].ra_deg, near[i].dec_deg, near[j].ra_deg,
                                      near[j].dec_deg) > same for j, _ in kept):
            kept.append((i, app))
    kept.sort(key=lambda c: (-c[1], near[c[0]].name))
    return [(near[i], app) for i, app in kept]


def transit_coverage(calibrator_ras_deg: Sequence[float], window_h: float) -> float:
    """Fraction of the sidereal day within ±``window_h`` solar hours of some calibrator's transit.

    Each calibrator covers LST (= RA at transit) within ±``window_h`` x 15.041 deg of its RA
    (a solar hour is 1.0027379 sidereal hours); the answer is the length of the union of
    those arcs on the 360 deg circle, wrap-around at 0/360 included, divided by 360.
    """
    half = window_h * DEG_PER_SOLAR_HOUR
    if not len(calibrator_ras_deg) or half <= 0:
        return 0.0
    if 2 * half >= 360.0:
        return 1.0
    arcs: list[tuple[float, float]] = []
    for ra in calibrator_ras_deg:
        start = (float(ra) - half) % 360.0
        end = start + 2 * half
        if end > 360.0:
            arcs += [(start, 360.0), (0.0, end - 360.0)]
        else:
            arcs.append((start, end))
    arcs.sort()
    total, cur_lo, cur_hi = 0.0, arcs[0][0], arcs[0][1]
    for lo, hi in arcs[1:]:
        if lo > cur_hi:
            total += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    total += cur_hi - cur_lo
    return min(1.0, total / 360.0)


@dataclass(frozen=True)
class CoverageRow:
    """Calibrators for one pointing declination and the fraction of the day they cover."""

    dec_deg: float
    n_calibrators: int
    fraction: float
    names: tuple[str, ...]


def coverage_by_declination(sources: Sequence[CatalogueSource], decs: Sequence[float], radius_deg: float,
                            min_apparent_jy: float, window_h: float, beam: Callable[[float], float],
                            isolation_radius_deg: float = 0.0, isolation_max_ratio: float = 1.0,
                            config: str = "C", *, freq_hz: float = LBAND_FREQ_HZ,
                            max_major_arcsec: float = 30.0) -> list[CoverageRow]:
    """:func:`select_calibrators` then :func:`transit_coverage` at each declination of ``decs``.

    Isolation is off by default (radius 0), which counts every qualifying source.
    """
    by_dec = sorted(sources, key=lambda s: s.dec_deg)
    dec_sorted = np.array([s.dec_deg for s in by_dec])
    reach = radius_deg + max(isolation_radius_deg, 0.0)
    rows = []
    for d in decs:
        lo = int(np.searchsorted(dec_sorted, d - reach, side="left"))
        hi = int(np.searchsorted(dec_sorted, d + reach, side="right"))
        chosen = select_calibrators(by_dec[lo:hi], d, radius_deg, min_apparent_jy, beam,
                                    isolation_radius_deg, isolation_max_ratio, config,
                                    freq_hz=freq_hz, max_major_arcsec=max_major_arcsec)
        rows.append(CoverageRow(float(d), len(chosen), transit_coverage([s.ra_deg for s, _ in chosen], window_h),
                                tuple(s.name for s, _ in chosen)))
    return rows
