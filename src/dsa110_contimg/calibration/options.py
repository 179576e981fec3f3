"""Settings slice for the calibration stage."""

from __future__ import annotations

from dataclasses import dataclass

from ..configbase import setting


@dataclass(frozen=True)
class CalibrationOptions:
    solve_delay: bool = setting("CONTIMG_CAL_SOLVE_DELAY", True, "Solve per-antenna delays (K) before the bandpass")
    refant_chain: tuple[str, ...] = setting("CONTIMG_CAL_REFANT", ("24", "25", "26", "10", "1"), "Reference antennas to try in order (names); flagged/missing ones are skipped")
    min_snr: float = setting("CONTIMG_CAL_MIN_SNR", 3.0, "Minimum SNR for a solution to be kept", minimum=0)
    uvrange: str = setting("CONTIMG_CAL_UVRANGE", ">100m", "uv-range used for solves (CASA syntax; empty for all)")
    gain_solint: str = setting("CONTIMG_CAL_GAIN_SOLINT", "int", "Solution interval of the gain (G) solves")
    solve_max_chan_width_hz: float = setting("CONTIMG_CAL_SOLVE_MAX_CHAN_WIDTH_HZ", 1.0e6, "Solve on a copy with channels averaged up to this width (Hz; 0: native): the bandpass keeps this resolution and is interpolated onto the native channels when applied", minimum=0)
    field_catalogue: str = setting("CONTIMG_CAL_FIELD_CATALOGUE", "", "Survey catalogue (CSV: name, ra_deg, dec_deg, flux_jy[, spectral_index, ref_freq_hz]; e.g. an NVSS extract) whose sources join the calibrator in the solve model, so the gains do not absorb the field (empty: calibrator only)")
    field_min_apparent_jy: float = setting("CONTIMG_CAL_FIELD_MIN_APPARENT_JY", 0.005, "Catalogue sources at least this bright through the beam (Jy) join the solve model (about NVSS's completeness limit: on a simulated 1.4 GHz sky, leaving out the 5-20 mJy sources doubled the field solve's gain errors)", minimum=0)
    field_max_sources: int = setting("CONTIMG_CAL_FIELD_MAX_SOURCES", 150, "At most this many of the brightest catalogue sources join the solve model (each costs a pass over the visibilities)", minimum=1)
    flag_tfcrop_timecutoff: float = setting("CONTIMG_FLAG_TFCROP_TIMECUTOFF", 4.0, "tfcrop time cut-off (sigma)", minimum=0)
    flag_tfcrop_freqcutoff: float = setting("CONTIMG_FLAG_TFCROP_FREQCUTOFF", 4.0, "tfcrop frequency cut-off (sigma)", minimum=0)
    flag_rflag_timedevscale: float = setting("CONTIMG_FLAG_RFLAG_TIMEDEVSCALE", 5.0, "rflag timedevscale", minimum=0)
    flag_rflag_freqdevscale: float = setting("CONTIMG_FLAG_RFLAG_FREQDEVSCALE", 5.0, "rflag freqdevscale", minimum=0)
    flag_rflag: bool = setting("CONTIMG_FLAG_RFLAG", True, "Run rflag (sliding-window time and frequency deviations): on simulated interference it found 99.9 % of a 15-sigma broadband burst and every line, and flagged nothing on clean data")
    flag_tfcrop: bool = setting("CONTIMG_FLAG_TFCROP", False, "Also run tfcrop, in the same pass as rflag: it adds nothing rflag does not find on simulated interference, and costs ~45 s more per full-size group")
    flag_chanbin: int = setting("CONTIMG_FLAG_CHANBIN", 1, "tfcrop/rflag look at channels averaged in groups of this many (1: full resolution). Averaging 4 is ~2x cheaper but misses 40 % of a simulated broadband burst and 6 % of the line channels, and flags 2 % of the clean data", minimum=1, maximum=64)
    min_calibrator_flux_jy: float = setting("CONTIMG_CAL_MIN_FLUX_JY", 1.0, "Weakest catalogue calibrator (apparent L-band flux) used for solves", minimum=0)
    calibrator_radius_deg: float = setting("CONTIMG_CAL_SEARCH_RADIUS_DEG", 1.5, "Calibrators within this distance of the group's pointing are used", minimum=0)
    bp_validity_h: float = setting("CONTIMG_CAL_BP_VALIDITY_H", 24.0, "Bandpass validity window (hours either side)", minimum=0)
    bp_max_dec_offset_deg: float = setting("CONTIMG_CAL_BP_MAX_DEC_OFFSET_DEG", 0.0, "A bandpass applies only within this declination offset of the pointing it was solved at (0: any declination). The bandpass is instrumental, so by default the newest valid one is used at any declination; the calibration gate still rejects one that does not fit the group", minimum=0)
    g_validity_h: float = setting("CONTIMG_CAL_G_VALIDITY_H", 1.0, "Gain validity window (hours either side)", minimum=0)
    stale_policy: str = setting("CONTIMG_CAL_STALE_POLICY", "hold", "No valid calibration: hold the group until one is, or image it uncalibrated and mark it", choices=("hold", "uncalibrated"))
    field_solve: bool = setting("CONTIMG_CAL_FIELD_SOLVE", True, "Groups without a calibrator transit solve their gains against a beam-weighted model of their own field from the sky catalogue (newest valid K and bandpass applied); off: apply the gain in force")
    field_min_model_jy: float = setting("CONTIMG_CAL_FIELD_MIN_MODEL_JY", 0.2, "Field solve only when the catalogue model's total apparent flux through the beam is at least this (Jy); fainter fields apply the gain in force, or are held", minimum=0)
    field_radius_deg: float = setting("CONTIMG_CAL_FIELD_RADIUS_DEG", 4.0, "Catalogue sources within this distance of the phase centre are considered for the field model", minimum=0.1)
    field_phase_solint: str = setting("CONTIMG_CAL_FIELD_PHASE_SOLINT", "60s", "Field solve: solution interval of the phase (CASA solint; 'int' = every 12.9 s integration). A minute tracks the gain drift (tens of degrees an hour) while the sources the catalogue lacks, whose fringes turn as the sky drifts, average down (docs/calibration.md)")
    field_amp_solint: str = setting("CONTIMG_CAL_FIELD_AMP_SOLINT", "inf", "Field solve: solution interval of the antenna-relative amplitude (CASA solint); the array's mean amplitude is carried from the last calibrator solution")
    field_check_bandpass: bool = setting("CONTIMG_CAL_FIELD_CHECK_BANDPASS", True, "Field solve: also solve a residual bandpass through K, BP and the new gain, so the calibration gate can reject a bandpass that does not fit this group")
    field_check_bandpass_every_h: float = setting("CONTIMG_CAL_FIELD_CHECK_BANDPASS_EVERY_H", 1.0, "The residual-bandpass check runs on the first field group at a declination and then at most this often (hours) while the same bandpass is in force; groups in between cite the field solution that checked it. 0: every field group", minimum=0)
    calibrator_isolation_deg: float = setting("CONTIMG_CAL_ISOLATION_DEG", 1.0, "A catalogue calibrator must have no neighbour within this distance brighter (through the beam) than CONTIMG_CAL_ISOLATION_RATIO x itself", minimum=0)
    calibrator_isolation_ratio: float = setting("CONTIMG_CAL_ISOLATION_RATIO", 0.2, "See CONTIMG_CAL_ISOLATION_DEG", minimum=0)
    calibrator_vla_config: str = setting("CONTIMG_CAL_VLA_CONFIG", "C", "VLA configuration whose L-band quality code (P or S: unresolved) decides whether a VLA-list source is a calibrator for DSA-110 (C: baselines to 3.4 km, DSA-110's reach ~2.5 km)", choices=("A", "B", "C", "D"))
    field_bandpass_min_jy: float = setting("CONTIMG_CAL_FIELD_BANDPASS_MIN_JY", 5.0, "With no valid bandpass (no transit yet, or none for longer than its validity), a field whose catalogue model has at least this much flux through the beam (Jy) is bright enough to solve K and BP on as well; the flux scale then comes from the catalogue", minimum=0)
    field_solve_max_chan_width_hz: float = setting("CONTIMG_CAL_FIELD_SOLVE_MAX_CHAN_WIDTH_HZ", 4.0e6, "Field solves run on a copy with channels averaged up to this width (Hz): the gain needs only the band's sum, the residual-bandpass check 8 blocks, and K and BP are applied within each averaged channel to ~1 % (a 5 ns delay turns 7 deg across 4 MHz); 4x cheaper than the calibrator solves' copy", minimum=0)
