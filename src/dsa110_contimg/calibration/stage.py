"""The calibration stage: flag, find a transiting calibrator, solve K/BP/G or apply the set in
force, write CORRECTED_DATA. One call per group, in a fresh worker process.

Solving happens on a scratch copy (``<stem>.solve.ms`` beside the caltables, removed
afterwards) made by ``split(keepflags=False, width=n)`` after flagging: DATA only, without the
rows that are entirely flagged (dead antennas, autocorrelations: a third of a full-size group),
and with channels averaged to at most ``CONTIMG_CAL_SOLVE_MAX_CHAN_WIDTH_HZ`` (4 at full size),
so the model and every solve touch ~6x less data. The model carries the same bandwidth
smearing as the averaged data; applycal interpolates the bandpass linearly onto the native
channels. The copy's MODEL_DATA holds the calibrator
at its true position with its phase (skymodel.write_model), which is what rephasing to it
would give the solver, without a phaseshift pass. The product MS keeps its meridian phase
centre for imaging and never carries a calibrator-only MODEL_DATA (+2 GB at full size). The
caltables are antenna-based and split keeps the ANTENNA table, so they apply to the original.

Idempotent: ``<stem>.calibration.json`` in the caltable directory is written last, after
every file and directory of the new tables and the MS (its CORRECTED_DATA) are fsynced and
each new table is sealed with its size and checksum (``products.seal_tree``); when it exists,
was written with the same options (and, for an applied set, the same set), its tables match
the stamps it records (or, for a borrowed set, their seals) and the MS has CORRECTED_DATA, the
stage returns ``skipped=True``. A requeue after a settings change therefore recalibrates
instead of returning the old answer, and so does a table left empty or truncated by a power
cut (``calibration.redo`` names it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..catalogue import CatalogueFormatError, CatalogueUnavailable, survey_sources
from ..catalogue.reference import (
    Calibrator,
)
from ..errors import BadInputError, CalibrationUnavailable, StageError
from ..instrument import PrimaryBeam
from ..products import (
    Record,
    atomic_write,
    dumps,
    fsync_tree,
    make_dirs,
    safe_stem,
    seal_mismatch,
    seal_tree,
    stamp_mismatch,
)
from .apply import apply_calset
from .calset import BANDPASS_KINDS, CalSet, CalTable
from .candidates import as_calibrator, calibrator_candidates
from .casarun import MSInfo, open_table, read_ms_info, run_task
from .fieldsolve import (
    FIELD_CALIBRATOR,
    FieldModel,
    field_calset,
    field_model,
    reference_gain_scale,
    rescale_gain_table,
    solve_field,
)
from .flagging import FlagReport, flag_ms
from .options import CalibrationOptions
from .skymodel import field_sources, find_transiting_calibrator, write_model
from .solve import RefantChoice, choose_refant, solve_tables

log = structlog.get_logger(__name__)

__all__ = ["CalibrationInputs", "CalibrationResult", "calibrate_group",
           "find_transiting_calibrator", "CalSet", "CalTable"]


@dataclass(frozen=True)
class CalibrationInputs:
    group_id: str
    ms_path: Path
    caltable_dir: Path
    pointing_dec_deg: float
    mid_mjd: float
    apply_set: CalSet | None = None      # newest valid BP + newest valid G (carried over)
    bandpass_set: CalSet | None = None   # newest valid calibrator solution (its K, BP, G scale)
    catalogue_db: Path | None = None     # the sky catalogue (catalogue.store), for field models
    beam: PrimaryBeam = PrimaryBeam()
    # A field solution at this declination, within CONTIMG_CAL_FIELD_CHECK_BANDPASS_EVERY_H,
    # whose residual-bandpass check of the same bandpass passed: this group need not repeat it.
    bandpass_checked_by: str | None = None


@dataclass(frozen=True)
class CalibrationResult(Record):
    group_id: str
    ms_path: Path
    mode: str  # 'solved' | 'field' | 'applied' | 'uncalibrated'
    calibrator: str | None
    new_set: CalSet | None
    applied_set: str | None
    refant: str | None
    flag_fractions: dict[str, float] = field(default_factory=dict)
    step_durations: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    notes: tuple[str, ...] = ()
    skipped: bool = False



def marker_path(inputs: CalibrationInputs) -> Path:
    return Path(inputs.caltable_dir) / f"{safe_stem(inputs.group_id)}.calibration.json"


def _has_corrected(ms: Path) -> bool:
    try:
        with open_table(ms) as tb:
            return "CORRECTED_DATA" in tb.colnames()
    except BadInputError:
        return False


def options_digest(options: CalibrationOptions, inputs: CalibrationInputs | None = None) -> str:
    """What decides a run's result besides the MS: the options, and of the inputs the beam
    model, the sky catalogue (rebuilt by an atomic replace: a new file each time) and the
    bandpass a field solve borrows."""
    extra: dict[str, Any] = {}
    if inputs is not None:
        extra["beam"] = inputs.beam.as_dict()
        extra["bandpass_set"] = inputs.bandpass_set.name if inputs.bandpass_set else None
        if inputs.catalogue_db is not None:
            try:
                st = Path(inputs.catalogue_db).stat()
                extra["catalogue"] = [st.st_size, st.st_mtime_ns, st.st_ino]
            except OSError:
                extra["catalogue"] = "missing"
    text = json.dumps({**dataclasses.asdict(options), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finished(inputs: CalibrationInputs, options: CalibrationOptions) -> CalibrationResult | None:
    """The recorded result of a finished run with the same inputs and options, or None."""
    marker = marker_path(inputs)
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("options_digest") != options_digest(options, inputs):
        return None
    mode = doc.get("mode")
    if mode not in ("solved", "field", "applied"):
        return None  # 'uncalibrated' is cheap to redo and a set may have appeared since
    if mode == "applied" and (inputs.apply_set is None
                              or doc.get("applied_set") != inputs.apply_set.name):
        return None
    new_set = CalSet.from_dict(doc["new_set"]) if doc.get("new_set") else None
    used = new_set or inputs.apply_set
    if used is None or not all((Path(t.path) / "table.dat").exists() for t in used.applied_tables()):
        return None
    stamps = doc.get("table_stamps") or {}
    for t in used.applied_tables():
        own = stamps.get(t.kind) if used is new_set else None
        why = stamp_mismatch(Path(t.path), own) if own else seal_mismatch(Path(t.path))
        if why is not None:
            log.warning("calibration.redo", group_id=inputs.group_id, path=str(t.path),
                        reason=f"calibration table does not match its record: {why}")
            return None
    if not _has_corrected(Path(inputs.ms_path)):
        return None
    return CalibrationResult(inputs.group_id, Path(inputs.ms_path), mode, doc.get("calibrator"),
                             new_set, doc.get("applied_set"), doc.get("refant"),
                             dict(doc.get("flag_fractions") or {}), {}, 0.0,
                             tuple(doc.get("notes") or ()) + ("already calibrated: skipped",), True)


def _write_marker(inputs: CalibrationInputs, result: CalibrationResult,
                  options: CalibrationOptions) -> None:
    """Make what the marker vouches for durable, then write it: the MS (CORRECTED_DATA), and
    each new table of this group's caltable directory fsynced and sealed, its stamp recorded."""
    marker = marker_path(inputs)
    stamps: dict[str, Any] = {}
    if result.new_set is not None:
        caldir = Path(inputs.caltable_dir).resolve()
        for t in result.new_set.tables:
            if Path(t.path).resolve().parent == caldir:  # not a borrowed bandpass's tables
                stamps[t.kind] = seal_tree(Path(t.path))
    if result.mode != "uncalibrated":
        fsync_tree(Path(inputs.ms_path))
    doc = {**result.to_dict(), "options_digest": options_digest(options, inputs),
           "table_stamps": stamps}
    atomic_write(marker, dumps(doc, indent=1))


