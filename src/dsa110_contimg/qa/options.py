"""QA thresholds, one slice per gate (``CONTIMG_QA_MS_*``, ``_CAL_*``, ``_IMG_*``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configbase import setting


@dataclass(frozen=True)
class MSQAThresholds:
    max_nonfinite_fraction: float = setting("CONTIMG_QA_MS_MAX_NONFINITE_FRACTION", 0.0, "Fail when more than this fraction of visibilities is NaN/Inf", minimum=0, maximum=1)
    max_zero_fraction: float = setting("CONTIMG_QA_MS_MAX_ZERO_FRACTION", 0.5, "Fail when more than this fraction of cross-correlations is exactly zero", minimum=0, maximum=1)
    warn_zero_fraction: float = setting("CONTIMG_QA_MS_WARN_ZERO_FRACTION", 0.1, "Warn above this fraction of zeros", minimum=0, maximum=1)
    max_flagged_fraction: float = setting("CONTIMG_QA_MS_MAX_FLAGGED_FRACTION", 0.9, "Fail when more than this fraction is flagged", minimum=0, maximum=1)
    warn_flagged_fraction: float = setting("CONTIMG_QA_MS_WARN_FLAGGED_FRACTION", 0.3, "Warn above this flagged fraction", minimum=0, maximum=1)
    max_uvw_error_m: float = setting("CONTIMG_QA_MS_MAX_UVW_ERROR_M", 1.0, "Fail when |UVW| differs from the antenna-position baseline length by more than this", minimum=0)
    max_phase_center_offset_deg: float = setting("CONTIMG_QA_MS_MAX_PHASE_CENTER_OFFSET_DEG", 0.1, "Fail when the phase centre is this far from where it is expected", minimum=0)
    min_antennas: int = setting("CONTIMG_QA_MS_MIN_ANTENNAS", 4, "Fail with fewer antennas carrying data", minimum=2)
    warn_dead_fraction: float = setting("CONTIMG_QA_MS_WARN_DEAD_FRACTION", 0.25, "Warn when more than this fraction of the antennas in the MS are dead (all-zero data)", minimum=0, maximum=1)
    sample_integrations: int = setting("CONTIMG_QA_MS_SAMPLE_INTEGRATIONS", 1, "Integrations (spread over the group; one = the middle) whose visibilities the MS gate reads. FLAG, which carries the zeros and NaNs the conversion found, is read for every integration", minimum=1)
    sample_channels: int = setting("CONTIMG_QA_MS_SAMPLE_CHANNELS", 192, "Channels of each sampled integration the MS gate reads (evenly strided; 0 = all): enough to see a dead subband", minimum=0)


@dataclass(frozen=True)
class CalQAThresholds:
    max_flagged_solution_fraction: float = setting("CONTIMG_QA_CAL_MAX_FLAGGED_FRACTION", 0.3, "Fail when more than this fraction of solutions is flagged", minimum=0, maximum=1)
    min_median_snr: float = setting("CONTIMG_QA_CAL_MIN_SNR", 5.0, "Fail when the median solution SNR is below this", minimum=0)
    max_amp_scatter: float = setting("CONTIMG_QA_CAL_MAX_AMP_SCATTER", 0.5, "Fail when gain amplitudes scatter (std/median) more than this", minimum=0)
    max_phase_scatter_deg: float = setting("CONTIMG_QA_CAL_MAX_PHASE_SCATTER_DEG", 60.0, "Warn when an antenna's gain phase scatters more than this in time", minimum=0)
    max_delay_ns: float = setting("CONTIMG_QA_CAL_MAX_DELAY_NS", 100.0, "Fail when a solved delay exceeds this", minimum=0)
    min_antenna_fraction: float = setting("CONTIMG_QA_CAL_MIN_ANTENNA_FRACTION", 0.7, "Fail when fewer than this fraction of antennas have good solutions", minimum=0, maximum=1)
    corrected_ratio_min: float = setting("CONTIMG_QA_CAL_CORRECTED_RATIO_MIN", 0.01, "Fail when median |CORRECTED|/|DATA| is below this", minimum=0)
    corrected_ratio_max: float = setting("CONTIMG_QA_CAL_CORRECTED_RATIO_MAX", 100.0, "Fail when median |CORRECTED|/|DATA| is above this", minimum=0)
    max_bp_residual_phase_deg: float = setting("CONTIMG_QA_CAL_MAX_BP_RESIDUAL_PHASE_DEG", 5.0, "Field solutions: fail when the residual bandpass (solved through the applied K, BP and gain, in 8 frequency blocks) has an rms phase above this and above 3x its noise: the bandpass in force does not fit the group", minimum=0)
    max_bp_residual_amp: float = setting("CONTIMG_QA_CAL_MAX_BP_RESIDUAL_AMP", 0.05, "Field solutions: fail when the residual bandpass amplitude deviates (rms) by more than this fraction and more than 3x its noise", minimum=0)
    max_model_scale_deviation: float = setting("CONTIMG_QA_CAL_MAX_MODEL_SCALE_DEVIATION", 0.3, "Field solutions: warn when the field model's own amplitude scale differs from the calibrator's by more than this fraction", minimum=0)
    min_field_model_jy: float = setting("CONTIMG_QA_CAL_MIN_FIELD_MODEL_JY", 0.1, "Field solutions: fail when the field model had less apparent flux than this (Jy)", minimum=0)


@dataclass(frozen=True)
class ImageQAThresholds:
    max_nonfinite_fraction: float = setting("CONTIMG_QA_IMG_MAX_NONFINITE_FRACTION", 0.01, "Fail when more than this fraction of in-beam pixels is NaN/Inf", minimum=0, maximum=1)
    min_dynamic_range: float = setting("CONTIMG_QA_IMG_MIN_DYNAMIC_RANGE", 20.0, "Fail when peak/rms is below this", minimum=0)
    max_rms_jy: float = setting("CONTIMG_QA_IMG_MAX_RMS_JY", 1.0, "Fail when the image rms exceeds this (Jy/beam)", minimum=0)
    max_beam_axis_ratio: float = setting("CONTIMG_QA_IMG_MAX_BEAM_AXIS_RATIO", 10.0, "Fail when bmaj/bmin exceeds this", minimum=1)
    calibrator_flux_tolerance: float = setting("CONTIMG_QA_IMG_CAL_FLUX_TOLERANCE", 0.2, "Warn when the calibrator's flux differs from the catalogue by more than this fraction", minimum=0)
    min_beam_pixels: float = setting("CONTIMG_QA_IMG_MIN_BEAM_PIXELS", 2.0, "Fail when the restoring beam's minor axis spans fewer cells than this (undersampled image)", minimum=1)
    max_residual_mean_sigma: float = setting("CONTIMG_QA_IMG_MAX_RESIDUAL_MEAN_SIGMA", 1.0, "Warn when the in-beam residual mean exceeds this many image rms (uncleaned flux or a negative bowl)", minimum=0)
    warn_fraction_above_5sigma: float = setting("CONTIMG_QA_IMG_WARN_FRACTION_ABOVE_5SIGMA", 0.05, "Warn when more than this fraction of in-beam pixels is above 5 rms (artefacts or a noise underestimate)", minimum=0, maximum=1)
    warn_rms_over_expected: float = setting("CONTIMG_QA_IMG_WARN_RMS_OVER_EXPECTED", 20.0, "Warn when the image rms exceeds this multiple of the expected thermal noise", minimum=1)
