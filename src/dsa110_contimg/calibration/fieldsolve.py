"""Gains solved on a group's own field: lights-out calibration between calibrator transits.

DSA-110 stays at one declination for days; a calibrator transits a few times a day at best.
Every other group solves its gains against a model of its own field built from the sky
catalogue (NVSS at 1.4 GHz): every source at least ``field_min_apparent_jy`` bright through
the primary beam, each with the beam evaluated per integration and channel along the drift.
Bandpass and delay are instrumental and stable for a day: the newest valid K and BP from a
calibrator solution are applied while solving, never re-solved here.

The solve, on the same averaged scratch copy the calibrator solve uses:

  Gp  gaincal calmode='p', solint=field_phase_solint   [K, BP]       phase per integration
  Ga  gaincal calmode='a', solint=field_amp_solint     [K, BP, Gp]   amplitude per group

and the applied gain is G = Gp x |Ga| / mean|Ga| x S_ref: antenna-relative amplitudes from the
field, the array's mean amplitude S_ref (per polarisation) from the calibrator solution that
set the flux scale from the standards. A survey model lacks the sources below its limit and
carries a few per cent of flux error per source, so its absolute scale would wander from
group to group; it only carries the calibrator's scale between transits. The ratio of the
field's own scale to S_ref is recorded (``model_scale_ratio``) so QA can watch it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..catalogue.reference import Calibrator
from ..errors import StageError
from ..instrument import PrimaryBeam
from .calset import BANDPASS_KINDS, FIELD_CALIBRATOR, CalSet, CalTable
from .casarun import MSInfo, open_table, read_ms_info, run_task
from .options import CalibrationOptions
from .skymodel import apparent_sources, write_model
from .solve import (
    RefantChoice,
    _check_table,
    effective_uvrange,
    read_caltable,
)

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class FieldModel:
    """The catalogue sources a field solve models, with their mean apparent flux (Jy)."""

    sources: tuple[Calibrator, ...]
    apparent_jy: tuple[float, ...]
    considered: int  # catalogue sources within the search radius

    @property
    def total_apparent_jy(self) -> float:
        return float(sum(self.apparent_jy))

    def summary(self) -> dict[str, Any]:
        return {"n_sources": len(self.sources), "considered": self.considered,
                "model_apparent_jy": round(self.total_apparent_jy, 4),
                "brightest": [{"name": s.name, "apparent_jy": round(a, 4)}
                              for s, a in zip(self.sources[:5], self.apparent_jy[:5], strict=True)]}


def field_model(catalogue: list[Calibrator], info: MSInfo, pointing_dec_deg: float,
                options: CalibrationOptions, beam: PrimaryBeam) -> FieldModel:
    """Which catalogue sources model this group's field (brightest first)."""
    chosen = apparent_sources(catalogue, None, info, pointing_dec_deg,
                              options.field_min_apparent_jy, options.field_radius_deg,
                              beam)[:options.field_max_sources]
    return FieldModel(tuple(s for s, _ in chosen), tuple(a for _, a in chosen), len(catalogue))


def reference_gain_scale(bandpass_set: CalSet, live_names: set[str] | None = None) -> np.ndarray:
    """Mean gain amplitude per polarisation of the calibrator solution ``bandpass_set`` (its G
    table): the flux scale the standards set, carried to the field solve."""
    g = bandpass_set.table("G")
    if g is None or not (Path(g.path) / "table.dat").exists():
        raise StageError(f"calibration set {bandpass_set.name} has no gain table on disk to "
                         f"take the flux scale from ({g.path if g else 'none registered'})")
    sol = read_caltable(g.path)
    rows = np.ones(sol.antenna.shape, bool)
    if live_names:
        rows = np.isin([sol.antenna_names[a] for a in sol.antenna], sorted(live_names))
    amp = np.abs(sol.values[:, 0, rows])
    ok = ~sol.flag[:, 0, rows]
    out = np.array([float(np.median(amp[p][ok[p]])) if ok[p].any() else np.nan
                    for p in range(amp.shape[0])])
    if not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise StageError(f"calibration set {bandpass_set.name}: its gain table has no usable "
                         "amplitudes for the flux scale")
    return out


