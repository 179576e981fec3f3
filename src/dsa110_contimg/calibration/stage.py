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

Idempotent: ``<stem>.calibration.json`` in the caltable directory is written last; when it
exists, was written with the same options (and, for an applied set, the same set), its tables
exist and the MS has CORRECTED_DATA, the stage returns ``skipped=True``. A requeue after a
settings change therefore recalibrates instead of returning the old answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..errors import BadInputError, CalibrationUnavailable, StageError
from ..products import safe_stem
from .apply import apply_calset
from .calset import BANDPASS_KINDS, CalSet, CalTable
from .casarun import MSInfo, open_table, read_ms_info, run_task
from .catalog import Calibrator, load_sky_catalogue
from .flagging import FlagReport, flag_ms
from .options import CalibrationOptions
from .skymodel import field_sources, find_transiting_calibrator, write_model
from .solve import choose_refant, solve_tables

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
    apply_set: CalSet | None = None


@dataclass(frozen=True)
class CalibrationResult:
    group_id: str
    ms_path: Path
    mode: str  # 'solved' | 'applied' | 'uncalibrated'
    calibrator: str | None
    new_set: CalSet | None
    applied_set: str | None
    refant: str | None
    flag_fractions: dict[str, float] = field(default_factory=dict)
    step_durations: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    notes: tuple[str, ...] = ()
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "ms_path": str(self.ms_path), "mode": self.mode,
                "calibrator": self.calibrator,
                "new_set": self.new_set.as_dict() if self.new_set else None,
                "applied_set": self.applied_set, "refant": self.refant,
                "flag_fractions": self.flag_fractions, "step_durations": self.step_durations,
                "duration_s": self.duration_s, "notes": list(self.notes), "skipped": self.skipped}


def marker_path(inputs: CalibrationInputs) -> Path:
    return Path(inputs.caltable_dir) / f"{safe_stem(inputs.group_id)}.calibration.json"


def _has_corrected(ms: Path) -> bool:
    try:
        with open_table(ms) as tb:
            return "CORRECTED_DATA" in tb.colnames()
    except BadInputError:
        return False


