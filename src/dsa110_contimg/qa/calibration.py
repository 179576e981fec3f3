"""Calibration QA gate: are the solutions sane, and did applycal leave sane CORRECTED_DATA?

Cheap by construction: it reads the caltables (kilobytes to a few MB) and one integration of
the MS (the middle one, as a row range; every 8th channel of a full band), never the whole
visibility set. Failures block the group; the per-antenna phase scatter only warns (a noisy
antenna is worth an alert, not a lost group).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration.calset import CalSet
from ..calibration.casarun import open_table
from ..calibration.solve import CalSolutions, read_caltable
from ..errors import BadInputError
from .options import CalQAThresholds
from .result import GateBuilder, QAResult

GATE = "calibration"
_MIN_GOOD_FRACTION = 0.5  # an antenna "has solutions" when at least half of them are unflagged
_TIME_TOL_S = 0.01  # rows within this of an integration's centre belong to it
# CORRECTED_DATA check: about this many channels, evenly strided across the band (768 ->
# every 8th; narrower bands are read whole). A band-wide or per-subband (48 channel) applycal
# fault is always seen; one confined to single channels may not be.
_SAMPLED_CHANNELS = 96


def _live_names(calset: CalSet) -> list[str] | None:
    for params in (calset.params, calset.params.get("g_params") or {}):
        if params.get("live_antennas"):
            return [str(a) for a in params["live_antennas"]]
    return None


def _rows_for(sol: CalSolutions, live: list[str] | None) -> np.ndarray:
    names = np.array([sol.antenna_names[a] if a < len(sol.antenna_names) else "" for a in sol.antenna])
    if live is None:  # antennas CASA could solve for at all: not every row flagged
        good = {n for n in set(names) if n and not sol.flag[:, :, names == n].all()}
        return np.isin(names, list(good))
    return np.isin(names, live)


def solution_metrics(calset: CalSet) -> dict[str, Any]:
    """Statistics of the applied tables over the antennas that had data."""
    live = _live_names(calset)
    m: dict[str, Any] = {"set": calset.name, "refant": calset.refant, "flagged_fraction": {},
                         "median_snr": {}}
    good_by_kind: dict[str, set[str]] = {}
    n_live = len(live) if live is not None else None
    for t in calset.applied_tables():
        sol = read_caltable(t.path)
        rows = _rows_for(sol, live)
        names = np.array([sol.antenna_names[a] for a in sol.antenna[rows]])
        flag = sol.flag[:, :, rows]
        vals = sol.values[:, :, rows]
        snr = sol.snr[:, :, rows]
        m["flagged_fraction"][t.kind] = float(flag.mean()) if flag.size else 1.0
        good_snr = snr[~flag]
        if good_snr.size and not np.any(good_snr):
            m["median_snr"][t.kind] = None  # CASA leaves SNR at 0 for delay (K) solutions
        else:
            m["median_snr"][t.kind] = float(np.median(good_snr)) if good_snr.size else 0.0
        good_by_kind[t.kind] = {n for n in set(names)
                                if (~flag[:, :, names == n]).mean() >= _MIN_GOOD_FRACTION}
        if n_live is None:
            n_live = len(set(names))
        if t.kind == "K":
            d = vals[~flag]
            m["delay_ns_min"] = float(d.min()) if d.size else None
            m["delay_ns_max"] = float(d.max()) if d.size else None
            m["delay_ns_abs_max"] = float(np.abs(d).max()) if d.size else None
        elif t.kind in ("G", "BP"):
            amp = np.abs(vals[~flag])
            key = "gain" if t.kind == "G" else "bandpass"
            if amp.size:
                med = float(np.median(amp))
                m[f"{key}_amp_min"], m[f"{key}_amp_max"] = float(amp.min()), float(amp.max())
                m[f"{key}_amp_median"] = med
                m[f"{key}_amp_scatter"] = float(np.std(amp) / med) if med > 0 else float("inf")
            if t.kind == "G":
                m["phase_scatter_deg"] = _phase_scatter(sol, rows, names)
    solved = set.intersection(*good_by_kind.values()) if good_by_kind else set()
    m["n_antennas_live"] = int(n_live or 0)
    m["n_antennas_solved"] = len(solved)
    m["antenna_coverage"] = len(solved) / n_live if n_live else 0.0
    m["antennas_unsolved"] = sorted(set(live or []) - solved, key=lambda x: (len(x), x))
    return m


def _phase_scatter(sol: CalSolutions, rows: np.ndarray, names: np.ndarray) -> dict[str, float]:
    """Per antenna: circular std (deg) in time of the gain phase, worst polarisation."""
    out: dict[str, float] = {}
    vals, flag = sol.values[:, 0, rows], sol.flag[:, 0, rows]  # (npol, nrow)
    for n in sorted(set(names), key=lambda x: (len(x), x)):
        sel = names == n
        worst = 0.0
        for p in range(vals.shape[0]):
            v = vals[p, sel][~flag[p, sel]]
            if v.size < 2:
                continue
            r = np.abs(np.mean(v / np.maximum(np.abs(v), 1e-30)))
            worst = max(worst, float(np.degrees(np.sqrt(max(0.0, -2.0 * np.log(max(r, 1e-12)))))))
        out[n] = round(worst, 3)
    return out


def _middle_integration(times: np.ndarray) -> tuple[float, slice | None]:
    """Centre of the middle integration, and its rows when they are contiguous.

    An MS written in time order (ours always is) holds each integration as one row block,
    which a row-range read fetches directly; ``None`` means the caller must select by query.
    """
    unique = np.unique(times)
    mid = float(unique[len(unique) // 2])
    rows = np.flatnonzero(np.abs(times - mid) < _TIME_TOL_S)
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return mid, slice(int(rows[0]), int(rows[-1]) + 1)
    return mid, None


def _channel_stride(tb: Any, row: int) -> int:
    """Read every n-th channel so a full band costs ~_SAMPLED_CHANNELS, a narrow one all."""
    shape = [int(x) for x in tb.getcolshapestring("CORRECTED_DATA", row, 1)[0].strip("[]").split(",")]
    return max(1, shape[-1] // _SAMPLED_CHANNELS)


def _read_cross(tb: Any, start: int, nrow: int, stride: int) -> tuple[np.ndarray, ...]:
    """DATA, CORRECTED_DATA, FLAG of rows [start, start+nrow), cross-correlations only."""
    a1 = tb.getcol("ANTENNA1", start, nrow)
    cross = a1 != tb.getcol("ANTENNA2", start, nrow)

    def read(col: str) -> np.ndarray:
        return tb.getcolslice(col, [0, 0], [-1, -1], [1, stride], start, nrow)[..., cross]

    return read("DATA"), read("CORRECTED_DATA"), read("FLAG")


def _read_middle(tb: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(DATA, CORRECTED_DATA, FLAG, channel stride) of the middle integration's
    cross-correlations; None for an MS without rows."""
    if tb.nrows() == 0:
        return None
    mid, rows = _middle_integration(tb.getcol("TIME"))
    if rows is not None:
        stride = _channel_stride(tb, rows.start)
        return (*_read_cross(tb, rows.start, rows.stop - rows.start, stride), stride)
    # not time-ordered: let TaQL find the rows (slower, but never wrong)
    sub = tb.query(f"TIME > {mid - _TIME_TOL_S} && TIME < {mid + _TIME_TOL_S} "
                   "&& ANTENNA1 != ANTENNA2")
    try:
        if sub.nrows() == 0:
            return None
        stride = _channel_stride(sub, 0)
        return (*_read_cross(sub, 0, sub.nrows(), stride), stride)
    finally:
        sub.close()


