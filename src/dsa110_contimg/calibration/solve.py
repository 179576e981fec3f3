"""Delay (K), bandpass (BP) and gain (G) solves with casatasks, and reading the tables back.

Chain (each solve applies the tables before it on the fly):
  K   gaincal gaintype='K', solint='inf'          per-antenna delay (optional), see below
  Gp  gaincal calmode='p', solint=gain_solint     phase-only, so the bandpass can average time
  BP  bandpass solint='inf', solnorm=True         [K, Gp]
  G   gaincal calmode='ap', solint=gain_solint    [K, BP]
The applied set is K, BP, G; Gp is kept beside them for diagnosis only (applying it with G
would double the phase).

CASA's K solve is not global: it fringe-fits the baselines *to the reference antenna* only.
So K gets no uv-range (a '>100m' cut flags every antenna within 100 m of the refant, and the
flags then propagate through every later table) and reads only the refant chain's baselines
(same solutions from ~1/16 of the rows at full size).

The reference antenna is the first of ``refant_chain`` present in the data and less than
half flagged; when none is, the least-flagged antenna in the data is used and a note says so.
CASA gets the usable chain as a list with refantmode='flex', so an interval in which the
first choice is flagged falls back to the next instead of losing every antenna's solution.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..errors import BadInputError, StageError
from ..products import make_dirs
from .casarun import MJD_S, MSInfo, open_table, run_task
from .options import CalibrationOptions

log = structlog.get_logger(__name__)

REFANT_MAX_FLAGGED = 0.5
SUFFIX = {"K": "K", "Gp": "Gp", "BP": "B", "G": "G"}


@dataclass(frozen=True)
class RefantChoice:
    refant: str
    chain: tuple[str, ...]  # what CASA is given (refant first)
    notes: tuple[str, ...] = ()


def choose_refant(chain: tuple[str, ...], info: MSInfo,
                  antenna_flagged: dict[str, float]) -> RefantChoice:
    """First usable antenna of ``chain``; else fall back to the least-flagged antenna."""
    present = set(info.names_in_data)

    def usable(name: str) -> bool:
        return name in present and antenna_flagged.get(name, 1.0) < REFANT_MAX_FLAGGED

    good = tuple(a for a in chain if usable(a))
    skipped = [f"{a} ({'missing' if a not in present else 'flagged %.0f%%' % (100 * antenna_flagged.get(a, 1.0))})"
               for a in chain if not usable(a)]
    notes: list[str] = []
    if good:
        if skipped:
            notes.append(f"refant chain: skipped {', '.join(skipped)}")
        return RefantChoice(good[0], good, tuple(notes))
    live = sorted((antenna_flagged.get(a, 1.0), a) for a in present)
    live = [(f, a) for f, a in live if f < 1.0]
    if not live:
        raise BadInputError("no antenna has unflagged data to serve as reference", path=str(info.path))
    ref = live[0][1]
    notes.append(f"no antenna of the refant chain {','.join(chain)} is usable "
                 f"({', '.join(skipped)}); fell back to {ref} (least flagged, {100 * live[0][0]:.0f}%)")
    log.warning("refant_fallback", chain=chain, refant=ref, skipped=skipped)
    return RefantChoice(ref, (ref,), tuple(notes))


_UV_MIN = re.compile(r"^\s*>\s*([0-9.]+)\s*(m|km)\s*$", re.IGNORECASE)
MIN_BASELINES_PER_ANTENNA = 4  # CASA's minblperant default
UVRANGE_MIN_ANTENNA_FRACTION = 0.9


def effective_uvrange(uvrange: str, ms: Path, live: tuple[int, ...]) -> tuple[str, str | None]:
    """The uv-range to solve with, and a note when the configured one had to be dropped.

    A lower uv cut ('>100m', '>0.2km') suits the full array but starves a compact one: when
    fewer than 90 % of the antennas with data keep ``minblperant`` baselines beyond it, the
    solves would flag (or fail on) the rest, so the cut is dropped and the note says so.
    Other uv-range forms are passed to CASA unchecked.
    """
    m = _UV_MIN.match(uvrange or "")
    if not m or not live:
        return uvrange, None
    cut = float(m.group(1)) * (1000.0 if m.group(2).lower() == "km" else 1.0)
    with open_table(ms) as tb:
        a1, a2 = tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
        length = np.sqrt((tb.getcol("UVW")[:2] ** 2).sum(axis=0))
    live_set = np.asarray(live, dtype=int)
    keep = (length > cut) & np.isin(a1, live_set) & np.isin(a2, live_set) & (a1 != a2)
    pairs = set(zip(a1[keep].tolist(), a2[keep].tolist(), strict=True))
    count = {a: 0 for a in live}
    for p, q in pairs:
        count[p] += 1
        count[q] += 1
    ok = sum(1 for c in count.values() if c >= MIN_BASELINES_PER_ANTENNA)
    if ok >= UVRANGE_MIN_ANTENNA_FRACTION * len(live):
        return uvrange, None
    note = (f"uv-range {uvrange!r} leaves only {ok} of {len(live)} antennas with "
            f"{MIN_BASELINES_PER_ANTENNA}+ baselines (array too compact): solved without a uv-range")
    log.warning("uvrange_dropped", uvrange=uvrange, antennas_ok=ok, antennas=len(live))
    return "", note


@dataclass(frozen=True)
class SolveResult:
    tables: dict[str, Path]
    refant: str
    durations: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def table_path(caltable_dir: Path, stem: str, kind: str) -> Path:
    return caltable_dir / f"{stem}.{SUFFIX[kind]}"


def flagged_solution_fraction(sol: CalSolutions, live: tuple[int, ...]) -> float:
    """Flagged fraction among the solutions of antennas that had data (absent ones excluded)."""
    rows = np.isin(sol.antenna, np.asarray(live, dtype=int))
    if not rows.any():
        return 1.0
    return float(sol.flag[:, :, rows].mean())


def _check_table(path: Path, kind: str, live: tuple[int, ...]) -> float:
    """Fraction of flagged solutions; StageError when the solve left nothing usable."""
    if not (path / "table.dat").exists():
        raise StageError(f"{kind} solve produced no table at {path} (see the CASA log)")
    sol = read_caltable(path)
    if sol.flag.size == 0:
        raise StageError(f"{kind} solve produced an empty table {path}")
    frac = flagged_solution_fraction(sol, live)
    if frac >= 1.0:
        raise StageError(f"{kind} solve flagged every solution (calibrator too faint? SNR < min_snr)")
    return frac


def solve_tables(ms: Path, caltable_dir: Path, stem: str, refant: RefantChoice,
                 options: CalibrationOptions, live: tuple[int, ...]) -> SolveResult:
    """Run the K/Gp/BP/G chain on ``ms`` (which holds MODEL_DATA); return the table paths.

    ``live`` are the ANTENNA indices with unflagged data: solution statistics count only them.
    """
    make_dirs(caltable_dir)  # its entry in the product directory must survive a power cut
    uvrange, uv_note = effective_uvrange(options.uvrange, ms, live)
    common = {"vis": str(ms), "refant": ",".join(refant.chain), "minsnr": options.min_snr,
              "uvrange": uvrange}
    paths = {k: table_path(caltable_dir, stem, k) for k in SUFFIX}
    for p in paths.values():
        if p.exists():
            import shutil

            shutil.rmtree(p)
    durations: dict[str, float] = {}
    flagged: dict[str, float] = {}
    pre: list[str] = []

    def timed(kind: str, task: str, **kw: Any) -> None:
        t0 = time.perf_counter()
        if task == "gaincal":
            kw["refantmode"] = "flex"
        run_task(task, caltable=str(paths[kind]), **{**common, **kw})
        durations[kind] = time.perf_counter() - t0
        flagged[kind] = _check_table(paths[kind], kind, live)

    if options.solve_delay:
        timed("K", "gaincal", gaintype="K", solint="inf", combine="scan", uvrange="",
              antenna=",".join(refant.chain), minblperant=1)
        pre = [str(paths["K"])]
    timed("Gp", "gaincal", gaintype="G", calmode="p", solint=options.gain_solint,
          gaintable=pre, interp=["nearest"] * len(pre))
    timed("BP", "bandpass", bandtype="B", solint="inf", combine="scan", solnorm=True,
          gaintable=pre + [str(paths["Gp"])], interp=["nearest"] * len(pre) + ["linear"])
    timed("G", "gaincal", gaintype="G", calmode="ap", solint=options.gain_solint,
          gaintable=pre + [str(paths["BP"])], interp=["nearest"] * len(pre) + ["nearest,linear"])
    tables = {k: p for k, p in paths.items() if k != "K" or options.solve_delay}
    params = {"refant": refant.refant, "refant_chain": list(refant.chain),
              "min_snr": options.min_snr, "uvrange": uvrange,
              "gain_solint": options.gain_solint, "solve_delay": options.solve_delay,
              "flagged_solution_fraction": {k: round(v, 4) for k, v in flagged.items()}}
    log.info("solved", ms=str(ms), refant=refant.refant,
             durations={k: round(v, 2) for k, v in durations.items()}, flagged=params["flagged_solution_fraction"])
    return SolveResult(tables, refant.refant, durations, params, (uv_note,) if uv_note else ())


# ---------------------------------------------------------------- reading tables back
@dataclass(frozen=True)
class CalSolutions:
    """One caltable as arrays: ``values`` (npol, nchan, nrow), complex for B/G, delay ns for K."""

    kind: str            # CASA VisCal type, e.g. 'K Jones', 'B Jones', 'G Jones'
    antenna: np.ndarray  # (nrow,) ANTENNA1 index
    time_mjd: np.ndarray
    values: np.ndarray
    flag: np.ndarray
    snr: np.ndarray
    antenna_names: tuple[str, ...]
    freqs_hz: np.ndarray  # channel frequencies of the (single) spw in the table
    ref_freq_hz: float


def read_caltable(path: Path | str) -> CalSolutions:
    path = Path(path)
    with open_table(path) as tb:
        kind = str(tb.getkeyword("VisCal"))
        cols = tb.colnames()
        vcol = "CPARAM" if "CPARAM" in cols else "FPARAM"
        n = int(tb.nrows())
        if n == 0:
            empty = np.zeros((0,))
            return CalSolutions(kind, empty.astype(int), empty, np.zeros((0, 0, 0)),
                                np.zeros((0, 0, 0), bool), np.zeros((0, 0, 0)), (), empty, 0.0)
        ant = tb.getcol("ANTENNA1")
        t = tb.getcol("TIME") / MJD_S
        values = tb.getcol(vcol)
        flag = tb.getcol("FLAG")
        snr = tb.getcol("SNR")
    with open_table(path / "ANTENNA") as tb:
        names = tuple(str(x) for x in tb.getcol("NAME"))
    with open_table(path / "SPECTRAL_WINDOW") as tb:
        freqs = np.asarray(tb.getcell("CHAN_FREQ", 0), dtype=float)
        ref = float(tb.getcell("REF_FREQUENCY", 0))
    return CalSolutions(kind, ant, t, values, flag, snr, names, freqs, ref)


def _per_antenna(sol: CalSolutions, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.flatnonzero(sol.antenna == index)
    rows = rows[np.argsort(sol.time_mjd[rows], kind="stable")]
    return sol.time_mjd[rows], sol.values[:, :, rows], sol.flag[:, :, rows]


def total_gains(tables: dict[str, Path], antenna_indices: list[int], times_mjd: np.ndarray,
                freqs_hz: np.ndarray) -> np.ndarray:
    """The complex gain K*BP*G a set applies, shape (nant, ntime, nchan, npol); NaN if flagged.

    CASA's model is V_obs = g_p conj(g_q) V_model. K is evaluated relative to the K table's
    own channel frequency (the band centre for a single-spw solve), exp(+2 pi i tau (nu - nu0));
    BP is interpolated linearly in frequency, G is taken at the nearest solution time.
    """
    nt, nf = len(times_mjd), len(freqs_hz)
    out = np.ones((len(antenna_indices), nt, nf, 2), dtype=complex)
    for kind in ("K", "BP", "G"):
        if kind not in tables:
            continue
        sol = read_caltable(tables[kind])
        for a_i, ant in enumerate(antenna_indices):
            t, v, f = _per_antenna(sol, ant)
            if t.size == 0:
                out[a_i] = np.nan
                continue
            v = np.where(f, np.nan, v)
            it = np.abs(t[None, :] - np.asarray(times_mjd)[:, None]).argmin(axis=1)  # (nt,)
            if kind == "K":
                nu0 = float(np.mean(sol.freqs_hz))
                tau = v[:, 0, :].T[it] * 1e-9  # (nt, npol)
                g = np.exp(2j * np.pi * (freqs_hz[None, :, None] - nu0) * tau[:, None, :])
            elif kind == "BP":
                # np.interp needs ascending abscissae: a window may list its channels descending
                order = np.argsort(sol.freqs_hz, kind="stable")
                nu = np.asarray(sol.freqs_hz)[order]
                per_t = v.transpose(2, 1, 0)[it][:, order, :]  # (nt, nchan_table, npol)
                g = np.empty((nt, nf, 2), dtype=complex)
                for p in range(per_t.shape[2]):
                    for k in range(nt):
                        re = np.interp(freqs_hz, nu, per_t[k, :, p].real)
                        im = np.interp(freqs_hz, nu, per_t[k, :, p].imag)
                        g[k, :, p] = re + 1j * im
            else:
                g = v[:, 0, :].T[it][:, None, :]  # (nt, 1, npol)
            out[a_i] *= g
    return out