def options_digest(options: CalibrationOptions) -> str:
    text = json.dumps(dataclasses.asdict(options), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finished(inputs: CalibrationInputs, options: CalibrationOptions) -> CalibrationResult | None:
    """The recorded result of a finished run with the same inputs and options, or None."""
    marker = marker_path(inputs)
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("options_digest") != options_digest(options):
        return None
    mode = doc.get("mode")
    if mode not in ("solved", "applied"):
        return None  # 'uncalibrated' is cheap to redo and a set may have appeared since
    if mode == "applied" and (inputs.apply_set is None
                              or doc.get("applied_set") != inputs.apply_set.name):
        return None
    new_set = CalSet.from_dict(doc["new_set"]) if doc.get("new_set") else None
    used = new_set or inputs.apply_set
    if used is None or not all((Path(t.path) / "table.dat").exists() for t in used.applied_tables()):
        return None
    if not _has_corrected(Path(inputs.ms_path)):
        return None
    return CalibrationResult(inputs.group_id, Path(inputs.ms_path), mode, doc.get("calibrator"),
                             new_set, doc.get("applied_set"), doc.get("refant"),
                             dict(doc.get("flag_fractions") or {}), {}, 0.0,
                             tuple(doc.get("notes") or ()) + ("already calibrated: skipped",), True)


def _write_marker(inputs: CalibrationInputs, result: CalibrationResult,
                  options: CalibrationOptions) -> None:
    marker = marker_path(inputs)
    tmp = marker.with_name("." + marker.name + ".tmp")
    doc = {**result.as_dict(), "options_digest": options_digest(options)}
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(marker)


def _unavailable(inputs: CalibrationInputs) -> str:
    return (f"no valid calibration set for MJD {inputs.mid_mjd:.5f} / dec "
            f"{inputs.pointing_dec_deg:+.2f} deg (group {inputs.group_id}): no calibrator transits "
            f"and no registered bandpass+gain is within its validity window")


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


def _solve(inputs: CalibrationInputs, options: CalibrationOptions, info: MSInfo, cal: Calibrator,
           flags: FlagReport, durations: dict[str, float],
           notes: list[str]) -> CalSet:
    """Rephase a scratch copy to ``cal``, model it, solve; return the new (unregistered) set."""
    stem = safe_stem(inputs.group_id)
    caldir = Path(inputs.caltable_dir)
    scratch = caldir / f"{stem}.solve.ms"
    shutil.rmtree(scratch, ignore_errors=True)
    live = tuple(i for i in info.antennas_in_data
                 if flags.antenna_fractions.get(info.name_of(i), 1.0) < 1.0)
    refant = choose_refant(tuple(options.refant_chain), info, flags.antenna_fractions)
    notes.extend(refant.notes)
    try:
        t0 = time.perf_counter()
        n_avg, native = solve_chanbin(info, options.solve_max_chan_width_hz)
        run_task("split", vis=str(inputs.ms_path), outputvis=str(scratch), datacolumn="data",
                 keepflags=False, width=n_avg)
        if not (scratch / "table.dat").exists():
            raise StageError(f"split of the unflagged data produced no MS at {scratch}")
        sinfo = read_ms_info(scratch)
        if sinfo.antenna_names != info.antenna_names:
            raise StageError("the solve copy's ANTENNA table differs from the group's: tables "
                             "solved on it would not apply")
        durations["copy"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if len(sinfo.freqs_hz) * n_avg != len(info.freqs_hz):
            raise StageError(f"the solve copy has {len(sinfo.freqs_hz)} channels, expected "
                             f"{len(info.freqs_hz)} / {n_avg}")
        field = []
        if options.field_catalogue:
            field = field_sources(load_sky_catalogue(options.field_catalogue), cal, sinfo,
                                  inputs.pointing_dec_deg, options.field_min_apparent_jy)
        model = write_model(scratch, cal, inputs.pointing_dec_deg, sinfo, n_avg, native, field)
        durations["model"] = time.perf_counter() - t0
        solved = solve_tables(scratch, caldir, stem, refant, options, live)
        durations.update(solved.durations)
        notes.extend(solved.notes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mid = float(inputs.mid_mjd)
    tables = []
    for kind, path in solved.tables.items():
        half = (options.bp_validity_h if kind in BANDPASS_KINDS else options.g_validity_h) / 24.0
        tables.append(CalTable(kind, path, mid - half, mid + half))
    params = {**solved.params, "group_id": inputs.group_id,
              "model": {k: v for k, v in model.items() if k != "duration_s"},
              "solve_chanbin": n_avg,
              "live_antennas": [info.name_of(i) for i in live],
              "antennas_in_data": list(info.names_in_data),
              "flag_fractions": flags.fractions}
    return CalSet(name=f"{stem}_{cal.name}", tables=tuple(tables), refant=solved.refant,
                  calibrator=cal.name, mid_mjd=mid, dec_deg=float(inputs.pointing_dec_deg),
                  params=params, qa={})


def calibrate_group(inputs: CalibrationInputs, options: CalibrationOptions) -> CalibrationResult:
    """Calibrate one group: solve on a transiting calibrator, else apply ``inputs.apply_set``.

    Raises ``BadInputError`` (unreadable MS, everything flagged), ``StageError`` (a CASA step
    failed or left no usable solutions, and no set in force to fall back on) and
    ``CalibrationUnavailable`` (no calibrator, no set, stale_policy 'hold').
    """
    t_start = time.perf_counter()
    ms = Path(inputs.ms_path)
    stem = safe_stem(inputs.group_id)
    if not ms.exists():
        raise BadInputError("measurement set does not exist", path=str(ms))
    caldir = Path(inputs.caltable_dir)
    caldir.mkdir(parents=True, exist_ok=True)
    done = _finished(inputs, options)
    if done is not None:
        log.info("calibration_skipped", group_id=inputs.group_id, mode=done.mode)
        return done
    marker_path(inputs).unlink(missing_ok=True)

    durations: dict[str, float] = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    info = read_ms_info(ms)
    if "DATA" not in info.columns:
        raise BadInputError("measurement set has no DATA column", path=str(ms))
    cal = find_transiting_calibrator(info, options, pointing_dec_deg=inputs.pointing_dec_deg)
    durations["find_calibrator"] = time.perf_counter() - t0
    # A group that will be held is flagged first: the pass does not need a calibration set, it
    # runs while the calibrator group is still solving, and flag_ms leaves a marker so the
    # retries (and the final apply) skip it.
    flags = flag_ms(ms, options)
    durations["flagging"] = flags.duration_s
    if cal is None and inputs.apply_set is None and options.stale_policy == "hold":
        raise CalibrationUnavailable(_unavailable(inputs))

    mode, new_set, applied, refant = "uncalibrated", None, None, None
    if cal is not None:
        try:
            new_set = _solve(inputs, options, info, cal, flags, durations, notes)
            durations["applycal"] = apply_calset(ms, new_set, same_group=True)
            mode, applied, refant = "solved", new_set.name, new_set.refant
        except StageError as exc:
            if inputs.apply_set is None:
                raise
            new_set = None
            notes.append(f"solve on {cal.name} failed ({exc}); applied the set in force")
            log.warning("solve_failed_fallback", calibrator=cal.name, error=str(exc),
                        apply_set=inputs.apply_set.name)
    if mode != "solved" and inputs.apply_set is not None:
        durations["applycal"] = apply_calset(ms, inputs.apply_set, same_group=False)
        mode, applied, refant = "applied", inputs.apply_set.name, inputs.apply_set.refant
    elif mode != "solved":
        if options.stale_policy == "hold":
            raise CalibrationUnavailable(_unavailable(inputs))
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
