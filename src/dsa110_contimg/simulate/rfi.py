"""Radio-frequency interference with a known footprint, so flagging can be scored.

A terrestrial emitter on the horizon: it does not move with the sky, so on every baseline its
fringe phase is fixed in time (zero fringe rate) and its amplitude is the same on all
baselines. Two kinds, as DSA-110 sees them in L band:

- narrowband lines that never go away (a few single channels, e.g. navigation satellites and
  radar harmonics), ``line_sigma`` times the thermal noise of one visibility;
- one broadband burst (a few MHz for one integration, e.g. an aircraft transponder or a
  spark), ``burst_sigma`` times the noise.

Both enter before the antenna gains, as real interference does (through the same receivers).
Autocorrelations are not touched: the pipeline flags them anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .sky import C_M_S, enu_unit


@dataclass(frozen=True)
class RfiModel:
    lines_hz: tuple[float, ...]          # channel centres hit by persistent lines
    line_jy: float
    burst_time_index: int                # the integration the burst falls in
    burst_hz: tuple[float, float]        # its frequency range (inclusive channel centres)
    burst_jy: float
    az_deg: float = 80.0                 # the emitter's direction (on the horizon)
    alt_deg: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"lines_hz": list(self.lines_hz), "line_jy": self.line_jy,
                "burst_time_index": self.burst_time_index, "burst_hz": list(self.burst_hz),
                "burst_jy": self.burst_jy, "direction_az_alt_deg": [self.az_deg, self.alt_deg]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RfiModel:
        az, alt = d["direction_az_alt_deg"]
        return cls(lines_hz=tuple(d["lines_hz"]), line_jy=float(d["line_jy"]),
                   burst_time_index=int(d["burst_time_index"]), burst_hz=tuple(d["burst_hz"]),
                   burst_jy=float(d["burst_jy"]), az_deg=float(az), alt_deg=float(alt))

    def amplitude(self, freqs_hz: np.ndarray, n_times: int) -> np.ndarray:
        """(n_times, n_freqs) interference amplitude (Jy); zero where there is none."""
        freqs_hz = np.asarray(freqs_hz, dtype=float)
        half = 0.5 * np.min(np.abs(np.diff(np.sort(freqs_hz)))) if freqs_hz.size > 1 else 1.0
        amp = np.zeros((n_times, freqs_hz.size))
        for f in self.lines_hz:
            amp[:, np.abs(freqs_hz - f) < half] = self.line_jy
        lo, hi = self.burst_hz
        amp[self.burst_time_index, (freqs_hz >= lo - half) & (freqs_hz <= hi + half)] += self.burst_jy
        return amp

    def visibilities(self, freqs_hz: np.ndarray, n_times: int, bvec_m: np.ndarray,
                     cross: np.ndarray) -> np.ndarray | None:
        """(n_times, n_baselines, n_freqs) interference to add, or None if none falls here.

        ``bvec_m`` holds the baselines in ENU metres (antenna 2 - antenna 1, as the sky
        model), ``cross`` marks the cross-correlations.
        """
        amp = self.amplitude(freqs_hz, n_times)
        if not amp.any():
            return None
        s_hat = enu_unit(np.array(self.az_deg), np.array(self.alt_deg)) - np.array([0.0, 0.0, 1.0])
        delay = bvec_m @ s_hat  # metres, against the zenith phase centre as the sky model
        fringe = np.exp(2j * np.pi * delay[:, None] * (freqs_hz / C_M_S)[None, :])
        out = amp[:, None, :] * fringe[None, :, :]
        out[:, ~cross, :] = 0
        return out


def draw_rfi(rng: np.random.Generator, freqs_hz: np.ndarray, n_times: int, sigma_jy: float,
             line_sigma: float = 40.0, burst_sigma: float = 15.0,
             line_fraction: float = 0.01) -> RfiModel:
    """Interference for one group over the band ``freqs_hz`` (all channels, any order).

    Lines hit ``line_fraction`` of the channels (at least two), away from the band edges; the
    burst covers 1/16 of the band in one integration away from the first and last.
    """
    f = np.sort(np.asarray(freqs_hz, dtype=float))
    n = f.size
    n_lines = max(2, int(round(line_fraction * n)))
    lines = np.sort(rng.choice(np.arange(2, n - 2), size=n_lines, replace=False))
    width = max(2, n // 16)
    start = int(rng.integers(2, max(3, n - width - 2)))
    t_burst = int(rng.integers(1, max(2, n_times - 1)))
    return RfiModel(lines_hz=tuple(float(f[i]) for i in lines), line_jy=line_sigma * sigma_jy,
                    burst_time_index=t_burst, burst_hz=(float(f[start]), float(f[start + width - 1])),
                    burst_jy=burst_sigma * sigma_jy)


def score_flags(model: RfiModel, flag: np.ndarray, ant1: np.ndarray, ant2: np.ndarray,
                time: np.ndarray, freqs_hz: np.ndarray, dead: np.ndarray) -> dict[str, float]:
    """Share of the interference's cells a flagger flagged, and of the clean cells.

    ``flag`` is (row, channel), True where any correlation is flagged; ``dead`` marks rows
    flagged before flagging began (dead antennas, zeros). Only live cross-correlations count.
    """
    tindex = np.unique(time, return_inverse=True)[1]
    hit = model.amplitude(freqs_hz, int(tindex.max()) + 1)[tindex] > 0
    lines = hit.all(axis=0)
    live = (ant1 != ant2) & ~dead
    f, hit = flag[live], hit[live]
    burst = hit & ~lines[None, :]
    return {"lines": float(f[:, lines].mean()) if lines.any() else float("nan"),
            "burst": float(f[burst].mean()) if burst.any() else float("nan"),
            "clean": float(f[~hit].mean())}