def rescale_gain_table(path: Path, scale: np.ndarray, live_names: set[str]) -> np.ndarray:
    """Scale a G table in place so that its median amplitude over ``live_names`` is
    ``scale`` per polarisation; returns the factors the table's median was off by
    (median / scale)."""
    sol = read_caltable(path)
    names = np.array([sol.antenna_names[a] for a in sol.antenna])
    rows = np.isin(names, sorted(live_names))
    ratio = np.ones(len(scale))
    for p in range(min(len(scale), sol.values.shape[0])):
        ok = rows & ~sol.flag[p, 0, :]
        if ok.any():
            ratio[p] = float(np.median(np.abs(sol.values[p, 0, ok]))) / float(scale[p])
    with open_table(path, readonly=False) as tb:
        cparam = tb.getcol("CPARAM")
        for p in range(min(len(ratio), cparam.shape[0])):
            cparam[p] /= ratio[p]
        tb.putcol("CPARAM", cparam)
    return ratio


def _combine(gp: Path, ga: Path, out: Path, scale: np.ndarray) -> dict[str, Any]:
    """Write G = Gp x |Ga| / mean|Ga| x scale into a copy of ``gp`` at ``out``."""
    amp_sol = read_caltable(ga)
    npol = amp_sol.values.shape[0]
    if len(scale) != npol:
        raise StageError(f"the flux-scale reference has {len(scale)} polarisations, the field "
                         f"solution {npol}")
    rel = np.ones((npol, max(amp_sol.antenna.max(initial=0) + 1, 1)))
    bad = np.ones_like(rel, dtype=bool)  # until an unflagged amplitude says otherwise
    amp = np.abs(amp_sol.values[:, 0, :])  # (npol, nrow); one solution per antenna (solint inf)
    flag = amp_sol.flag[:, 0, :]
    field_scale = np.array([float(np.median(amp[p][~flag[p]])) if (~flag[p]).any() else np.nan
                            for p in range(npol)])
    if not np.all(np.isfinite(field_scale)) or np.any(field_scale <= 0):
        raise StageError("field amplitude solve left no usable solution")
    for p in range(npol):
        for ant in np.unique(amp_sol.antenna):
            sel = (amp_sol.antenna == ant) & ~flag[p]
            if sel.any():
                rel[p, ant] = float(np.median(amp[p, sel])) / field_scale[p]
                bad[p, ant] = False
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(gp, out)
    with open_table(out, readonly=False) as tb:
        ant = tb.getcol("ANTENNA1")
        cparam = tb.getcol("CPARAM")  # (npol, 1, nrow)
        fl = tb.getcol("FLAG")
        for p in range(min(npol, cparam.shape[0])):
            known = ant < rel.shape[1]
            factor = np.where(known, rel[p, np.minimum(ant, rel.shape[1] - 1)], 1.0) * scale[p]
            cparam[p, 0, :] = cparam[p, 0, :] / np.maximum(np.abs(cparam[p, 0, :]), 1e-30) * factor
            fl[p, 0, :] |= np.where(known, bad[p, np.minimum(ant, rel.shape[1] - 1)], True)
        tb.putcol("CPARAM", cparam)
        tb.putcol("FLAG", fl)
    return {"model_scale_ratio": [round(float(f / s), 5) for f, s in zip(field_scale, scale,
                                                                          strict=True)],
            "reference_gain_scale": [round(float(s), 6) for s in scale],
            "relative_amp_scatter": float(np.std(rel[~bad]) if (~bad).any() else np.nan)}