def _own(calset: CalSet, group_id: str) -> bool:
    """Was ``calset`` solved on this group (a re-run's own earlier solution)?"""
    params = calset.params or {}
    own = {params.get("group_id"), (params.get("bp_params") or {}).get("group_id"),
           (params.get("g_params") or {}).get("group_id")}
    return group_id in own


def _unavailable(inputs: CalibrationInputs, missing: list[str]) -> str:
    return (f"no valid calibration set for MJD {inputs.mid_mjd:.5f} / dec "
            f"{inputs.pointing_dec_deg:+.2f} deg (group {inputs.group_id}): no calibrator "
            f"transits, no field solve is possible ({'; '.join(missing)}), and no registered "
            f"bandpass+gain is within its validity window")


def solve_chanbin(info: MSInfo, max_width_hz: float) -> tuple[int, float]:
    """(channels averaged for the solves, native width): the largest divisor of the channel
    count whose averaged width stays within ``max_width_hz``; 1 when the width is unknown.

    Solves read every visibility once per table; at full size 4 channels (~1 MHz) make each
    4x cheaper, while the bandpass structure (tens of MHz) stays resolved."""
    freqs = np.asarray(info.freqs_hz)
    if len(freqs) < 2 or max_width_hz <= 0:
        return 1, 0.0
    width = float(np.median(np.abs(np.diff(freqs))))
    best = 1
    for n in range(1, len(freqs) + 1):
        if len(freqs) % n == 0 and n * width <= max_width_hz * (1 + 1e-9):
            best = n
    return best, width


