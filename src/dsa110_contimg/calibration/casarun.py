"""Run casatasks with one error policy, and read the few MS facts calibration needs.

casatasks either raise or log SEVERE and return quietly; callers therefore judge success by
the outputs (flint's rule) and this module only turns exceptions into ``StageError`` naming
the task, so the scheduler can retry and the operator sees which step broke.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..errors import BadInputError, StageError

log = structlog.get_logger(__name__)

MJD_S = 86400.0


def run_task(name: str, **kwargs: Any) -> Any:
    """Call ``casatasks.<name>(**kwargs)``; any exception becomes a ``StageError``."""
    import casatasks

    task = getattr(casatasks, name)
    t0 = time.perf_counter()
    try:
        out = task(**kwargs)
    except Exception as exc:  # noqa: BLE001 - CASA raises bare RuntimeError/AssertionError
        raise StageError(f"CASA {name} failed: {type(exc).__name__}: {exc}") from exc
    log.debug("casa_task", task=name, duration_s=round(time.perf_counter() - t0, 3))
    return out


@contextmanager
def open_table(path: Path | str, readonly: bool = True) -> Iterator[Any]:
    """A casatools table that is always closed (CASA keeps locks on open tables)."""
    import casatools

    tb = casatools.table()
    if not tb.open(str(path), nomodify=readonly):
        raise BadInputError("cannot open as a CASA table", path=str(path))
    try:
        yield tb
    finally:
        tb.close()


@dataclass(frozen=True)
class MSInfo:
    """What calibration needs to know about an MS, read once (metadata only, no visibilities)."""

    path: Path
    times_mjd: np.ndarray          # unique integration centres (MJD, UTC)
    interval_s: float
    freqs_hz: np.ndarray           # channel centres of the (single) spectral window
    antenna_names: tuple[str, ...]  # by ANTENNA row index ('' for unused rows)
    antennas_in_data: tuple[int, ...]  # row indices that appear in the main table
    phase_centre_deg: tuple[float, float]
    itrf_centre_m: tuple[float, float, float]
    columns: tuple[str, ...]
    nrows: int

    @property
    def names_in_data(self) -> tuple[str, ...]:
        return tuple(self.antenna_names[i] or str(i) for i in self.antennas_in_data)

    @property
    def start_mjd(self) -> float:
        return float(self.times_mjd.min() - self.interval_s / 2 / MJD_S)

    @property
    def end_mjd(self) -> float:
        return float(self.times_mjd.max() + self.interval_s / 2 / MJD_S)

    @property
    def mid_mjd(self) -> float:
        return 0.5 * (self.start_mjd + self.end_mjd)

    def name_of(self, index: int) -> str:
        return self.antenna_names[index] or str(index)


def read_ms_info(ms: Path | str) -> MSInfo:
    """Read times, channels, antennas and the phase centre; BadInputError if it is no MS."""
    ms = Path(ms)
    if not (ms / "table.dat").exists():
        raise BadInputError("not a measurement set (no table.dat)", path=str(ms))
    with open_table(ms) as tb:
        nrows = int(tb.nrows())
        if nrows == 0:
            raise BadInputError("measurement set has no rows", path=str(ms))
        columns = tuple(tb.colnames())
        times = np.unique(tb.getcol("TIME")) / MJD_S
        interval = float(np.median(tb.getcol("INTERVAL")))
        used = np.union1d(np.unique(tb.getcol("ANTENNA1")), np.unique(tb.getcol("ANTENNA2")))
        ddids = np.unique(tb.getcol("DATA_DESC_ID"))
    if len(ddids) != 1:
        raise BadInputError(f"expected one spectral window, found {len(ddids)} data descriptions",
                            path=str(ms))
    with open_table(ms / "SPECTRAL_WINDOW") as tb:
        freqs = np.asarray(tb.getcell("CHAN_FREQ", 0), dtype=float)
    with open_table(ms / "ANTENNA") as tb:
        names = tuple(str(n) for n in tb.getcol("NAME"))
        pos = np.asarray(tb.getcol("POSITION"), dtype=float).T  # (nant, 3) ITRF metres
    with open_table(ms / "FIELD") as tb:
        pdir = np.asarray(tb.getcol("PHASE_DIR"))[:, 0, 0]
    centre = pos[used].mean(axis=0)
    return MSInfo(path=ms, times_mjd=times, interval_s=interval, freqs_hz=freqs,
                  antenna_names=names, antennas_in_data=tuple(int(i) for i in used),
                  phase_centre_deg=(float(np.degrees(pdir[0]) % 360.0), float(np.degrees(pdir[1]))),
                  itrf_centre_m=(float(centre[0]), float(centre[1]), float(centre[2])),
                  columns=columns, nrows=nrows)
