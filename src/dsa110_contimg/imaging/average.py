"""The imaging copy: the calibrated column with channels averaged within the smearing budget.

tclean's cost is gridding and degridding every visibility once per major cycle, so it scales
with rows x channels. ``mstransform`` writes, in one pass, a copy that holds only what imaging
needs: the chosen column as DATA, ``chanbin`` channels averaged into one (``plan.chanbin``,
chosen in ``params.choose_chanbin`` so the extra bandwidth smearing at the image edge stays
below ``CONTIMG_IMG_MAX_SMEARING_LOSS``), and no fully flagged rows (autocorrelations, dead
antennas: a third of a DSA-110 group). The copy lives in the stage's staging directory and
goes with it.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from ..errors import StageError

log = structlog.get_logger(__name__)


def make_imaging_copy(ms_path: Path, out: Path, datacolumn: str, chanbin: int,
                      expect_channels: int) -> Path:
    """Write ``out`` and check it has rows and ``expect_channels`` channels in all."""
    import casatasks
    import casatools

    try:
        ok = casatasks.mstransform(vis=str(ms_path), outputvis=str(out), datacolumn=datacolumn,
                                   chanaverage=chanbin > 1, chanbin=chanbin, keepflags=False)
    except Exception as exc:  # CASA raises bare RuntimeErrors
        raise StageError(f"mstransform of {ms_path} failed: {exc}") from exc
    if ok is False or not (out / "table.dat").exists():
        raise StageError(f"mstransform did not write {out}")
    tb = casatools.table()
    tb.open(str(out))
    try:
        rows = int(tb.nrows())
    finally:
        tb.close()
    tb.open(str(out / "SPECTRAL_WINDOW"))
    try:
        nchan = int(sum(tb.getcol("NUM_CHAN")))
    finally:
        tb.close()
    if rows == 0 or nchan != expect_channels:
        raise StageError(f"imaging copy {out} has {rows} rows and {nchan} channels "
                         f"(expected rows and {expect_channels} channels)")
    log.info("imaging.copy", ms=str(out), rows=rows, channels=nchan, chanbin=chanbin)
    return out