def _catalogue_sources(inputs: CalibrationInputs, info: MSInfo, radius_deg: float,
                       options: CalibrationOptions) -> tuple[list[Calibrator] | None, str | None]:
    """The survey's sources around the group's phase centre, or (None, why not). The built
    catalogue is used when there is one; a direct call may name a file instead."""
    source = inputs.catalogue_db or (Path(options.field_catalogue) if options.field_catalogue
                                     else None)
    if source is None:
        return None, ("no sky catalogue: build one with `contimg catalog build` (e.g. NVSS) or "
                      "set CONTIMG_CAL_FIELD_CATALOGUE")
    try:
        found = survey_sources(source, *info.phase_centre_deg, radius_deg)
    except (CatalogueUnavailable, CatalogueFormatError, OSError) as exc:
        return None, f"sky catalogue unusable: {exc}"
    return [as_calibrator(s) for s in found], None


@dataclass(frozen=True)
class SolveCopy:
    """The scratch copy solves run on: its MSInfo and how its channels were averaged."""

    info: MSInfo
    n_avg: int
    native_width_hz: float


@contextmanager
def _solve_setup(inputs: CalibrationInputs, options: CalibrationOptions, info: MSInfo,
                 flags: FlagReport, durations: dict[str, float],
                 notes: list[str], max_width_hz: float | None = None,
                 ) -> Iterator[tuple[Path, SolveCopy, tuple[int, ...], RefantChoice]]:
    """The scratch copy (``<stem>.solve.ms`` beside the caltables, removed afterwards), the
    antennas with data and the reference antenna, for one solve."""
    scratch = Path(inputs.caltable_dir) / f"{safe_stem(inputs.group_id)}.solve.ms"
    shutil.rmtree(scratch, ignore_errors=True)
    live = _live(info, flags)
    refant = choose_refant(tuple(options.refant_chain), info, flags.antenna_fractions)
    notes.extend(refant.notes)
    try:
        width = options.solve_max_chan_width_hz if max_width_hz is None else max_width_hz
        yield scratch, _solve_copy(inputs, info, scratch, durations, width), live, refant
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _solve_copy(inputs: CalibrationInputs, info: MSInfo, scratch: Path,
                durations: dict[str, float], max_width_hz: float) -> SolveCopy:
    """Split the unflagged DATA, channel-averaged, into ``scratch``."""
    t0 = time.perf_counter()
    n_avg, native = solve_chanbin(info, max_width_hz)
    run_task("split", vis=str(inputs.ms_path), outputvis=str(scratch), datacolumn="data",
             keepflags=False, width=n_avg)
    if not (scratch / "table.dat").exists():
        raise StageError(f"split of the unflagged data produced no MS at {scratch}")
    sinfo = read_ms_info(scratch)
    if sinfo.antenna_names != info.antenna_names:
        raise StageError("the solve copy's ANTENNA table differs from the group's: tables "
                         "solved on it would not apply")
    if len(sinfo.freqs_hz) * n_avg != len(info.freqs_hz):
        raise StageError(f"the solve copy has {len(sinfo.freqs_hz)} channels, expected "
                         f"{len(info.freqs_hz)} / {n_avg}")
    durations["copy"] = time.perf_counter() - t0
    return SolveCopy(sinfo, n_avg, native)


