"""RFI and bad-data flagging with casatasks ``flagdata``, with few passes over the data.

Zeros, autocorrelations and shadowing run as one ``flagdata(mode='list')`` call: CASA streams
each chunk through the agents in order, and a ``summary`` agent after each step reports the
cumulative flagged fraction. tfcrop and rflag are the expensive steps (at full size ~70 s and
~90 s each at full resolution on this machine); they look at channels averaged in groups of
``flag_chanbin`` (default 4, ~1 MHz), which makes them ~3x cheaper, and the flags they raise
are extended back to every channel of the group. CASA refuses to combine averaging with any
agent but another averaging one, so the two share one pass of their own (55-61 s at full
size, against 75-76 s as two passes), followed by a summary pass. That pass reports the flags
after both: the report then has no separate ``tfcrop`` step. ``flag_chanbin=1`` puts
everything back into a single full-resolution pass, with every step reported.

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

import structlog

from ..errors import BadInputError
from ..products import CONVERSION_RECORD
from .casarun import open_table, run_task
from .options import CalibrationOptions

log = structlog.get_logger(__name__)

PREFLAG_VERSION = "contimg_preflag"
MARKER = "contimg_flags.json"
STEPS: tuple[str, ...] = ("start", "zeros", "autocorr", "shadow", "tfcrop", "rflag")
# With averaging, tfcrop and rflag run in one pass: one summary, after both.
AVERAGED_STEPS: tuple[str, ...] = tuple(s for s in STEPS if s != "tfcrop")


@dataclass(frozen=True)
class FlagReport:
    fractions: dict[str, float]          # cumulative flagged fraction after each step
    antenna_fractions: dict[str, float]  # per antenna name, after the last step
    duration_s: float

    @property
    def final(self) -> float:
        return self.fractions[STEPS[-1]]


def flag_steps(options: CalibrationOptions) -> tuple[str, ...]:
    """The steps a flagging pass with these options reports, in order."""
    return AVERAGED_STEPS if options.flag_chanbin > 1 else STEPS


def _summary(name: str) -> str:
    return f"mode='summary' name='{name}'"


def flag_calls(options: CalibrationOptions, clip_zeros: bool = True) -> list[list[str]]:
    """The flagdata command lists, one per call (built apart from running them, for tests).

    ``clip_zeros`` False leaves out the clip agent (a pass over DATA) when the conversion
    stage has flagged exact zeros already, and its summary: with nothing between them,
    'zeros' is 'start' (``flag_ms`` reports it so). A summary agent costs ~1.5 s at full size.
    """
    o = options
    avg = f" channelavg=True chanbin={o.flag_chanbin}" if o.flag_chanbin > 1 else ""
    rfi = {
        "tfcrop": (f"mode='tfcrop' datacolumn='DATA' timecutoff={o.flag_tfcrop_timecutoff} "
                   f"freqcutoff={o.flag_tfcrop_freqcutoff}{avg}"),
        "rflag": (f"mode='rflag' datacolumn='DATA' timedevscale={o.flag_rflag_timedevscale} "
                  f"freqdevscale={o.flag_rflag_freqdevscale}{avg}"),
    }
    if not o.flag_rflag:
        rfi["rflag"] = ""
    first = [_summary("start")] + (["mode='clip' clipzeros=True", _summary("zeros")]
                                   if clip_zeros else []) + [
             "mode='manual' autocorr=True", _summary("autocorr"),
             "mode='shadow' tolerance=0.0", _summary("shadow")]
    if not avg:
        for step in ("tfcrop", "rflag"):
            first += ([rfi[step]] if rfi[step] else []) + [_summary(step)]
        return [first]
    return [first, [c for c in rfi.values() if c], [_summary("rflag")]]


def _fraction(report: dict) -> float:
    total = float(report.get("total", 0.0))
    return float(report.get("flagged", 0.0)) / total if total else 1.0


def _reports(out: object) -> dict[str, dict]:
    """flagdata's return value as {summary name: report}, whether one summary or several."""
    if not isinstance(out, dict):
        return {}
    if "flagged" in out and "total" in out:
        return {str(out.get("name", "")): out}
    return {str(r.get("name")): r for r in out.values() if isinstance(r, dict) and "total" in r}


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
    """Flag zeros, autocorrelations, shadowing, then tfcrop and rflag; report each step.

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
    reports: dict[str, dict] = {}
    for cmds in flag_calls(options, clip_zeros=clip):
        out = run_task("flagdata", vis=str(ms), mode="list", inpfile=cmds, flagbackup=False)
        reports.update(_reports(out))
    if not clip and "start" in reports:
        reports["zeros"] = reports["start"]
    steps = flag_steps(options)
    missing = [s for s in steps if s not in reports]
    if missing:
        raise BadInputError(f"flagdata summaries missing for {missing} (is the MS readable?)",
                            path=str(ms))
    fractions = {s: round(_fraction(reports[s]), 6) for s in steps}
    ants = {str(a): _fraction(v) for a, v in reports[steps[-1]].get("antenna", {}).items()}
    report = FlagReport(fractions, ants, time.perf_counter() - t0)
    log.info("flagged", ms=str(ms), fractions=fractions, restored_preflag=restored,
             zeros_flagged_at_conversion=not clip,
             chanbin=options.flag_chanbin, duration_s=round(report.duration_s, 2))
    if report.final >= 1.0 - 1e-9:
        raise BadInputError(f"all data flagged after flagging ({fractions})", path=str(ms))
    tmp = ms / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"digest": _flag_digest(options), "fractions": fractions,
                               "antenna_fractions": ants}))
    tmp.replace(ms / MARKER)
    return report
