"""RFI and bad-data flagging with casatasks ``flagdata``, with few passes over the data.

Two ``flagdata(mode='list')`` calls: autocorrelations and shadowing (cheap: they read no
visibilities), then the interference pass: rflag at full resolution by default (the
stage's longest step). Exact zeros are flagged by the conversion; an MS from
elsewhere gets a clip pass first.

Why rflag alone, at full resolution: scored on simulated interference of known footprint
(``contimg simulate --rfi``: persistent single-channel lines at 40 sigma per visibility and a
15-sigma burst over 1/16 of the band for one integration), on a full-size group:

- rflag: every line cell, 99.9 % of the burst cells; nothing flagged on clean data; the cells
  it flags beyond the footprint (~1 %) are the burst's channels in the integrations next to it;
- tfcrop + rflag: the same, ~45 s more;
- tfcrop alone: 82 % of the burst (92 % with a 3-sigma time cut-off, at 0.2 % of clean data);
- both on channels averaged by 4 (the earlier default, ~50 s): 94 % of the lines, 60 % of the
  burst, and 2 % of the clean data.

The settings keep every alternative (``CONTIMG_FLAG_TFCROP``, ``CONTIMG_FLAG_CHANBIN``, the
cut-offs); CASA refuses to combine channel averaging with any agent but another averaging one,
so with averaging on the interference agents share a pass of their own.

The report gives the cumulative flagged fraction after each step. It comes from a census of
FLAG taken by TaQL inside casacore (``ntrue(FLAG)`` per row, ~0.5 s at full size), not from
flagdata's ``summary`` agents: each of those cost ~2 s, tallying every antenna, scan, spw and
correlation as it streams the MS, 9 s a group for the four steps. The ``autocorr`` step needs
no census of its own: the agent flags whole autocorrelation rows and nothing else.

The MS's flags as they arrived are saved once as the flag version ``contimg_preflag``; a re-run
(after a crash or a requeue) restores it first, so flagging twice never compounds.

A finished pass leaves ``contimg_flags.json`` inside the MS directory (casacore ignores it; a
re-converted MS is a new directory without it) with the report and the flagging options. A
later call with the same options returns that report without touching the data: a group held
for calibration is flagged once, while it waits, and only applycal remains when a set arrives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from ..errors import BadInputError
from ..products import CONVERSION_RECORD, atomic_write, fsync_tree
from .casarun import open_table, run_task
from .options import CalibrationOptions

log = structlog.get_logger(__name__)

PREFLAG_VERSION = "contimg_preflag"
MARKER = "contimg_flags.json"
STEPS: tuple[str, ...] = ("start", "zeros", "autocorr", "shadow", "rflag")


@dataclass(frozen=True)
class FlagReport:
    fractions: dict[str, float]          # cumulative flagged fraction after each step
    antenna_fractions: dict[str, float]  # per antenna name, after the last step
    duration_s: float

    @property
    def final(self) -> float:
        return self.fractions[STEPS[-1]]


def flag_calls(options: CalibrationOptions, clip_zeros: bool = True) -> list[tuple[str, list[str]]]:
    """(step whose census follows, flagdata commands) per call, built apart from running them.

    ``clip_zeros`` False leaves out the clip pass (a pass over DATA) when the conversion stage
    has flagged exact zeros already: 'zeros' is then 'start' (``flag_ms`` reports it so).
    """
    o = options
    avg = f" channelavg=True chanbin={o.flag_chanbin}" if o.flag_chanbin > 1 else ""
    rfi = []
    if o.flag_tfcrop:
        rfi.append(f"mode='tfcrop' datacolumn='DATA' timecutoff={o.flag_tfcrop_timecutoff} "
                   f"freqcutoff={o.flag_tfcrop_freqcutoff}{avg}")
    if o.flag_rflag:
        rfi.append(f"mode='rflag' datacolumn='DATA' timedevscale={o.flag_rflag_timedevscale} "
                   f"freqdevscale={o.flag_rflag_freqdevscale}{avg}")
    clip = [("zeros", ["mode='clip' clipzeros=True"])] if clip_zeros else []
    return clip + [("shadow", ["mode='manual' autocorr=True", "mode='shadow' tolerance=0.0"])] + (
        [("rflag", rfi)] if rfi else [])


@dataclass(frozen=True)
class Census:
    """FLAG counted per row: flagged values, all values, and the row's two antennas."""
    nflag: np.ndarray
    ncell: np.ndarray
    ant1: np.ndarray
    ant2: np.ndarray

    def fraction(self) -> float:
        total = int(self.ncell.sum())
        return float(self.nflag.sum()) / total if total else 1.0

    def with_autocorr_flagged(self) -> float:
        """The fraction once every autocorrelation row is flagged whole."""
        auto = self.ant1 == self.ant2
        total = int(self.ncell.sum())
        flagged = int(self.nflag[~auto].sum()) + int(self.ncell[auto].sum())
        return flagged / total if total else 1.0

    def per_antenna(self) -> dict[int, float]:
        """Flagged fraction of the rows each antenna is in (its autocorrelation once), as
        flagdata's summary counts it."""
        cross = self.ant1 != self.ant2
        n = int(max(self.ant1.max(), self.ant2.max())) + 1 if self.ant1.size else 0
        flagged = (np.bincount(self.ant1, self.nflag, n)
                   + np.bincount(self.ant2[cross], self.nflag[cross], n))
        total = (np.bincount(self.ant1, self.ncell, n)
                 + np.bincount(self.ant2[cross], self.ncell[cross], n))
        return {a: float(flagged[a] / total[a]) for a in np.flatnonzero(total)}