def _live(info: MSInfo, flags: FlagReport) -> tuple[int, ...]:
    return tuple(i for i in info.antennas_in_data
                 if flags.antenna_fractions.get(info.name_of(i), 1.0) < 1.0)


def _solve(inputs: CalibrationInputs, options: CalibrationOptions, info: MSInfo, cal: Calibrator,
           flags: FlagReport, durations: dict[str, float],
           notes: list[str], on_field: FieldModel | None = None) -> CalSet:
    """Model a scratch copy with ``cal`` (and its field), solve K, BP and G; return the new
    set. With ``on_field`` (no bandpass in force, a bright field) ``cal`` is the field's
    brightest source and the whole chain is solved on the field model."""
    with _solve_setup(inputs, options, info, flags, durations, notes) as (scratch, copy,
                                                                            live, refant):
        stem, caldir = safe_stem(inputs.group_id), Path(inputs.caltable_dir)
        n_avg, native = copy.n_avg, copy.native_width_hz
        t0 = time.perf_counter()
        field: list[Calibrator] = []
        near, _ = _catalogue_sources(inputs, copy.info, options.field_radius_deg, options)
        if near:
            field = field_sources(near, cal, copy.info, inputs.pointing_dec_deg,
                                  options.field_min_apparent_jy, options.field_radius_deg,
                                  inputs.beam)[:options.field_max_sources]
        model = write_model(scratch, cal, inputs.pointing_dec_deg, copy.info, n_avg, native,
                            field, inputs.beam)
        durations["model"] = time.perf_counter() - t0
        solved = solve_tables(scratch, caldir, stem, refant, options, live)
        durations.update(solved.durations)
        notes.extend(solved.notes)
    flux_scale = _carry_flux_scale(inputs, cal, solved.tables["G"],
                                   {info.name_of(i) for i in live}, notes)
    mid = float(inputs.mid_mjd)
    tables = []
    for kind, path in solved.tables.items():
        half = (options.bp_validity_h if kind in BANDPASS_KINDS else options.g_validity_h) / 24.0
        tables.append(CalTable(kind, path, mid - half, mid + half))
    params = {**solved.params, "group_id": inputs.group_id, "mode": "solved",
              "model": {k: v for k, v in model.items() if k != "duration_s"},
              "solve_chanbin": n_avg,
              "live_antennas": [info.name_of(i) for i in live],
              "antennas_in_data": list(info.names_in_data),
              "flag_fractions": flags.fractions, "beam": inputs.beam.as_dict(),
              "flux_scale": flux_scale}
    if on_field is not None:
        params.update(mode="field", field_model=on_field.summary())
        notes.append(f"no bandpass in force: K, BP and G solved on the field "
                     f"({on_field.total_apparent_jy:.2f} Jy through the beam)")
    return CalSet(name=f"{stem}_{'fieldbp' if on_field is not None else cal.name}",
                  tables=tuple(tables), refant=solved.refant,
                  calibrator=FIELD_CALIBRATOR if on_field is not None else cal.name, mid_mjd=mid,
                  dec_deg=float(inputs.pointing_dec_deg), params=params, qa={})


