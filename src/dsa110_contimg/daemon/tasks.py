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

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..calibration.options import CalibrationOptions
    from ..calibration.stage import CalibrationInputs, CalibrationResult
    from ..conversion.convert import ConversionInputs, ConversionResult
    from ..conversion.options import ConversionOptions
    from ..imaging.options import ImagingOptions
    from ..imaging.stage import ImagingInputs, ImagingResult
    from ..qa.options import CalQAThresholds, ImageQAThresholds, MSQAThresholds
    from ..qa.result import QAResult


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

    res = calibrate_group(inputs, options)
    if res.mode == "uncalibrated":
        return res, None
    return res, check_calibration_quality(res.new_set or inputs.apply_set, inputs.ms_path,
                                          thresholds)


def image_and_check(inputs: ImagingInputs, options: ImagingOptions, thresholds: ImageQAThresholds,
                    calibrator: str | None) -> tuple[ImagingResult, QAResult]:
    """Image a group, then judge the image (with a flux check when it holds a calibrator)."""
    from ..imaging.stage import image_group
    from ..qa.image import check_image_quality

    res = image_group(inputs, options)
    return res, check_image_quality(res, thresholds, calibrator)
