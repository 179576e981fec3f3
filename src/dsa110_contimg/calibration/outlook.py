"""The calibration outlook: what calibration the pointing has now, what comes next, and when
groups would go without.

A group is calibrated when a calibrator transits in it (new K, BP, G), when its own field
is bright enough through the beam for a field solve (needs a valid bandpass), or when a valid
bandpass and a valid gain are in force. Otherwise it is held (``stale_policy`` 'hold') or
imaged uncalibrated. Because DSA-110 stays at one declination, all of that is predictable:
transits follow from the calibrators' right ascensions, the field at time t is the sky at
hour angle 0 (RA = local sidereal time), and the sets in force expire at known times. So an
operator can be told hours ahead that, say, tonight's bandpass expires before the next
calibrator transits.

Coverage over the window [now, now + hours]:

- bandpass: the one in force until it expires; each calibrator transit T gives one from T
  to T + ``bp_validity_h``, and so does a field at least ``field_bandpass_min_jy`` bright
  (with no bandpass in force the whole chain is solved on such a field);
- gain: the one in force until it expires; each transit gives one valid T +/- ``g_validity_h``;
  each time the field model is bright enough (and a bandpass is covered) a field solve gives
  one valid +/- ``g_validity_h``.

A *gap* is time without bandpass (kind ``bandpass``) or, with a bandpass, without gain (kind
``gain``). Groups shortly before a new solution wait for it and are then released, so those
minutes are not counted as a gap.

:func:`compute_outlook` is pure (its only input from outside is the ``cone`` callable it is
given); :func:`gather_outlook` collects its inputs from the registry and the sky catalogue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..catalogue.reference import Calibrator
from ..catalogue.sources import angular_separation_deg
from ..instrument import BAND_CENTRE_HZ, OVRO_LON_DEG, SIDEREAL_DAY_S, PrimaryBeam, offline_astropy
from .calset import CalSet
from .options import CalibrationOptions


class SetSource(Protocol):
    """What the outlook reads of the calibration registry (the daemon's ``CalRegistry``)."""

    async def find_bandpass(self, mid_mjd: float, dec_deg: float,
                            options: CalibrationOptions | None = None) -> CalSet | None: ...

    async def find_valid(self, mid_mjd: float, dec_deg: float,
                         options: CalibrationOptions | None = None) -> CalSet | None: ...

    async def list_sets(self, active_only: bool = False,
                        limit: int = 200) -> list[dict[str, Any]]: ...

MJD_UNIX_EPOCH = 40587.0
SIDEREAL_DAY_D = SIDEREAL_DAY_S / 86400.0
# A transit this recent whose solution is not registered yet is taken to be on its way (the
# group holding it is still being converted or calibrated), not missed.
PENDING_LOOKBACK_H = 1.0
_SAME_TRANSIT_D = 15.0 / 1440.0
_MIN_GAP_D = 1.0 / 1440.0  # shorter stretches are rounding, not a gap
_EPS_D = 1e-6
RECENT_SETS = 60

Cone = Callable[[float, float, float], Sequence[Any]]


def mjd_now() -> float:
    """The current UTC time as an MJD."""
    return datetime.now(UTC).timestamp() / 86400.0 + MJD_UNIX_EPOCH


def iso_utc(mjd: float) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` of a UTC MJD."""
    dt = datetime.fromtimestamp((mjd - MJD_UNIX_EPOCH) * 86400.0, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def _offline_astropy() -> Iterator[None]:
    """The instrument's offline IERS policy, with astropy's warnings about it silenced."""
    offline_astropy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SetInForce:
    """A registered set whose bandpass (or gain) is valid now."""

    name: str
    calibrator: str
    mid_mjd: float
    age_h: float
    expires_mjd: float

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "calibrator": self.calibrator, "mid_mjd": self.mid_mjd,
                "mid_utc": iso_utc(self.mid_mjd), "age_h": round(self.age_h, 3),
                "expires_mjd": self.expires_mjd, "expires_utc": iso_utc(self.expires_mjd)}


@dataclass(frozen=True)
class Transit:
    """One calibrator transit; ``pending``: already past, its solution not registered yet."""

    calibrator: str
    mjd: float
    apparent_jy: float
    dec_offset_deg: float
    pending: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"calibrator": self.calibrator, "mjd": self.mjd, "utc": iso_utc(self.mjd),
                "apparent_jy": round(self.apparent_jy, 4),
                "dec_offset_deg": round(self.dec_offset_deg, 4), "pending": self.pending}


@dataclass(frozen=True)
class FieldSample:
    """The field model at one time: the catalogue's apparent flux around the meridian."""

    mjd: float
    ra_deg: float
    dec_deg: float
    model_jy: float
    n_sources: int
    usable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"mjd": self.mjd, "utc": iso_utc(self.mjd), "ra_deg": round(self.ra_deg, 4),
                "dec_deg": round(self.dec_deg, 4), "model_jy": round(self.model_jy, 4),
                "n_sources": self.n_sources, "usable": self.usable}


@dataclass(frozen=True)
class Gap:
    """Time without calibration; ``missing`` is 'bandpass' or 'gain'; ``ongoing``: it has
    already begun (``start_mjd`` is then the outlook's own start)."""

    start_mjd: float
    end_mjd: float
    missing: str
    reason: str
    ongoing: bool = False

    @property
    def hours(self) -> float:
        return (self.end_mjd - self.start_mjd) * 24.0

    def as_dict(self) -> dict[str, Any]:
        return {"start_mjd": self.start_mjd, "end_mjd": self.end_mjd,
                "start": iso_utc(self.start_mjd), "end": iso_utc(self.end_mjd),
                "hours": round(self.hours, 3), "missing": self.missing, "reason": self.reason,
                "ongoing": self.ongoing}


@dataclass(frozen=True)
class Outlook:
    """Sets in force, next transits, field-model availability and gaps for one pointing."""

    now_mjd: float
    end_mjd: float
    pointing_dec_deg: float
    bandpass: SetInForce | None
    gain: SetInForce | None
    transits: tuple[Transit, ...]
    field_status: str  # 'catalogue', 'no catalogue' or 'off'
    field_note: str
    field: tuple[FieldSample, ...]
    gaps: tuple[Gap, ...]
    options: dict[str, Any]
    pointing_source: str = ""

    @property
    def hours(self) -> float:
        return (self.end_mjd - self.now_mjd) * 24.0

    def as_dict(self) -> dict[str, Any]:
        usable = [s for s in self.field if s.usable]
        models = [s.model_jy for s in self.field]
        return {
            "now_mjd": self.now_mjd, "now_utc": iso_utc(self.now_mjd),
            "end_mjd": self.end_mjd, "end_utc": iso_utc(self.end_mjd),
            "hours": round(self.hours, 3), "pointing_dec_deg": self.pointing_dec_deg,
            "pointing_source": self.pointing_source,
            "bandpass": None if self.bandpass is None else self.bandpass.as_dict(),
            "gain": None if self.gain is None else self.gain.as_dict(),
            "transits": [t.as_dict() for t in self.transits],
            "field": {"status": self.field_status, "note": self.field_note,
                      "min_model_jy": self.options.get("field_min_model_jy"),
                      "usable_fraction": (round(len(usable) / len(self.field), 3)
                                          if self.field else 0.0),
                      "model_jy_min": round(min(models), 4) if models else None,
                      "model_jy_max": round(max(models), 4) if models else None,
                      "samples": [s.as_dict() for s in self.field]},
            "gaps": [g.as_dict() for g in self.gaps],
            "options": dict(self.options),
        }


# --------------------------------------------------------------------------- validity
def table_expiry(calset: CalSet, kind: str, validity_h: float) -> float | None:
    """When ``calset``'s table of ``kind`` stops being valid: the earlier of its registered
    window's end and ``validity_h`` after the set's mid-time (as the registry decides)."""
    t = calset.table(kind)
    if t is None:
        return None
    return min(t.valid_end_mjd, calset.mid_mjd + validity_h / 24.0)


def is_valid(calset: CalSet, kind: str, mjd: float, validity_h: float) -> bool:
    """Whether ``calset``'s table of ``kind`` is valid at ``mjd`` (registry semantics)."""
    t = calset.table(kind)
    return (t is not None and t.covers(mjd)
            and abs(calset.mid_mjd - mjd) <= validity_h / 24.0)


def newest_valid(sets: Iterable[CalSet], kind: str, mjd: float,
                 validity_h: float) -> CalSet | None:
    """The set with the newest mid-time whose ``kind`` table is valid at ``mjd``."""
    valid = [s for s in sets if is_valid(s, kind, mjd, validity_h)]
    return max(valid, key=lambda s: s.mid_mjd, default=None)


def gain_part(found: CalSet) -> CalSet:
    """The set whose gain :meth:`CalRegistry.find_valid` combined into ``found``."""
    g_name = found.params.get("g_set") if isinstance(found.params, dict) else None
    if not g_name:
        return found
    return dataclasses.replace(found, name=str(g_name),
                               tables=tuple(t for t in found.tables if t.kind == "G"))


def newest_pointing_dec(groups: Iterable[dict[str, Any]]) -> tuple[float, str] | None:
    """(pointing declination, group id) of the first group (newest first) already converted."""
    for g in groups:
        conv = (g.get("flags") or {}).get("conversion") or {}
        dec = conv.get("pointing_dec_deg") if isinstance(conv, dict) else None
        if isinstance(dec, int | float) and math.isfinite(dec):
            return float(dec), str(g.get("id", ""))
    return None


# --------------------------------------------------------------------------- the sky
def transit_times(candidates: Sequence[Calibrator], start_mjd: float,
                  end_mjd: float) -> list[tuple[Calibrator, float]]:
    """Every meridian transit at OVRO of each candidate in [start, end], in time order.

    A source transits when the local apparent sidereal time equals its apparent right
    ascension; it does again every sidereal day."""
    if not candidates or end_mjd < start_mjd:
        return []
    import astropy.units as u
    from astropy.coordinates import TETE, SkyCoord
    from astropy.time import Time

    ra = np.array([c.ra_deg for c in candidates], dtype=float)
    dec = np.array([c.dec_deg for c in candidates], dtype=float)
    with _offline_astropy():
        t = Time(start_mjd, format="mjd", scale="utc")
        app = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs").transform_to(TETE(obstime=t))
        lst = t.sidereal_time("apparent", longitude=OVRO_LON_DEG * u.deg).deg
    first = start_mjd + ((app.ra.deg - lst) % 360.0) / 360.0 * SIDEREAL_DAY_D
    out = []
    for cal, t0 in zip(candidates, first, strict=True):
        k = 0
        while (when := float(t0) + k * SIDEREAL_DAY_D) <= end_mjd:
            out.append((cal, when))
            k += 1
    return sorted(out, key=lambda x: x[1])


def meridian_centres(mjds: np.ndarray, pointing_dec_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (ra, dec) in degrees of hour angle 0 at the (apparent) pointing declination."""
    import astropy.units as u
    from astropy.coordinates import ICRS, TETE, SkyCoord
    from astropy.time import Time

    if len(mjds) == 0:
        return np.array([]), np.array([])
    with _offline_astropy():
        t = Time(np.asarray(mjds, dtype=float), format="mjd", scale="utc")
        lst = t.sidereal_time("apparent", longitude=OVRO_LON_DEG * u.deg).deg
        c = SkyCoord(lst * u.deg, np.full(len(mjds), pointing_dec_deg) * u.deg,
                     frame=TETE(obstime=t)).transform_to(ICRS())
    return np.asarray(c.ra.deg) % 360.0, np.asarray(c.dec.deg)


def field_model_jy(cone: Cone, ra_deg: float, dec_deg: float, options: CalibrationOptions,
                   beam: PrimaryBeam) -> tuple[float, int]:
    """(total apparent flux, sources) of the field model centred on (ra, dec): catalogue
    sources within ``field_radius_deg``, each at least ``field_min_apparent_jy`` through the
    beam at the band centre."""
    found = list(cone(ra_deg, dec_deg, options.field_radius_deg))
    if not found:
        return 0.0, 0
    sep = angular_separation_deg(ra_deg, dec_deg, np.array([s.ra_deg for s in found], float),
                                 np.array([s.dec_deg for s in found], float))
    flux = np.array([s.flux_at(BAND_CENTRE_HZ) for s in found], dtype=float)
    apparent = flux * beam.power(np.radians(sep), BAND_CENTRE_HZ)
    keep = (apparent >= options.field_min_apparent_jy) & (sep <= options.field_radius_deg)
    return float(apparent[keep].sum()), int(keep.sum())


def usable_candidates(candidates: Sequence[Calibrator], pointing_dec_deg: float,
                      options: CalibrationOptions,
                      beam: PrimaryBeam) -> list[tuple[Calibrator, float]]:
    """(calibrator, apparent flux at transit) of those close and bright enough to solve on."""
    from .skymodel import apparent_flux_at_transit

    out = []
    for cal in candidates:
        if abs(cal.dec_deg - pointing_dec_deg) > options.calibrator_radius_deg:
            continue
        flux = apparent_flux_at_transit(cal, pointing_dec_deg, BAND_CENTRE_HZ, beam)
        if flux >= options.min_calibrator_flux_jy:
            out.append((cal, flux))
    return out


# --------------------------------------------------------------------------- intervals
def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted((a, b) for a, b in intervals if b > a):
        if out and a <= out[-1][1] + _EPS_D:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _complement(covered: list[tuple[float, float]], lo: float,
                hi: float) -> list[tuple[float, float]]:
    out, at = [], lo
    for a, b in _union(covered):
        if b <= at:
            continue
        if a > at:
            out.append((at, min(a, hi)))
        at = max(at, b)
        if at >= hi:
            break
    if at < hi:
        out.append((at, hi))
    return [(a, b) for a, b in out if b - a >= _MIN_GAP_D]


def _covers(intervals: list[tuple[float, float]], t: float) -> bool:
    return any(a - _EPS_D <= t <= b + _EPS_D for a, b in intervals)


# --------------------------------------------------------------------------- the outlook
def compute_outlook(now_mjd: float, pointing_dec_deg: float, options: CalibrationOptions, *,
                    bandpass: CalSet | None, gain: CalSet | None,
                    candidates: Sequence[Calibrator], cone: Cone | None,
                    beam: PrimaryBeam | None = None, hours: float = 24.0,
                    step_min: float = 10.0, recent_sets: Sequence[CalSet] = (),
                    no_catalogue_reason: str = "", pointing_source: str = "") -> Outlook:
    """The outlook for ``pointing_dec_deg`` over [now, now + hours].

    ``bandpass``/``gain``: the sets whose BP / G is the newest valid at ``now_mjd`` (None:
    none). ``candidates``: calibrators to consider (see ``calibrator_candidates``); those
    outside ``calibrator_radius_deg`` or fainter than ``min_calibrator_flux_jy`` at transit
    are dropped. ``cone(ra, dec, radius)``: catalogue sources (with ``ra_deg``, ``dec_deg``,
    ``flux_at``) around a position; None when there is no catalogue. ``recent_sets``: sets
    registered lately, whatever their status, so a transit of the last hour whose solution is
    still being made is counted as coming (and one already solved, or failed, is not).
    """
    if hours <= 0:
        raise ValueError("hours must be positive")
    if step_min <= 0:
        raise ValueError("step_min must be positive")
    beam = beam or PrimaryBeam()
    t0, t1 = float(now_mjd), float(now_mjd) + hours / 24.0
    bp_v, g_v = options.bp_validity_h / 24.0, options.g_validity_h / 24.0

    bp_in = _in_force(bandpass, "BP", t0, options.bp_validity_h)
    g_in = _in_force(gain, "G", t0, options.g_validity_h)

    # calibrator transits (and those of the last hour still on their way)
    usable = usable_candidates(candidates, pointing_dec_deg, options, beam)
    flux_of = {id(c): f for c, f in usable}
    transits: list[Transit] = []
    for cal, when in transit_times([c for c, _ in usable], t0 - PENDING_LOOKBACK_H / 24.0, t1):
        pending = when < t0
        if pending and _registered(cal.name, when, recent_sets):
            continue
        transits.append(Transit(cal.name, when, flux_of[id(cal)],
                                abs(cal.dec_deg - pointing_dec_deg), pending))

    # the field model on an absolute time grid (stable from one outlook to the next)
    step = step_min / 1440.0
    grid = np.arange(math.floor(t0 / step), math.ceil(t1 / step) + 1) * step
    if not options.field_solve:
        field_status, field_note = "off", "field solves are off (CONTIMG_CAL_FIELD_SOLVE)"
    elif cone is None:
        field_status, field_note = "no catalogue", no_catalogue_reason or "no catalogue"
    else:
        field_status, field_note = "catalogue", ""
    samples: list[FieldSample] = []
    if cone is not None:
        ras, decs = meridian_centres(grid, pointing_dec_deg)
        for mjd, ra, dec in zip(grid, ras, decs, strict=True):
            total, n = field_model_jy(cone, float(ra), float(dec), options, beam)
            samples.append(FieldSample(float(mjd), float(ra), float(dec), total, n,
                                       options.field_solve and n > 0
                                       and total >= options.field_min_model_jy))

    # coverage
    bp_cover = [(t0, bp_in.expires_mjd)] if bp_in else []
    bp_cover += [(t.mjd, t.mjd + bp_v) for t in transits]
    bp_cover += [(s.mjd, s.mjd + bp_v) for s in samples
                 if options.field_solve and s.model_jy >= options.field_bandpass_min_jy]
    bp_cover = _union(bp_cover)
    g_cover = [(t0, g_in.expires_mjd)] if g_in else []
    g_cover += [(t.mjd - g_v, t.mjd + g_v) for t in transits]
    half = max(g_v, step / 2.0)
    g_cover += [(s.mjd - half, s.mjd + half) for s in samples
                if s.usable and _covers(bp_cover, s.mjd)]
    no_bp = _complement(bp_cover, t0, t1)
    no_g = _complement(g_cover + no_bp, t0, t1)

    gaps = [_bandpass_gap(a, b, t0, t1, bp_in, transits) for a, b in no_bp]
    gaps += [_gain_gap(a, b, t0, t1, g_in, transits, samples, field_status, options, g_v)
             for a, b in no_g]
    gaps.sort(key=lambda g: g.start_mjd)
    opts = {"bp_validity_h": options.bp_validity_h, "g_validity_h": options.g_validity_h,
            "field_solve": options.field_solve, "field_min_model_jy": options.field_min_model_jy,
            "field_bandpass_min_jy": options.field_bandpass_min_jy,
            "field_min_apparent_jy": options.field_min_apparent_jy,
            "field_radius_deg": options.field_radius_deg,
            "calibrator_radius_deg": options.calibrator_radius_deg,
            "min_calibrator_flux_jy": options.min_calibrator_flux_jy,
            "stale_policy": options.stale_policy, "step_min": step_min}
    return Outlook(t0, t1, float(pointing_dec_deg), bp_in, g_in, tuple(transits), field_status,
                   field_note, tuple(s for s in samples if t0 - step < s.mjd <= t1),
                   tuple(gaps), opts, pointing_source)


def _in_force(calset: CalSet | None, kind: str, now: float, validity_h: float) -> SetInForce | None:
    if calset is None or not is_valid(calset, kind, now, validity_h):
        return None
    expires = table_expiry(calset, kind, validity_h)
    assert expires is not None  # is_valid found the table
    return SetInForce(calset.name, calset.calibrator, calset.mid_mjd,
                      (now - calset.mid_mjd) * 24.0, expires)


def _registered(name: str, when: float, recent: Sequence[CalSet]) -> bool:
    return any(s.calibrator.lower() == name.lower() and abs(s.mid_mjd - when) <= _SAME_TRANSIT_D
               for s in recent)


def _next_transit(transits: Sequence[Transit], after: float) -> Transit | None:
    return next((t for t in transits if t.mjd >= after - _EPS_D), None)


def _transit_text(t: Transit | None, end: float) -> str:
    if t is None:
        return f"no calibrator transits before {iso_utc(end)}"
    return f"next transit {t.calibrator} at {iso_utc(t.mjd)}"


def _bandpass_gap(a: float, b: float, t0: float, t1: float, bp_in: SetInForce | None,
                  transits: Sequence[Transit]) -> Gap:
    ongoing = a <= t0 + _EPS_D
    head = "no valid bandpass" if ongoing and bp_in is None else f"no bandpass after {iso_utc(a)}"
    return Gap(a, b, "bandpass", f"{head}: {_transit_text(_next_transit(transits, a), t1)}",
               ongoing)


def _gain_gap(a: float, b: float, t0: float, t1: float, g_in: SetInForce | None,
              transits: Sequence[Transit], samples: Sequence[FieldSample], field_status: str,
              options: CalibrationOptions, g_v: float) -> Gap:
    ongoing = a <= t0 + _EPS_D
    head = "no valid gain" if ongoing and g_in is None else f"no gain after {iso_utc(a)}"
    if field_status == "no catalogue":
        why = "no catalogue"
    elif field_status == "off":
        why = "field solves are off"
    else:
        inside = [s.model_jy for s in samples if a - _EPS_D <= s.mjd <= b + _EPS_D]
        best = max(inside, default=0.0)
        why = f"field model {best:.3g} Jy < {options.field_min_model_jy:g} Jy"
    nxt = next((t for t in transits if t.mjd - g_v >= a - _EPS_D), None)
    return Gap(a, b, "gain", f"{head}: {why}; {_transit_text(nxt, t1)}", ongoing)


# --------------------------------------------------------------------------- gathering
async def sets_in_force(registry: SetSource, now_mjd: float, pointing_dec_deg: float,
                        options: CalibrationOptions
                        ) -> tuple[CalSet | None, CalSet | None, list[CalSet]]:
    """(set of the newest valid bandpass, set of the newest valid gain, recently registered
    sets) from the registry, read only."""
    bp = await registry.find_bandpass(now_mjd, pointing_dec_deg, options)
    found = await registry.find_valid(now_mjd, pointing_dec_deg, options)
    rows = await registry.list_sets(limit=RECENT_SETS)
    recent = [CalSet.from_dict(r) for r in rows]
    if found is not None:
        gain = gain_part(found)
    elif bp is None:  # find_valid needs a bandpass; the gain may still be valid on its own
        active = [CalSet.from_dict(r) for r in rows if r.get("status") == "active"]
        gain = newest_valid(active, "G", now_mjd, options.g_validity_h)
    else:
        gain = None
    return bp, gain, recent


async def gather_outlook(registry: SetSource | None, catalogue_db: Path | None,
                         pointing_dec_deg: float, options: CalibrationOptions,
                         beam: PrimaryBeam, *, now_mjd: float | None = None,
                         hours: float = 24.0, step_min: float = 10.0,
                         pointing_source: str = "") -> Outlook:
    """:func:`compute_outlook` with its inputs read from the registry (None: no sets) and the
    sky catalogue at ``catalogue_db`` (None or missing: bundled calibrators, no field model).
    The sky computation runs in a thread."""
    now = mjd_now() if now_mjd is None else float(now_mjd)
    bp = gain = None
    recent: list[CalSet] = []
    if registry is not None:
        bp, gain, recent = await sets_in_force(registry, now, pointing_dec_deg, options)
    return await asyncio.to_thread(
        _outlook_with_catalogue, catalogue_db, now, pointing_dec_deg, options, beam, bp, gain,
        recent, hours, step_min, pointing_source)


def _outlook_with_catalogue(catalogue_db: Path | None, now: float, dec: float,
                            options: CalibrationOptions, beam: PrimaryBeam, bp: CalSet | None,
                            gain: CalSet | None, recent: list[CalSet], hours: float,
                            step_min: float, pointing_source: str) -> Outlook:
    from ..catalogue import CatalogueUnavailable, SkyCatalogue
    from .candidates import calibrator_candidates

    cat = None
    why = "no sky catalogue (build one with `contimg catalog build` or set CONTIMG_CAL_FIELD_CATALOGUE)"
    if catalogue_db is not None and Path(catalogue_db).is_file():
        try:
            cat = SkyCatalogue.open(Path(catalogue_db))
        except CatalogueUnavailable as exc:
            why = f"sky catalogue unusable: {exc}"
    try:
        candidates = calibrator_candidates(cat.path if cat else None, dec, options, beam)
        cone: Cone | None = None
        if cat is not None:
            opened = cat
            floor = 0.9 * options.field_min_apparent_jy  # the beam only dims; margin for spectra

            def _cone(ra: float, de: float, radius: float) -> Sequence[Any]:
                return opened.cone(ra, de, radius, floor)

            cone = _cone
        return compute_outlook(now, dec, options, bandpass=bp, gain=gain, candidates=candidates,
                               cone=cone, beam=beam, hours=hours, step_min=step_min,
                               recent_sets=recent, no_catalogue_reason=why,
                               pointing_source=pointing_source)
    finally:
        if cat is not None:
            cat.close()


# --------------------------------------------------------------------------- text
def format_outlook(o: Outlook) -> str:
    """A table for operators: sets in force, next transits, field model, gaps."""
    def rel(mjd: float) -> str:
        h = (mjd - o.now_mjd) * 24.0
        return f"in {h:.1f} h" if h >= 0 else f"{-h:.1f} h ago"

    src = f" (from {o.pointing_source})" if o.pointing_source else ""
    lines = [f"Calibration outlook at dec {o.pointing_dec_deg:+.2f} deg{src}, "
             f"{iso_utc(o.now_mjd)} .. {iso_utc(o.end_mjd)} ({o.hours:g} h)", "",
             "Sets in force:"]
    for label, s in (("bandpass", o.bandpass), ("gain", o.gain)):
        if s is None:
            lines.append(f"  {label:<9} none valid now")
        else:
            lines.append(f"  {label:<9} {s.name}  ({s.calibrator}, {s.age_h:.1f} h old)  "
                         f"expires {iso_utc(s.expires_mjd)} ({rel(s.expires_mjd)})")
    lines += ["", "Calibrator transits:"]
    if not o.transits:
        lines.append(f"  none within {o.hours:g} h")
    for t in o.transits:
        note = "  (past; solution not registered yet)" if t.pending else ""
        lines.append(f"  {iso_utc(t.mjd)}  {rel(t.mjd):>12}  {t.calibrator:<12} "
                     f"{t.apparent_jy:7.2f} Jy apparent{note}")
    lines += ["", "Field model:"]
    if o.field_status != "catalogue":
        lines.append(f"  {o.field_note}")
    elif o.field:
        models = [s.model_jy for s in o.field]
        share = sum(s.usable for s in o.field) / len(o.field)
        lines.append(f"  {min(models):.3g}-{max(models):.3g} Jy through the beam; at least "
                     f"{o.options['field_min_model_jy']:g} Jy for {100 * share:.0f}% of the window")
    lines += ["", "Gaps:"]
    if not o.gaps:
        lines.append(f"  no gap expected in the next {o.hours:g} h")
    held = "held" if o.options.get("stale_policy") == "hold" else "imaged uncalibrated"
    for g in o.gaps:
        lines.append(f"  {iso_utc(g.start_mjd)} .. {iso_utc(g.end_mjd)}  ({g.hours:.1f} h, "
                     f"groups {held})  {g.reason}")
    return "\n".join(lines)