def _carry_flux_scale(inputs: CalibrationInputs, cal: Calibrator, g_table: Path,
                      live_names: set[str], notes: list[str]) -> dict[str, Any]:
    """Where the new set's amplitude scale comes from. A flux standard sets it. Any other
    calibrator's catalogue flux is good to tens of per cent at best (they vary), so when a
    solution traced to a standard is in force its array-mean gain amplitude is kept: the
    new G is rescaled to it, and the calibrator's flux implied is recorded."""
    if cal.kind == "standard":
        return {"from": "standard", "calibrator": cal.name}
    if inputs.bandpass_set is None:
        notes.append(f"flux scale from the catalogue flux of {cal.name} ({cal.flux_jy:g} Jy): "
                     "no solution on a flux standard is in force")
        return {"from": "catalogue", "calibrator": cal.name}
    try:
        ref = reference_gain_scale(inputs.bandpass_set, live_names)
    except StageError as exc:
        notes.append(f"flux scale from the catalogue flux of {cal.name} ({cal.flux_jy:g} Jy): "
                     f"the scale in force could not be read ({exc})")
        return {"from": "catalogue", "calibrator": cal.name, "reference_error": str(exc)}
    ratio = rescale_gain_table(g_table, ref, live_names)
    implied = [round(cal.flux_jy / r ** 2, 4) for r in ratio]
    notes.append(f"flux scale carried from {inputs.bandpass_set.name}; {cal.name} implies "
                 f"{implied} Jy against {cal.flux_jy:g} Jy catalogued")
    return {"from": inputs.bandpass_set.name, "calibrator": cal.name,
            "gain_ratio_to_reference": [round(float(r), 5) for r in ratio],
            "implied_flux_jy": implied}


def _plan_field(inputs: CalibrationInputs, options: CalibrationOptions,
                info: MSInfo) -> tuple[FieldModel | None, str | None, float]:
    """The field model for this group, or (None, why no field solve); and its seconds."""
    t0 = time.perf_counter()
    if not options.field_solve:
        return None, "field solves are off (CONTIMG_CAL_FIELD_SOLVE)", 0.0
    near, why = _catalogue_sources(inputs, info, options.field_radius_deg, options)
    if near is None:
        return None, why, time.perf_counter() - t0
    model = field_model(near, info, inputs.pointing_dec_deg, options, inputs.beam)
    took = time.perf_counter() - t0
    if inputs.bandpass_set is None and model.total_apparent_jy < options.field_bandpass_min_jy:
        return None, (f"no valid bandpass yet (it comes from a calibrator transit, or from a "
                      f"field of at least CONTIMG_CAL_FIELD_BANDPASS_MIN_JY="
                      f"{options.field_bandpass_min_jy:g} Jy; this one has "
                      f"{model.total_apparent_jy:.3f} Jy)"), took
    if not model.sources or model.total_apparent_jy < options.field_min_model_jy:
        return None, (f"the catalogue's field model is too faint: {model.total_apparent_jy:.3f} Jy "
                      f"through the beam from {len(model.sources)} source(s), below "
                      f"CONTIMG_CAL_FIELD_MIN_MODEL_JY={options.field_min_model_jy:g}"), took
    return model, None, took


