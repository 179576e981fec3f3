"""applycal of a calibration set to a group's MS (DATA -> CORRECTED_DATA).

Interpolation: K is one solution per antenna ('nearest'); BP is 'nearest' in time and
'linear' in frequency; G is 'linear' in time on the group it was solved on (solutions at
every integration) and 'nearest' on any other group, whose times lie outside the solutions
(CASA would otherwise extrapolate a drift). calwt=False: DSA-110 weights are not
system-temperature based, so scaling them by gain amplitudes would only add noise to the
weights the imager uses.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from ..errors import StageError
from .calset import CalSet
from .casarun import open_table, run_task

log = structlog.get_logger(__name__)


def interp_for(kind: str, same_group: bool) -> str:
    if kind == "BP":
        return "nearest,linear"
    if kind == "G":
        return "linear" if same_group else "nearest"
    return "nearest"


def applycal_args(ms: Path, calset: CalSet, same_group: bool) -> dict:
    """The applycal call for ``calset`` (built apart from running it, so tests can read it)."""
    tables = calset.applied_tables()
    if not tables or not any(t.kind == "G" for t in tables):
        raise StageError(f"calibration set {calset.name} has no gain (G) table to apply")
    calset.require_intact(tables)
    return {"vis": str(ms), "gaintable": [str(t.path) for t in tables],
            "interp": [interp_for(t.kind, same_group) for t in tables],
            "calwt": [False] * len(tables), "applymode": "calflag", "flagbackup": False}


def apply_calset(ms: Path, calset: CalSet, same_group: bool) -> float:
    """Write CORRECTED_DATA; return the seconds it took. Checks the column exists after."""
    t0 = time.perf_counter()
    run_task("applycal", **applycal_args(ms, calset, same_group))
    with open_table(ms) as tb:
        if "CORRECTED_DATA" not in tb.colnames():
            raise StageError(f"applycal of {calset.name} left no CORRECTED_DATA in {ms}")
    took = time.perf_counter() - t0
    log.info("applied", ms=str(ms), calset=calset.name, same_group=same_group,
             duration_s=round(took, 2))
    return took
