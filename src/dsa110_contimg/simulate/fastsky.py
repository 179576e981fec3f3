"""The simulator's inner sum: point-source visibilities, compiled.

V(t, b, nu) = sum_s A_s(t, nu) exp(2 pi i nu d_s(t, b) / c), with A the spectrum times the
beam and d the geometric delay path. A realistic sky has thousands of sources per field, so
the sum runs in numba: one complex exponential per (source, time, baseline) and a complex
multiply per channel when the channels are evenly spaced (they always are within a subband;
the rounding after 48 steps is ~1e-14), an exponential per channel otherwise.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..instrument import C_M_S


@numba.njit(cache=True, parallel=True)
def _sum(amp: np.ndarray, dgeo: np.ndarray, k: np.ndarray, even: bool, out: np.ndarray) -> None:
    ns, nt, nf = amp.shape
    nb = dgeo.shape[2]
    dk = k[1] - k[0] if nf > 1 else 0.0
    for b in numba.prange(nb):  # each thread owns its baselines' output
        for t in range(nt):
            for s in range(ns):
                d = dgeo[s, t, b]
                if even:
                    ph = complex(math.cos(k[0] * d), math.sin(k[0] * d))
                    step = complex(math.cos(dk * d), math.sin(dk * d))
                    for f in range(nf):
                        out[t, b, f] += amp[s, t, f] * ph
                        ph *= step
                else:
                    for f in range(nf):
                        out[t, b, f] += amp[s, t, f] * complex(math.cos(k[f] * d),
                                                                math.sin(k[f] * d))


def sum_point_sources(amp: np.ndarray, dgeo_m: np.ndarray, freqs_hz: np.ndarray,
                      out: np.ndarray) -> np.ndarray:
    """Add to ``out`` (ntime, nbl, nchan) the sources' visibilities: ``amp`` (nsrc, ntime,
    nchan) apparent flux, ``dgeo_m`` (nsrc, ntime, nbl) delay path in metres."""
    f = np.asarray(freqs_hz, dtype=np.float64)
    d = np.diff(f)
    even = bool(f.size < 3 or np.allclose(d, d[0], rtol=1e-9, atol=1e-3))
    _sum(np.ascontiguousarray(amp, dtype=np.float64), np.ascontiguousarray(dgeo_m, dtype=np.float64),
         2.0 * np.pi * f / C_M_S, even, out)
    return out