def _solve_on_field(inputs: CalibrationInputs, options: CalibrationOptions, info: MSInfo,
                    model: FieldModel, flags: FlagReport, durations: dict[str, float],
                    notes: list[str]) -> CalSet:
    """Solve this group's gains against ``model`` with the newest K and BP; the new set."""
    assert inputs.bandpass_set is not None  # checked by _plan_field
    with _solve_setup(inputs, options, info, flags, durations, notes,
                      options.field_solve_max_chan_width_hz) as (scratch, copy, live, refant):
        n_avg = copy.n_avg
        paths, params = solve_field(inputs.ms_path, scratch, Path(inputs.caltable_dir),
                                    safe_stem(inputs.group_id), model, inputs.bandpass_set,
                                    refant, options, inputs.pointing_dec_deg, n_avg,
                                    copy.native_width_hz, live, inputs.beam, durations,
                                    checked_by=inputs.bandpass_checked_by)
    notes.extend(params.pop("notes", []))
    params.update({"group_id": inputs.group_id, "mode": "field", "solve_chanbin": n_avg,
                   "refant": refant.refant, "refant_chain": list(refant.chain),
                   "live_antennas": [info.name_of(i) for i in live],
                   "antennas_in_data": list(info.names_in_data),
                   "flag_fractions": flags.fractions, "beam": inputs.beam.as_dict()})
    return field_calset(f"{safe_stem(inputs.group_id)}_field", paths["G"], inputs.bandpass_set, refant.refant,
                        float(inputs.mid_mjd), float(inputs.pointing_dec_deg),
                        options.g_validity_h, params)


def _transiting(inputs: CalibrationInputs, options: CalibrationOptions, info: MSInfo,
                notes: list[str]) -> Calibrator | None:
    """The calibrator transiting in this group (bundled list plus the sky catalogue's
    selection; the bundled list alone, with a note, when the catalogue is unavailable)."""
    try:
        candidates = calibrator_candidates(inputs.catalogue_db, inputs.pointing_dec_deg, options,
                                           inputs.beam)
    except CatalogueUnavailable as exc:
        candidates = None
        notes.append(f"calibrators from the bundled list only: {exc}")
    return find_transiting_calibrator(info, options, pointing_dec_deg=inputs.pointing_dec_deg,
                                      candidates=candidates, beam=inputs.beam)


def _attempt(inputs: CalibrationInputs, options: CalibrationOptions, info: MSInfo,
             cal: Calibrator | None, model: FieldModel | None, flags: FlagReport,
             durations: dict[str, float], notes: list[str]
             ) -> tuple[str, Callable[[], CalSet]] | None:
    """(mode, the solve that makes its set) in order of preference, or None: solve on the
    transiting calibrator; else the whole chain on a field bright enough for a bandpass when
    none is in force; else the gain on the field with the bandpass in force."""
    if cal is not None:
        return "solved", lambda: _solve(inputs, options, info, cal, flags, durations, notes)
    if model is not None and inputs.bandpass_set is None:
        return "field", lambda: _solve(inputs, options, info, model.sources[0], flags,
                                       durations, notes, on_field=model)
    if model is not None:
        return "field", lambda: _solve_on_field(inputs, options, info, model, flags,
                                                durations, notes)
    return None


