"""Injected instrumental corruptions, stored as parameters so tests can evaluate the truth.

g_p(t, nu) = A_p(t) exp(i phi_p(t)) * B_p(nu) * exp(-2 pi i (nu - nu_c) tau_p)
with A, phi slowly varying in time, B a smooth bandpass and tau a per-antenna delay.
Visibilities are corrupted as V_pq = g_p conj(g_q) V_true.
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
    g_t = (amp * np.exp(1j * ph))[:, :, None, :]  # (ns, nt, 1, np)
    g_f = (bp_amp * np.exp(1j * bp_ph))[:, None, :, :]  # (ns, 1, nf, np)
    g_k = np.exp(-2j * np.pi * (f[None, None, :, None] - band_centre_hz) * tau)
    return g_t * g_f * g_k
