"""The tclean parameter builder: pure arithmetic from an MS summary, no CASA.

Every number in the tclean call is derived here, so the choices are unit-tested and recorded
with each image:

- **cell** = (lambda_min / B_max) / ``pixels_per_beam``, from the longest unflagged projected
  baseline at the highest frequency (the narrowest the synthesised beam can be).
- **imsize** covers the primary beam out to ``pb_level`` at the *lowest* frequency (widest beam),
  widened by the drift of the sky through the fixed beam during the group, rounded up to an
  even 2-3-5-smooth (fast FFT) size and capped at ``max_imsize`` (the field then shrinks; the
  plan records the beam level reached at the edge).
- **threshold** = ``threshold_sigma`` x the expected image noise: the per-visibility noise
  measured in the MS (``MSSummary.vis_sigma_jy``), divided by sqrt(N) and multiplied by the
  Briggs noise penalty, computed here from the gridded uv density exactly as tclean weights.
  ``nsigma`` (tclean's residual-rms stop) is set too, as a backstop when the estimate is off.
  A threshold of 0 would let tclean clean noise until its iteration cap.
- **w-projection** when the w-term phase pi * w_max * theta^2 at the image edge exceeds
  ``wproj_max_phase_rad``; the number of planes keeps the per-plane phase error below it.
- **tiers** (quick / standard / deep) vary niter, major-cycle cap, cyclefactor, the clean mask,
  the depth in sigma and the deconvolver. The T-shaped array's PSF has 0.26-0.6 sidelobes: without
  a mask, cyclefactor stays >= 1 (below that the minor cycle cleans the sidelobes and loses
  flux). With tclean's auto-multithresh mask (VLA settings) the minor cycle only searches real
  emission, so the standard tier cleans twice as deep per major cycle (cyclefactor 0.5): fewer
  major cycles for the same fluxes.
- **the mask after peeling**: auto-multithresh masks down to ``sidelobethreshold`` x the PSF
  sidelobe (0.26) x the residual peak, so each major cycle can lower the mask by that factor
  only. Its guard is against masking a bright source's sidelobes; once ``imaging.peel`` has
  removed every catalogued source above 10 mJy the residual peak is itself faint, and the stage
  lowers it from 2.0 to ``SIDELOBETHRESHOLD_AFTER_PEEL`` (1.0). The residual then peaks below
  the peel limit (~10 mJy): the first minor cycle cleans the masked sources to half the PSF
  sidelobe times that peak, the second cleans everything above 4.25 sigma to the threshold, so
  the stage caps the major cycles at ``NMAJOR_AFTER_PEEL`` (2). Further cycles would only
  chase sub-percent peeling residuals around the brightest sources, each at the cost of a
  re-mask, which for a full-size image costs more than the major cycle's gridding.
  ``minpercentchange`` stops re-masking once the mask has settled at the clean threshold. The
  stage builds these masks itself with the same rules (``imaging.cleanmask``: much cheaper,
  and none after the last cycle; ``CONTIMG_IMG_MASKER=casa`` uses tclean's own). The
  measurements are in docs/performance.md.
- **imaging copy**: ``chanbin`` channels are averaged (``imaging.average``) as far as the extra
  bandwidth smearing at the image edge stays below ``max_smearing_loss``; gridding, the cost of
  every major cycle, scales with the channel count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..catalogue import angular_separation_deg
from ..instrument import C_M_S, PrimaryBeam
from .options import ImagingOptions

ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0
SIDEREAL_RATE_DEG_PER_S = 360.0 / 86164.0905


@dataclass(frozen=True)
class MSSummary:
    """What the builder needs to know about an MS (filled by ``imaging.msinfo``)."""

    ms_path: str
    datacolumn: str
    n_rows: int
    n_unflagged: int            # unflagged cross-correlation samples (row x chan x corr)
    n_corr: int
    n_antennas: int             # antennas with any unflagged cross-correlation
    n_channels: int
    freq_min_hz: float
    freq_max_hz: float
    max_uv_m: float             # longest unflagged projected baseline sqrt(u^2 + v^2)
    max_w_m: float
    phase_centre_ra_deg: float
    phase_centre_dec_deg: float
    pointing_ra_deg: float      # beam centre (ICRS) at mid-group
    pointing_dec_deg: float
    pointing_az_deg: float      # the fixed pointing of the drift scan
    pointing_alt_deg: float
    pointing_source: str        # where the pointing came from (for the record)
    times_mjd_s: tuple[float, ...]          # integration centres (MJD seconds, UTC)
    time_weights: tuple[float, ...]         # unflagged samples per integration
    integration_s: float
    dish_diameter_m: float
    telescope: str
    observer: str
    vis_sigma_jy: float | None  # noise (real part) of one correlation of one visibility
    array_itrf_m: tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre of the live antennas
    sampled_nonfinite_fraction: float = 0.0
    sampled_zero_fraction: float = 0.0
    chan_width_hz: float = 0.0  # widest channel (0: unknown, no averaging)
    chans_per_spw: int = 0      # gcd of the windows' channel counts (an averaging must divide it)
    # unflagged rows' projected (u, v) in metres, for the Briggs noise penalty
    uv_m: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def freq_centre_hz(self) -> float:
        return 0.5 * (self.freq_min_hz + self.freq_max_hz)

    @property
    def duration_s(self) -> float:
        if not self.times_mjd_s:
            return 0.0
        return max(self.times_mjd_s) - min(self.times_mjd_s) + self.integration_s


@dataclass(frozen=True)
class Tier:
    """How hard tclean works; see the module docstring for cyclefactor and the mask."""

    niter: int
    nmajor: int             # -1: no cap
    cyclefactor: float
    sigma_factor: float     # clean down to sigma_factor * threshold_sigma * noise
    deconvolver: str | None  # None: options.deconvolver
    gain: float = 0.1
    nterms: int = 1          # Taylor terms (mtmfs only)
    automask: bool = False   # tclean auto-multithresh clean mask


TIERS: dict[str, Tier] = {
    "quick": Tier(niter=1000, nmajor=3, cyclefactor=1.0, sigma_factor=2.0, deconvolver="hogbom"),
    "standard": Tier(niter=20000, nmajor=10, cyclefactor=0.5, sigma_factor=1.0, deconvolver=None,
                     automask=True),
    # deep: multi-scale multi-frequency (nterms 2) removes the spectral-index artefacts that
    # limit the dynamic range of single-term MFS around a bright calibrator
    "deep": Tier(niter=200000, nmajor=-1, cyclefactor=1.5, sigma_factor=0.6,
                 deconvolver="mtmfs", nterms=2),
}


# auto-multithresh with the values recommended for the VLA's 12 m dishes at L band (CASA docs);
# negative emission is never masked (a continuum field has none); re-masking stops once the
# mask changes by less than 1 % at the clean threshold (see the module docstring).
AUTOMASK: dict[str, Any] = {"usemask": "auto-multithresh", "sidelobethreshold": 2.0,
                            "noisethreshold": 4.25, "lownoisethreshold": 1.5,
                            "minbeamfrac": 0.3, "negativethreshold": 0.0,
                            "minpercentchange": 1.0}
# with the bright catalogued sources peeled before tclean (module docstring)
SIDELOBETHRESHOLD_AFTER_PEEL = 1.0
NMAJOR_AFTER_PEEL = 2


@dataclass(frozen=True)
class ImagingPlan:
    """Every derived quantity behind one tclean call (recorded with the image)."""

    cell_arcsec: float
    imsize: int
    beam_expected_arcsec: float
    field_radius_deg: float       # radius wanted: pb_level at the lowest frequency + drift
    image_half_width_deg: float   # what the image actually covers
    pb_at_edge: float             # beam level at the N/S image edges (lowest frequency)
    drift_deg: float
    ref_freq_hz: float
    noise_natural_jy: float | None
    briggs_factor: float
    noise_expected_jy: float | None
    threshold_jy: float
    nsigma: float
    w_phase_rad: float
    wprojplanes: int
    gridder: str
    phasecenter: str
    tier: str
    deconvolver: str
    scales: tuple[int, ...]
    chanbin: int = 1              # channels averaged into one for the imaging copy
    smearing_loss: float = 0.0    # predicted peak loss from that averaging at the image edge

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------- pure helpers
def fast_fft_size(n: int) -> int:
    """Smallest even integer >= n with no prime factor above 5 (what FFTW and CASA like)."""
    m = max(2, int(math.ceil(n)))
    m += m % 2
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


def cell_size_arcsec(max_uv_m: float, freq_max_hz: float, pixels_per_beam: float) -> float:
    """1/pixels_per_beam of lambda_min / B_max, to four significant figures."""
    if max_uv_m <= 0:
        raise ValueError("no unflagged baselines with non-zero length")
    beam = C_M_S / freq_max_hz / max_uv_m * ARCSEC_PER_RAD
    return float(f"{beam / pixels_per_beam:.4g}")


def drift_deg(duration_s: float, dec_deg: float) -> float:
    """Great-circle distance the sky moves through a fixed beam in ``duration_s``."""
    return duration_s * SIDEREAL_RATE_DEG_PER_S * math.cos(math.radians(dec_deg))


def briggs_noise_factor(uv_m: np.ndarray | None, freqs_hz: np.ndarray, uv_cell_lambda: float,
                        robust: float) -> float:
    """sigma(Briggs) / sigma(natural) for equal natural weights, as tclean's weighting does it.

    Density W_k is gridded on the image's uv cells (both Hermitian halves folded together);
    f^2 = (5 * 10^-R)^2 / (sum_k W_k^2 / sum_i w_i); w_i' = 1 / (1 + W_k f^2). The noise ratio
    is sqrt(N * sum w'^2) / sum w'. Without a uv sample it is 1 (natural).
    """
    if uv_m is None or len(uv_m) == 0 or robust >= 5:
        return 1.0
    freqs = np.asarray(freqs_hz, dtype=float)
    u = (uv_m[:, 0:1] * freqs[None, :] / C_M_S).ravel()
    v = (uv_m[:, 1:2] * freqs[None, :] / C_M_S).ravel()
    flip = (u < 0) | ((u == 0) & (v < 0))
    u = np.where(flip, -u, u)
    v = np.where(flip, -v, v)
    iu = np.floor(u / uv_cell_lambda + 0.5).astype(np.int64)
    iv = np.floor(v / uv_cell_lambda + 0.5).astype(np.int64)
    key = iu * 4_000_003 + iv
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    density = counts[inverse].astype(float)
    f2 = (5.0 * 10.0 ** (-robust)) ** 2 / (np.sum(counts.astype(float) ** 2) / u.size)
    w = 1.0 / (1.0 + density * f2)
    return float(np.sqrt(u.size * np.sum(w * w)) / np.sum(w))


def smearing_loss(uv_m: np.ndarray | None, theta_rad: float, dnu_hz: float) -> float:
    """Peak attenuation of a point source at radius theta by channels of width dnu.

    Across a channel the fringe phase of baseline b turns by 2 pi b theta dnu / c, so the
    channel-averaged visibility is scaled by sinc(b theta dnu / c) (normalised sinc); the peak
    of the image is the mean over the gridded visibilities. Independent of frequency.
    """
    if uv_m is None or len(uv_m) == 0 or dnu_hz <= 0 or theta_rad <= 0:
        return 0.0
    b = np.hypot(uv_m[:, 0], uv_m[:, 1])
    return float(1.0 - np.mean(np.sinc(b * theta_rad * dnu_hz / C_M_S)))


def choose_chanbin(s: MSSummary, theta_rad: float, max_loss: float,
                   max_bin: int = 16) -> tuple[int, float]:
    """The widest averaging (a divisor of the channels per window) whose *added* smearing at
    ``theta_rad`` stays within ``max_loss``; (1, loss of the native channels) otherwise.

    Gridding cost is proportional to the number of channels, so this is the cheapest imaging
    copy that still measures fluxes at the field edge to ``max_loss``.
    """
    native = smearing_loss(s.uv_m, theta_rad, s.chan_width_hz)
    best = (1, native)
    if s.chans_per_spw < 2 or s.chan_width_hz <= 0 or max_loss <= 0:
        return best
    for k in range(2, min(max_bin, s.chans_per_spw) + 1):
        if s.chans_per_spw % k:
            continue
        loss = smearing_loss(s.uv_m, theta_rad, k * s.chan_width_hz)
        if loss - native > max_loss:
            break
        best = (k, loss)
    return best


def wproj_planes(max_w_lambda: float, theta_rad: float, max_phase_rad: float) -> tuple[float, int]:
    """(w-term phase pi w theta^2 at radius theta, planes needed; 1 = plain gridding suffices).

    Planes spaced by dw leave a phase error of at most pi dw theta^2, so keeping it below the
    tolerance needs ceil(phase / tolerance) planes (at least 4 once w-projection is on).
    """
    phase = math.pi * max_w_lambda * theta_rad ** 2
    if phase <= max_phase_rad:
        return phase, 1
    return phase, int(min(512, max(4, math.ceil(phase / max_phase_rad))))


def _direction(ra_deg: float, dec_deg: float) -> str:
    return f"ICRS {ra_deg:.8f}deg {dec_deg:.8f}deg"


# ----------------------------------------------------------------- the builder
def plan_imaging(s: MSSummary, options: ImagingOptions,
                 primary_beam: PrimaryBeam | None = None) -> ImagingPlan:
    """Derive every imaging number from the summary (see the module docstring); the primary
    beam defaults to an Airy pattern of the MS's dish diameter."""
    pbm = primary_beam or PrimaryBeam.airy(s.dish_diameter_m)
    tier = TIERS[options.tier]
    cell = cell_size_arcsec(s.max_uv_m, s.freq_max_hz, options.pixels_per_beam)
    beam = cell * options.pixels_per_beam
    drift = drift_deg(s.duration_s, s.pointing_dec_deg)
    radius = pbm.radius_at_level(options.pb_level, s.freq_min_hz) + drift / 2
    # an MS rephased away from the beam centre is imaged on the beam centre instead
    offset = angular_separation_deg(s.phase_centre_ra_deg, s.phase_centre_dec_deg,
                             s.pointing_ra_deg, s.pointing_dec_deg)
    recentre = offset > 0.05
    want = 2.0 * radius * 3600.0 / cell
    imsize = min(fast_fft_size(int(math.ceil(want))), options.max_imsize)
    imsize -= imsize % 2
    half = imsize * cell / 2.0 / 3600.0
    # at the north/south edges (no drift there), lowest frequency: the beam the image reaches
    pb_edge = float(pbm.power(math.radians(half), s.freq_min_hz))

    freqs = np.linspace(s.freq_min_hz, s.freq_max_hz, min(8, max(1, s.n_channels)))
    uv_cell = 1.0 / math.radians(imsize * cell / 3600.0)
    bf = 1.0 if options.robust >= 2 else briggs_noise_factor(s.uv_m, freqs, uv_cell, options.robust)
    noise_nat = None
    if s.vis_sigma_jy is not None and s.n_unflagged > 0:
        n_stokes_i = s.n_unflagged / max(1, s.n_corr)
        sigma_i = s.vis_sigma_jy / math.sqrt(max(1, s.n_corr))
        noise_nat = sigma_i / math.sqrt(n_stokes_i)
    noise = None if noise_nat is None else noise_nat * bf
    nsigma = options.threshold_sigma * tier.sigma_factor
    threshold = 0.0 if noise is None else nsigma * noise

    w_lambda = s.max_w_m * s.freq_max_hz / C_M_S
    # emission that matters lies inside the wanted field, or the image corner if smaller
    theta = math.radians(min(half * math.sqrt(2.0), radius))
    phase, planes = wproj_planes(w_lambda, theta, options.wproj_max_phase_rad)
    # smearing is judged at the N/S image edge (the farthest the beam-weighted field reaches)
    chanbin, loss = choose_chanbin(s, math.radians(min(half, radius)), options.max_smearing_loss)
    deconv = tier.deconvolver or options.deconvolver
    scales = (0, int(round(options.pixels_per_beam)), int(round(3 * options.pixels_per_beam))) \
        if deconv in ("multiscale", "mtmfs") else ()
    return ImagingPlan(
        cell_arcsec=cell, imsize=imsize, beam_expected_arcsec=beam, field_radius_deg=radius,
        image_half_width_deg=half, pb_at_edge=pb_edge, drift_deg=drift,
        ref_freq_hz=s.freq_centre_hz, noise_natural_jy=noise_nat, briggs_factor=bf,
        noise_expected_jy=noise, threshold_jy=threshold, nsigma=nsigma, w_phase_rad=phase,
        wprojplanes=planes, gridder="wproject" if planes > 1 else "standard",
        phasecenter=_direction(s.pointing_ra_deg, s.pointing_dec_deg) if recentre else "",
        tier=options.tier, deconvolver=deconv, scales=scales, chanbin=chanbin,
        smearing_loss=loss)


def build_tclean_params(ms_summary: MSSummary, options: ImagingOptions, imagename: str) -> dict:
    """The exact keyword arguments for ``casatasks.tclean`` (pure; see ``plan_imaging``)."""
    return params_from_plan(ms_summary, plan_imaging(ms_summary, options), options, imagename)


def params_from_plan(ms_summary: MSSummary, p: ImagingPlan, options: ImagingOptions,
                     imagename: str) -> dict:
    """tclean keyword arguments for an already computed plan."""
    tier = TIERS[p.tier]
    params: dict[str, Any] = {
        "vis": ms_summary.ms_path,
        "imagename": imagename,
        "datacolumn": ms_summary.datacolumn,
        "specmode": "mfs",
        "stokes": "I",
        "reffreq": f"{p.ref_freq_hz:.1f}Hz",
        "imsize": [p.imsize, p.imsize],
        "cell": [f"{p.cell_arcsec}arcsec", f"{p.cell_arcsec}arcsec"],
        "phasecenter": p.phasecenter,
        "projection": "SIN",
        "gridder": p.gridder,
        "wprojplanes": p.wprojplanes,
        "weighting": "briggs",
        "robust": float(options.robust),
        "deconvolver": p.deconvolver,
        "scales": list(p.scales),
        "nterms": tier.nterms if p.deconvolver == "mtmfs" else 1,
        "niter": tier.niter,
        "nmajor": tier.nmajor,
        "gain": tier.gain,
        "cyclefactor": tier.cyclefactor,
        **(AUTOMASK if tier.automask else {"usemask": "user"}),
        "threshold": f"{p.threshold_jy:.6g}Jy",
        "nsigma": p.nsigma,
        # our own drift-averaged beam is applied later; CASA's single-pointing generic beam
        # must not blank the image (a negative pblimit keeps the pixels).
        "pblimit": -1e-4,
        "pbcor": False,
        "restoration": True,
        "savemodel": "none",
        "interactive": False,
        "restart": True,
        "parallel": False,
    }
    return params