def calibrate_group(inputs: CalibrationInputs, options: CalibrationOptions) -> CalibrationResult:
    """Calibrate one group, in this order of preference:

    1. ``solved``: a calibrator transits: solve K, BP and G on it (and its field);
    2. ``field``: solve G on the group's own field with the newest valid K and BP (with no
       valid bandpass, a field bright enough solves K and BP too);
    3. ``applied``: the field model is too faint (or the field solve failed): apply the
       newest valid bandpass + gain (``inputs.apply_set``).

    Raises ``BadInputError`` (unreadable MS, everything flagged), ``StageError`` (a CASA step
    failed or left no usable solutions, and no set in force to fall back on) and
    ``CalibrationUnavailable`` (none of the three is possible, stale_policy 'hold'; the
    message says what is missing).
    """
    t_start = time.perf_counter()
    ms = Path(inputs.ms_path)
    stem = safe_stem(inputs.group_id)
    if not ms.exists():
        raise BadInputError("measurement set does not exist", path=str(ms))
    caldir = Path(inputs.caltable_dir)
    make_dirs(caldir)  # its entry in the product directory must survive a power cut
    done = _finished(inputs, options)
    if done is not None:
        log.info("calibration_skipped", group_id=inputs.group_id, mode=done.mode)
        return done
    marker_path(inputs).unlink(missing_ok=True)
    if inputs.bandpass_set is not None and _own(inputs.bandpass_set, inputs.group_id):
        # a re-run must not borrow (and overwrite) the tables it is about to solve again
        inputs = dataclasses.replace(inputs, bandpass_set=None)

    durations: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    info = read_ms_info(ms)
    if "DATA" not in info.columns:
        raise BadInputError("measurement set has no DATA column", path=str(ms))
    cal = _transiting(inputs, options, info, notes)
    durations["find_calibrator"] = time.perf_counter() - t0
    no_field: str | None
    model, no_field, durations["field_model"] = (None, "a calibrator transits", 0.0)
    if cal is None:
        model, no_field, durations["field_model"] = _plan_field(inputs, options, info)
    # A group that will be held is flagged first: the pass does not need a calibration set, it
    # runs while the calibrator group is still solving, and flag_ms leaves a marker so the
    # retries (and the final apply) skip it.
    flags = flag_ms(ms, options)
    durations["flagging"] = flags.duration_s
    missing = [m for m in (no_field,) if m and cal is None]
    if cal is None and model is None and inputs.apply_set is None and options.stale_policy == "hold":
        raise CalibrationUnavailable(_unavailable(inputs, missing))

    mode, new_set, applied, refant = "uncalibrated", None, None, None
    attempt = _attempt(inputs, options, info, cal, model, flags, durations, notes)
    if attempt is None:
        notes.append(f"no field solve: {no_field}")
    else:
        try:
            new_set = attempt[1]()
            durations["applycal"] = apply_calset(ms, new_set, same_group=True)
            mode, applied, refant = attempt[0], new_set.name, new_set.refant
        except StageError as exc:
            new_set = None
            if inputs.apply_set is not None:
                source = cal.name if cal is not None else "the field"
                notes.append(f"solve on {source} failed ({exc}); applied the set in force")
                log.warning("solve_failed_fallback", source=source, error=str(exc),
                            apply_set=inputs.apply_set.name)
            elif attempt[0] == "field":
                # held (or imaged uncalibrated): the next transit, or a neighbour's field
                # solution, will serve it; retrying the same solve would not
                missing.append(f"the field solve failed: {exc}")
                log.warning("field_solve_failed", group_id=inputs.group_id, error=str(exc))
            else:
                raise
    if mode == "uncalibrated" and inputs.apply_set is not None:
        durations["applycal"] = apply_calset(ms, inputs.apply_set, same_group=False)
        mode, applied, refant = "applied", inputs.apply_set.name, inputs.apply_set.refant
    elif mode == "uncalibrated":
        if options.stale_policy == "hold":
            raise CalibrationUnavailable(_unavailable(inputs, missing))
        notes.append("no valid calibration set: left uncalibrated (imaging uses DATA)")
        log.warning("calibration_uncalibrated", group_id=inputs.group_id)

    result = CalibrationResult(
        group_id=inputs.group_id, ms_path=ms, mode=mode,
        calibrator=cal.name if (cal is not None and mode == "solved") else None,
        new_set=new_set, applied_set=applied, refant=refant, flag_fractions=flags.fractions,
        step_durations={k: round(v, 3) for k, v in durations.items()},
        duration_s=time.perf_counter() - t_start, notes=tuple(notes), skipped=False)
    _write_marker(inputs, result, options)
    log.info("calibrated", group_id=inputs.group_id, stem=stem, mode=mode, calibrator=result.calibrator,
             applied_set=applied, refant=refant, duration_s=round(result.duration_s, 2))
    return result