def corrected_metrics(ms: Path) -> dict[str, Any]:
    """CORRECTED_DATA of the middle integration: finite, non-zero, median |CORRECTED|/|DATA|.

    A row-range read of one integration with a channel stride: ~20 MB of arrays instead of
    ~180 MB for a full group (the tiles hold every channel, so CASA still decodes them, but
    the copies and the numpy work shrink), keeping the gate a few % of an apply-only stage.
    """
    m: dict[str, Any] = {}
    with open_table(ms) as tb:
        if "CORRECTED_DATA" not in tb.colnames():
            m["has_corrected"] = False
            return m
        m["has_corrected"] = True
        read = _read_middle(tb)
    if read is None:
        m["sampled_visibilities"] = 0
        m["corrected_finite_fraction"] = None
        return m
    data, corr, flag, m["sampled_channel_stride"] = read
    ok = ~flag
    m["sampled_visibilities"] = int(ok.sum())
    if not ok.any():
        m["corrected_finite_fraction"] = None
        return m
    c, d = corr[ok], data[ok]
    finite = np.isfinite(c)
    m["corrected_finite_fraction"] = float(finite.mean())
    nz = finite & (c != 0)
    m["corrected_nonzero_fraction"] = float(nz.mean())
    use = nz & (d != 0) & np.isfinite(d)
    m["corrected_ratio_median"] = float(np.median(np.abs(c[use]) / np.abs(d[use]))) if use.any() else None
    return m