def solve_field(ms: Path, scratch: Path, caldir: Path, stem: str, model: FieldModel,
                bandpass_set: CalSet, refant: RefantChoice, options: CalibrationOptions,
                pointing_dec_deg: float, n_avg: int, native_width_hz: float,
                live: tuple[int, ...], beam: PrimaryBeam, durations: dict[str, float],
                checked_by: str | None = None) -> tuple[dict[str, Path], dict[str, Any]]:
    """Model the field on ``scratch`` and solve Gp, Ga; returns ({'G': path, ...}, params).

    The residual-bandpass check runs when ``options.field_check_bandpass`` is on, unless
    ``checked_by`` names a recent field solution that already checked the same bandpass."""
    t0 = time.perf_counter()
    sinfo = read_ms_info(scratch)
    facts = write_model(scratch, model.sources[0], pointing_dec_deg, sinfo, n_avg,
                        native_width_hz, model.sources[1:], beam)
    durations["model"] = time.perf_counter() - t0
    pre = [t for t in bandpass_set.applied_tables() if t.kind in BANDPASS_KINDS]
    if not any(t.kind == "BP" for t in pre):
        raise StageError(f"calibration set {bandpass_set.name} holds no bandpass")
    bandpass_set.require_intact(pre)
    pre_paths = [str(t.path) for t in pre]
    pre_interp = ["nearest,linear" if t.kind == "BP" else "nearest" for t in pre]
    uvrange, uv_note = effective_uvrange(options.uvrange, scratch, live)
    paths = {"Gp": caldir / f"{stem}.Gfp", "Ga": caldir / f"{stem}.Gfa", "G": caldir / f"{stem}.Gf"}
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    common = {"vis": str(scratch), "refant": ",".join(refant.chain), "refantmode": "flex",
              "minsnr": options.min_snr, "uvrange": uvrange, "gaintype": "G"}
    flagged: dict[str, float] = {}
    t0 = time.perf_counter()
    run_task("gaincal", caltable=str(paths["Gp"]), calmode="p", solint=options.field_phase_solint,
             gaintable=pre_paths, interp=pre_interp, **common)
    flagged["Gp"] = _check_table(paths["Gp"], "field phase (Gp)", live)
    durations["Gp"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_task("gaincal", caltable=str(paths["Ga"]), calmode="a", solint=options.field_amp_solint,
             combine="scan", gaintable=pre_paths + [str(paths["Gp"])],
             interp=pre_interp + ["linear"], **common)
    flagged["Ga"] = _check_table(paths["Ga"], "field amplitude (Ga)", live)
    durations["Ga"] = time.perf_counter() - t0
    live_names = {sinfo.name_of(i) for i in live}
    scale = reference_gain_scale(bandpass_set, live_names)
    combined = _combine(paths["Gp"], paths["Ga"], paths["G"], scale)
    flagged["G"] = _check_table(paths["G"], "field gain (G)", live)
    if options.field_check_bandpass and checked_by:
        combined["bandpass_checked_by"] = checked_by
    elif options.field_check_bandpass:
        t0 = time.perf_counter()
        bres = caldir / f"{stem}.Bres"
        shutil.rmtree(bres, ignore_errors=True)
        try:
            run_task("bandpass", vis=str(scratch), caltable=str(bres), bandtype="B",
                     solint="inf", combine="scan", solnorm=True, refant=",".join(refant.chain),
                     minsnr=options.min_snr, uvrange=uvrange,
                     gaintable=pre_paths + [str(paths["G"])], interp=pre_interp + ["linear"])
            combined["bandpass_residual"] = bandpass_residual(bres, live)
        except StageError as exc:  # a diagnostic: its failure must not cost the solution
            combined["bandpass_residual"] = {"available": False, "reason": str(exc)}
        shutil.rmtree(bres, ignore_errors=True)
        durations["bandpass_check"] = time.perf_counter() - t0
    params = {"model": {k: v for k, v in facts.items() if k != "duration_s"},
              "field_model": model.summary(), "bandpass_set": bandpass_set.name,
              "uvrange": uvrange, "field_phase_solint": options.field_phase_solint,
              "field_amp_solint": options.field_amp_solint,
              "flagged_solution_fraction": {k: round(v, 4) for k, v in flagged.items()},
              **combined}
    if uv_note:
        params["notes"] = [uv_note]
    log.info("field_solved", ms=str(ms), sources=len(model.sources),
             model_apparent_jy=round(model.total_apparent_jy, 3),
             scale_ratio=combined["model_scale_ratio"],
             durations={k: round(v, 2) for k, v in durations.items()})
    return paths, params


RESIDUAL_BLOCKS = 8


def bandpass_residual(path: Path, live: tuple[int, ...], blocks: int = RESIDUAL_BLOCKS,
                      ) -> dict[str, Any]:
    """How far the applied bandpass is from the data: a bandpass solved *through* K, BP and
    the field gain should be flat. Per antenna and polarisation the residual is divided by
    its own mean over the band, averaged in ``blocks`` frequency blocks (noise down by the
    channels per block); returns the rms block phase (deg) and amplitude deviation, with the
    rms expected from noise alone (from the solutions' SNR)."""
    if not (path / "table.dat").exists():
        return {"available": False, "reason": "residual bandpass solve produced no table"}
    sol = read_caltable(path)
    use = np.isin(sol.antenna, np.asarray(live, dtype=int))
    vals, flag, snr = sol.values[:, :, use], sol.flag[:, :, use], sol.snr[:, :, use]
    nchan = vals.shape[1]
    edges = np.linspace(0, nchan, min(blocks, nchan) + 1).astype(int)
    phases, amps, noise = [], [], []
    for p in range(vals.shape[0]):
        for r in range(vals.shape[2]):
            ok = ~flag[p, :, r]
            if ok.sum() < max(2, nchan // 2):
                continue
            v = vals[p, ok, r]
            v = v / np.mean(v)
            chans = np.flatnonzero(ok)
            for b0, b1 in zip(edges[:-1], edges[1:], strict=True):
                sel = (chans >= b0) & (chans < b1)
                if not sel.any():
                    continue
                m = np.mean(v[sel])
                phases.append(np.angle(m))
                amps.append(abs(m) - 1.0)
                s = snr[p, chans[sel], r]
                s = s[s > 0]
                if s.size:
                    noise.append(1.0 / (np.sqrt(np.mean(s ** 2)) * np.sqrt(s.size)))
    if not phases:
        return {"available": False, "reason": "no unflagged residual bandpass solutions"}
    return {"available": True, "blocks": int(len(edges) - 1),
            "phase_rms_deg": round(float(np.degrees(np.sqrt(np.mean(np.square(phases))))), 3),
            "amp_rms": round(float(np.sqrt(np.mean(np.square(amps)))), 5),
            "noise_phase_rms_deg": (round(float(np.degrees(np.sqrt(np.mean(np.square(noise))))), 3)
                                    if noise else None)}


def field_calset(name: str, g_path: Path, bandpass_set: CalSet, refant: str, mid_mjd: float,
                 dec_deg: float, g_validity_h: float, params: dict[str, Any]) -> CalSet:
    """The set a field solve applies: the bandpass set's K and BP plus the new field G.

    Only the G belongs to the field solution; :func:`registered_part` is what the registry
    keeps, so a field solution never extends a bandpass's validity."""
    half = g_validity_h / 24.0
    tables = tuple(t for t in bandpass_set.applied_tables() if t.kind in BANDPASS_KINDS) + (
        CalTable("G", g_path, mid_mjd - half, mid_mjd + half),)
    return CalSet(name=name, tables=tables, refant=refant, calibrator=FIELD_CALIBRATOR,
                  mid_mjd=mid_mjd, dec_deg=dec_deg, params=params, qa={})


def registered_part(calset: CalSet) -> CalSet:
    """What the registry stores of a set: of a field solution that borrowed its K and BP, its
    own gain table only (so it never extends the bandpass's validity)."""
    if calset.calibrator != FIELD_CALIBRATOR or not calset.params.get("bandpass_set"):
        return calset
    return CalSet(calset.name, tuple(t for t in calset.tables if t.kind not in BANDPASS_KINDS),
                  calset.refant, calset.calibrator, calset.mid_mjd, calset.dec_deg,
                  calset.params, calset.qa)
