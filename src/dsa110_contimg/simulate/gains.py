"""Injected instrumental corruptions, stored as parameters so tests can evaluate the truth.

g_p(t, nu) = A_p(t) exp(i phi_p(t)) * B_p(nu) * exp(-2 pi i (nu - nu_c) tau_p)
with A, phi slowly varying in time, B a smooth bandpass and tau a per-antenna delay.
Visibilities are corrupted as V_pq = g_p conj(g_q) V_true.

By default A and phi are linear about each group's own mid-time, so every group starts from
the same gains and a solution carried from another group looks perfect. With drift
(:func:`draw_drift_params`) a slow process on an absolute time axis is added: a phase random
walk per antenna and polarisation (``phase_rms_deg_per_h`` rms change over an hour) and a slow
amplitude drift, built as a sum of sinusoids with log-spaced periods (10 min to 3 days) whose
power follows a random walk's 1/f^2 spectrum. It is a deterministic function of absolute time
and the seed, so groups simulated in separate runs see one continuous drift.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def draw_gain_params(stations: list[int], n_pol: int, rng: np.random.Generator) -> dict[str, Any]:
    shape = (len(stations), n_pol)
    return {
        "stations": list(stations),
        "delay_ns": rng.normal(0.0, 2.0, shape).round(4).tolist(),
        "amp0": rng.uniform(0.85, 1.15, shape).round(5).tolist(),
        "amp_slope_per_300s": rng.normal(0.0, 0.01, shape).round(5).tolist(),
        "phase0_deg": rng.uniform(-180.0, 180.0, shape).round(3).tolist(),
        "phase_slope_deg_per_300s": rng.normal(0.0, 3.0, shape).round(3).tolist(),
        "bp_amp_poly": rng.normal(0.0, 0.05, shape + (3,)).round(5).tolist(),
        "bp_phase_poly_deg": rng.normal(0.0, 8.0, shape + (3,)).round(4).tolist(),
    }


DRIFT_EPOCH_JD = 2461041.5  # 2026-01-01T00:00 UTC: the drift's time origin
_DRIFT_PERIODS_S = np.geomspace(600.0, 3 * 86400.0, 24)


def draw_drift_params(n_stations: int, n_pol: int, seed: int, phase_rms_deg_per_h: float = 25.0,
                      amp_rms_per_6h: float = 0.02) -> dict[str, Any]:
    """Parameters of the slow gain drift (see the module docstring); own generator per seed."""
    rng = np.random.default_rng([seed, 0xD21F7])
    k = len(_DRIFT_PERIODS_S)
    shape = (n_stations, n_pol, k)

    def amplitudes(rms: float, tau_s: float) -> np.ndarray:
        # random-walk spectrum: power per log-period ~ P; scaled so that the rms change over
        # tau_s, sqrt(sum a^2 (1 - cos(2 pi tau / P))), equals ``rms``
        a = np.sqrt(_DRIFT_PERIODS_S)
        d = np.sqrt(np.sum(a ** 2 * (1 - np.cos(2 * np.pi * tau_s / _DRIFT_PERIODS_S))))
        return a * rms / d

    return {
        "epoch_jd": DRIFT_EPOCH_JD,
        "periods_s": _DRIFT_PERIODS_S.round(3).tolist(),
        "phase_deg": (amplitudes(phase_rms_deg_per_h, 3600.0)[None, None, :]
                      * rng.rayleigh(1.0, shape) / np.sqrt(2)).round(5).tolist(),
        "phase_offset_rad": rng.uniform(0, 2 * np.pi, shape).round(6).tolist(),
        "amp": (amplitudes(amp_rms_per_6h, 6 * 3600.0)[None, None, :]
                * rng.rayleigh(1.0, shape) / np.sqrt(2)).round(7).tolist(),
        "amp_offset_rad": rng.uniform(0, 2 * np.pi, shape).round(6).tolist(),
    }


def _drift(params: dict[str, Any], times_jd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(phase in rad, amplitude factor), each (n_station, n_time, n_pol)."""
    t = (np.asarray(times_jd, dtype=float) - params["epoch_jd"]) * 86400.0
    w = 2 * np.pi / np.asarray(params["periods_s"])  # (k,)
    arg = w[None, None, :, None] * t[None, None, None, :]  # (1, 1, k, nt)

    def series(amp_key: str, off_key: str) -> np.ndarray:
        a = np.asarray(params[amp_key])[..., None]  # (ns, np, k, 1)
        off = np.asarray(params[off_key])[..., None]
        return (a * (np.sin(arg + off) - np.sin(off))).sum(axis=2).transpose(0, 2, 1)

    return np.radians(series("phase_deg", "phase_offset_rad")), 1.0 + series("amp", "amp_offset_rad")


def evaluate_gains(params: dict[str, Any], freqs_hz: np.ndarray, times_jd: np.ndarray,
                   band_centre_hz: float, band_width_hz: float, mid_jd: float) -> np.ndarray:
    """Complex gains, shape (n_station, n_time, n_freq, n_pol), stations in params order."""
    f = np.asarray(freqs_hz, dtype=float)
    t = (np.asarray(times_jd, dtype=float) - mid_jd) * 86400.0 / 300.0
    x = (f - band_centre_hz) / band_width_hz  # -0.5 .. 0.5
    tau = np.asarray(params["delay_ns"])[:, None, None, :] * 1e-9
    amp = (np.asarray(params["amp0"])[:, None, :]
           * (1 + np.asarray(params["amp_slope_per_300s"])[:, None, :] * t[None, :, None]))
    ph = np.radians(np.asarray(params["phase0_deg"])[:, None, :]
                    + np.asarray(params["phase_slope_deg_per_300s"])[:, None, :] * t[None, :, None])
    ca = np.asarray(params["bp_amp_poly"])  # (ns, npol, 3)
    cp = np.radians(np.asarray(params["bp_phase_poly_deg"]))
    xs = np.stack([x, x**2 - 1 / 12, np.sin(6 * np.pi * x)], axis=0)  # (3, nf)
    bp_amp = 1.0 + np.einsum("spk,kf->sfp", ca, xs)
    bp_ph = np.einsum("spk,kf->sfp", cp, xs)
    if params.get("drift"):
        d_ph, d_amp = _drift(params["drift"], times_jd)
        ph = ph + d_ph
        amp = amp * d_amp
    g_t = (amp * np.exp(1j * ph))[:, :, None, :]  # (ns, nt, 1, np)
    g_f = (bp_amp * np.exp(1j * bp_ph))[:, None, :, :]  # (ns, 1, nf, np)
    g_k = np.exp(-2j * np.pi * (f[None, None, :, None] - band_centre_hz) * tau)
    return g_t * g_f * g_k