def census(ms: Path, earlier: Census | None = None) -> Census:
    """Count FLAG per row with TaQL, inside casacore (~0.5 s for a full group). Flagging
    changes only the counts: an ``earlier`` census of the same MS lends its cell sizes and
    antennas."""
    def per_row(expr: str) -> np.ndarray:
        try:
            out = tb.calc(f"[select {expr} from '{path}']")["0"]  # noqa: S608 - our own MS path; quotes refused below
        except (RuntimeError, KeyError) as exc:
            raise BadInputError(f"cannot count flags: {exc}", path=path) from exc
        return np.asarray(out, dtype=np.int64).ravel()

    import casatools

    path = str(ms)
    if "'" in path:
        raise BadInputError("cannot count flags: the path has a quote, which TaQL cannot take",
                            path=path)
    tb = casatools.table()
    nflag = per_row("ntrue(FLAG)")
    if earlier is not None:
        return dataclasses.replace(earlier, nflag=nflag)
    with open_table(ms) as t:
        a1 = np.asarray(t.getcol("ANTENNA1"), dtype=np.int64)
        a2 = np.asarray(t.getcol("ANTENNA2"), dtype=np.int64)
    return Census(nflag, per_row("nelements(FLAG)"), a1, a2)


def _antenna_names(ms: Path) -> list[str]:
    with open_table(ms / "ANTENNA") as t:
        return [str(n) for n in t.getcol("NAME")]


def _zeros_flagged_at_conversion(ms: Path) -> bool:
    """True when the conversion stage's record says it flagged every exact zero."""
    try:
        with open_table(ms) as tb:
            if CONVERSION_RECORD not in tb.keywordnames():
                return False
            return bool(tb.getkeyword(CONVERSION_RECORD).get("zeros_flagged", False))
    except Exception:  # an unreadable record: clip, as for any foreign MS
        return False


def _restore_or_save_preflag(ms: Path) -> bool:
    """Restore the arrival flags if a previous run saved them; else save them. True if restored."""
    versions = run_task("flagmanager", vis=str(ms), mode="list") or {}
    names = {v.get("name") for v in versions.values() if isinstance(v, dict)}
    if PREFLAG_VERSION in names:
        run_task("flagmanager", vis=str(ms), mode="restore", versionname=PREFLAG_VERSION)
        return True
    run_task("flagmanager", vis=str(ms), mode="save", versionname=PREFLAG_VERSION,
             comment="flags as converted, before dsa110-contimg calibration flagging")
    return False


def _flag_digest(options: CalibrationOptions) -> str:
    flag_opts = {k: v for k, v in dataclasses.asdict(options).items() if k.startswith("flag_")}
    return hashlib.sha256(json.dumps(flag_opts, sort_keys=True).encode()).hexdigest()[:16]


def _done_before(ms: Path, options: CalibrationOptions) -> FlagReport | None:
    try:
        doc = json.loads((ms / MARKER).read_text())
        if doc.get("digest") != _flag_digest(options):
            return None
        return FlagReport({k: float(v) for k, v in doc["fractions"].items()},
                          {k: float(v) for k, v in doc["antenna_fractions"].items()}, 0.0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def flag_ms(ms: Path, options: CalibrationOptions) -> FlagReport:
    """Flag zeros, autocorrelations, shadowing, then interference; report each step.

    Raises ``BadInputError`` when nothing is left unflagged (re-running cannot help).
    """
    t0 = time.perf_counter()
    earlier = _done_before(ms, options)  # written only after a pass that left data unflagged
    if earlier is not None:
        log.info("flagging_skipped", ms=str(ms), reason="flagged before with these options",
                 final=earlier.final)
        return earlier
    (ms / MARKER).unlink(missing_ok=True)
    restored = _restore_or_save_preflag(ms)
    clip = not _zeros_flagged_at_conversion(ms)
    before = census(ms)
    fractions = {"start": before.fraction(), "zeros": before.fraction()}
    after = before
    for step, cmds in flag_calls(options, clip_zeros=clip):
        if step == "shadow":  # the autocorr agent flags whole rows: known before it runs
            fractions["autocorr"] = after.with_autocorr_flagged()
        run_task("flagdata", vis=str(ms), mode="list", inpfile=cmds, flagbackup=False)
        after = census(ms, before)
        fractions[step] = after.fraction()
    fractions.setdefault("rflag", fractions["shadow"])  # no interference agent configured
    fractions = {s: round(fractions[s], 6) for s in STEPS}
    names = _antenna_names(ms)
    ants = {names[a] if a < len(names) else str(a): f for a, f in after.per_antenna().items()}
    report = FlagReport(fractions, ants, time.perf_counter() - t0)
    log.info("flagged", ms=str(ms), fractions=fractions, restored_preflag=restored,
             zeros_flagged_at_conversion=not clip,
             chanbin=options.flag_chanbin, duration_s=round(report.duration_s, 2))
    if report.final >= 1.0 - 1e-9:
        raise BadInputError(f"all data flagged after flagging ({fractions})", path=str(ms))
    fsync_tree(ms)  # the marker vouches for the FLAG column written in place
    atomic_write(ms / MARKER, json.dumps({"digest": _flag_digest(options),
                                          "fractions": fractions, "antenna_fractions": ants}))
    return report
