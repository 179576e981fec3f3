"""One executor task per stage: the stage, then its QA gate, in the same worker process.

A gate as a task of its own paid for a fresh worker (and a casatools import) on every group,
often more than the gate itself; here it reuses the stage's process, its imports and its
warm page cache. The pairs are safe: each gate uses the same table library as its stage
(conversion and its gate python-casacore; calibration and its gate casatools).

Only the work moves here: what a verdict means (qa.json, quarantine, the registry, alerts)
is still the scheduler's. A stage's exception propagates unchanged and its gate does not
run. Imports stay inside the functions so a worker loads only its own stage's stack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import BadInputError, CalSetDamaged, StageError, is_no_space

if TYPE_CHECKING:
    from ..calibration.options import CalibrationOptions
    from ..calibration.stage import CalibrationInputs, CalibrationResult
    from ..conversion.convert import ConversionInputs, ConversionResult
    from ..conversion.options import ConversionOptions
    from ..imaging.options import ImagingOptions
    from ..imaging.stage import ImagingInputs, ImagingResult
    from ..qa.options import CalQAThresholds, ImageQAThresholds, MSQAThresholds
    from ..qa.result import QAResult

T = TypeVar("T")


def convert_and_check(inputs: ConversionInputs, options: ConversionOptions,
                      thresholds: MSQAThresholds) -> tuple[ConversionResult, QAResult]:
    """Convert a group, then judge the MS against what the conversion says it wrote."""
    from ..conversion.convert import convert_group
    from ..qa.ms import check_ms_after_conversion

    res = convert_group(replace(inputs, cache_integrations=thresholds.sample_integrations),
                        options)
    expected = {"n_antennas": res.n_antennas, "phase_centre_ra_deg": res.phase_centre_ra_deg,
                "phase_centre_dec_deg": res.phase_centre_dec_deg}
    return res, check_ms_after_conversion(res.ms_path, thresholds, expected)


def calibrate_and_check(inputs: CalibrationInputs, options: CalibrationOptions,
                        thresholds: CalQAThresholds) -> tuple[CalibrationResult, QAResult | None]:
    """Calibrate a group, then judge the set it applied; no verdict (None) when uncalibrated."""
    from ..calibration.stage import calibrate_group
    from ..qa.calibration import check_calibration_quality

    res = _reading_ms(inputs.ms_path, lambda: calibrate_group(inputs, options))
    if res.mode == "uncalibrated":
        return res, None
    return res, check_calibration_quality(res.new_set or inputs.apply_set, inputs.ms_path,
                                          thresholds)


def image_and_check(inputs: ImagingInputs, options: ImagingOptions, thresholds: ImageQAThresholds,
                    calibrator: str | None) -> tuple[ImagingResult, QAResult]:
    """Image a group, then judge the image (with a flux check when it holds a calibrator)."""
    from ..imaging.stage import image_group
    from ..qa.image import check_image_quality

    res = _reading_ms(inputs.ms_path, lambda: image_group(inputs, options))
    return res, check_image_quality(res, thresholds, calibrator)


def _reading_ms(ms: Path, stage: Callable[[], T]) -> T:
    """Run a stage that reads a converted MS. When it fails (CASA raising, as itself or as the
    stage's StageError), look at the MS itself: a table CASA cannot read is bad input (quarantined: retrying cannot mend it, and an operator
    requeue converts it again), anything else stays a failure that may pass (retried)."""
    try:
        return stage()
    except (RuntimeError, StageError) as exc:  # CASA's own, or wrapped by the stage
        if is_no_space(exc) or isinstance(exc, CalSetDamaged):
            raise
        why = ms_unreadable(Path(ms))
        if why is None:
            raise
        raise BadInputError(f"corrupt measurement set: {why} (the stage failed with: {exc})",
                            path=str(ms)) from None


def ms_unreadable(ms: Path) -> str | None:
    """Why casatools cannot read the MS, or None when it can: the main table's first and last
    rows and the subtables every stage needs."""
    import casatools

    tb = casatools.table()
    for sub in ("", "ANTENNA", "SPECTRAL_WINDOW", "FIELD", "DATA_DESCRIPTION"):
        path = f"{ms}/{sub}" if sub else str(ms)
        try:
            tb.open(path, nomodify=True)
        except RuntimeError as exc:
            return f"cannot open {path}: {exc}"
        try:
            n = tb.nrows()
            if n == 0:
                return f"{path} has no rows"
            cols = ("TIME", "DATA", "FLAG") if not sub else (tb.colnames()[0],)
            for col in cols:
                for row in (0, n - 1):
                    tb.getcell(col, row)
        except RuntimeError as exc:
            return f"cannot read {path}: {exc}"
        finally:
            tb.close()
    return None