def _field_checks(g: GateBuilder, params: dict[str, Any], th: CalQAThresholds) -> None:
    """A field solution: enough model flux, and a bandpass in force that fits this group."""
    model = params.get("field_model") or {}
    flux = float(model.get("model_apparent_jy") or 0.0)
    g.metrics["field_model_apparent_jy"] = flux
    g.metrics["field_model_sources"] = model.get("n_sources")
    g.metrics["model_scale_ratio"] = params.get("model_scale_ratio")
    g.fail_if(flux < th.min_field_model_jy,
              f"field model {flux:.3f} Jy through the beam < {th.min_field_model_jy} Jy")
    ratios = [r for r in (params.get("model_scale_ratio") or []) if r]
    off = [r for r in ratios if abs(np.log(r)) > np.log(1.0 + th.max_model_scale_deviation)]
    g.warn_if(bool(off), f"the field model's flux scale is {ratios} x the calibrator's (more "
                         f"than {th.max_model_scale_deviation:.0%} off): a wrong beam model, "
                         "catalogue or pointing?")
    if params.get("bandpass_checked_by"):
        g.metrics["bandpass_checked_by"] = params["bandpass_checked_by"]
    res = params.get("bandpass_residual")
    if res is None:
        return  # not asked for, checked by a recent field solution, or solved on the field
    if not res.get("available"):
        g.warn_if(True, f"the bandpass in force could not be checked: {res.get('reason')}")
        return
    g.metrics["bp_residual_phase_rms_deg"] = res["phase_rms_deg"]
    g.metrics["bp_residual_amp_rms"] = res["amp_rms"]
    noise = res.get("noise_phase_rms_deg") or 0.0
    g.metrics["bp_residual_noise_deg"] = noise
    if noise > th.max_bp_residual_phase_deg:
        # a faint field: per-block noise above the error the check is there to find, and the
        # solver's SNR (hence this noise) is optimistic at low SNR: the check cannot tell a
        # wrong bandpass from noise. Say so; a later field solution checks it (the registry
        # does not count this one as a check).
        g.warn_if(True, f"the bandpass in force could not be checked on this field: residual "
                        f"noise {noise:.1f} deg per block > {th.max_bp_residual_phase_deg} deg")
        return
    phase_limit = max(th.max_bp_residual_phase_deg, 3.0 * noise)
    amp_limit = max(th.max_bp_residual_amp, 3.0 * np.radians(noise))
    g.fail_if(res["phase_rms_deg"] > phase_limit,
              f"the bandpass in force does not fit: residual phase {res['phase_rms_deg']:.1f} deg "
              f"rms > {phase_limit:.1f} deg (bandpass set {params.get('bandpass_set')})")
    g.fail_if(res["amp_rms"] > amp_limit,
              f"the bandpass in force does not fit: residual amplitude {res['amp_rms']:.1%} rms "
              f"> {amp_limit:.1%} (bandpass set {params.get('bandpass_set')})")


def check_calibration_quality(calset: CalSet | None, ms: Path,
                              thresholds: CalQAThresholds) -> QAResult:
    """The calibration gate: solution statistics of ``calset`` and the CORRECTED_DATA of ``ms``."""
    t0 = time.perf_counter()
    th = thresholds
    g = GateBuilder(GATE)
    if calset is None:
        g.fail_if(True, "no calibration set was applied")
        return g.result(time.perf_counter() - t0)
    try:
        sm = solution_metrics(calset)
    except BadInputError as exc:
        g.fail_if(True, f"calibration table unreadable: {exc}")
        return g.result(time.perf_counter() - t0)
    g.metrics.update(sm)
    worst_flag = max(sm["flagged_fraction"].values(), default=1.0)
    g.metrics["flagged_fraction_max"] = worst_flag
    g.fail_if(worst_flag > th.max_flagged_solution_fraction,
              f"{worst_flag:.0%} of solutions flagged (> {th.max_flagged_solution_fraction:.0%})")
    snr = min((v for v in sm["median_snr"].values() if v is not None), default=0.0)
    g.metrics["median_snr_min"] = snr
    g.fail_if(snr < th.min_median_snr, f"median solution SNR {snr:.1f} < {th.min_median_snr}")
    scatter = sm.get("gain_amp_scatter")
    g.fail_if(scatter is None or not np.isfinite(scatter) or scatter > th.max_amp_scatter,
              f"gain amplitude scatter {scatter} > {th.max_amp_scatter}")
    g.fail_if(sm.get("gain_amp_min", 0.0) <= 0.0, "a gain amplitude is zero")
    dmax = sm.get("delay_ns_abs_max")
    g.fail_if(dmax is not None and dmax > th.max_delay_ns,
              f"delay {dmax:.1f} ns exceeds {th.max_delay_ns} ns")
    g.fail_if(sm["antenna_coverage"] < th.min_antenna_fraction,
              f"only {sm['n_antennas_solved']}/{sm['n_antennas_live']} antennas have solutions "
              f"(< {th.min_antenna_fraction:.0%})")
    noisy = {a: s for a, s in (sm.get("phase_scatter_deg") or {}).items()
             if s > th.max_phase_scatter_deg}
    g.warn_if(bool(noisy), f"gain phase scatters > {th.max_phase_scatter_deg} deg on {sorted(noisy)}")

    if calset.params.get("mode") == "field":
        _field_checks(g, calset.params, th)

    cm = corrected_metrics(Path(ms))
    g.metrics.update(cm)
    if not cm.get("has_corrected"):
        g.fail_if(True, "MS has no CORRECTED_DATA")
    elif cm.get("corrected_finite_fraction") is None:
        g.fail_if(True, "no unflagged visibilities in the sampled integration")
    else:
        g.fail_if(cm["corrected_finite_fraction"] < 1.0,
                  f"{1 - cm['corrected_finite_fraction']:.2%} of CORRECTED_DATA is NaN/Inf")
        g.fail_if(cm["corrected_nonzero_fraction"] == 0.0, "CORRECTED_DATA is all zero")
        ratio = cm.get("corrected_ratio_median")
        g.fail_if(ratio is None or not (th.corrected_ratio_min <= ratio <= th.corrected_ratio_max),
                  f"median |CORRECTED|/|DATA| = {ratio} outside "
                  f"[{th.corrected_ratio_min}, {th.corrected_ratio_max}]")
    took = time.perf_counter() - t0
    g.metrics["qa_duration_s"] = took
    return g.result(took)
