"""The tclean builder is pure: every derived number checked without CASA."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from dsa110_contimg.imaging.options import ImagingOptions
from dsa110_contimg.imaging.params import (
    TIERS,
    MSSummary,
    briggs_noise_factor,
    build_tclean_params,
    cell_size_arcsec,
    choose_chanbin,
    fast_fft_size,
    plan_imaging,
    smearing_loss,
    wproj_planes,
)
from dsa110_contimg.instrument import PrimaryBeam
from dsa110_contimg.simulate.sky import C_M_S, airy_power

F_LO, F_HI = 1311.37e6, 1498.63e6


def _summary(max_uv_m: float = 2500.0, max_w_m: float = 10.0, n_unflagged: int = 10_000_000,
             vis_sigma: float | None = 2.0, uv: np.ndarray | None = None, dec: float = 30.7,
             n_times: int = 24, pointing_offset_deg: float = 0.0) -> MSSummary:
    times = tuple(5.0e9 + 12.884902 * np.arange(n_times))
    return MSSummary(
        ms_path="/data/x.ms", datacolumn="corrected", n_rows=1000, n_unflagged=n_unflagged,
        n_corr=2, n_antennas=96, n_channels=768, freq_min_hz=F_LO, freq_max_hz=F_HI,
        max_uv_m=max_uv_m, max_w_m=max_w_m, phase_centre_ra_deg=200.0, phase_centre_dec_deg=dec,
        pointing_ra_deg=200.0 + pointing_offset_deg, pointing_dec_deg=dec,
        pointing_az_deg=180.0, pointing_alt_deg=83.5, pointing_source="test", times_mjd_s=times,
        time_weights=tuple(1.0 for _ in times), integration_s=12.884902, dish_diameter_m=4.65,
        telescope="OVRO_DSA", observer="", vis_sigma_jy=vis_sigma, uv_m=uv)


def test_fast_fft_size():
    assert fast_fft_size(480) == 480
    assert fast_fft_size(513) == 540  # 2^2 3^3 5 (CASA's getOptimumSize agrees)
    assert fast_fft_size(4097) == 4320
    assert fast_fft_size(7) == 8
    for n in (100, 1001, 3333):
        m = fast_fft_size(n)
        assert m >= n and m % 2 == 0
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        assert k == 1


def test_cell_is_a_quarter_of_the_beam_from_the_longest_baseline_at_the_top_frequency():
    beam_arcsec = C_M_S / F_HI / 2500.0 * 206264.806
    assert cell_size_arcsec(2500.0, F_HI, 5.0) == pytest.approx(beam_arcsec / 5, rel=1e-3)
    plan = plan_imaging(_summary(max_uv_m=2500.0), ImagingOptions())
    assert plan.cell_arcsec == pytest.approx(4.13, abs=0.01)  # default: 4 cells per beam
    # half the baseline, twice the cell; more pixels per beam, smaller cell
    assert plan_imaging(_summary(max_uv_m=1250.0), ImagingOptions()).cell_arcsec == \
        pytest.approx(2 * plan.cell_arcsec, rel=1e-3)
    assert plan_imaging(_summary(), ImagingOptions(pixels_per_beam=3)).cell_arcsec == \
        pytest.approx(plan.cell_arcsec * 4 / 3, rel=1e-3)
    with pytest.raises(ValueError):
        cell_size_arcsec(0.0, F_HI, 5)


def pb_radius_deg(level: float, freq_hz: float, diameter_m: float) -> float:
    return PrimaryBeam.airy(diameter_m).radius_at_level(level, freq_hz)


def test_pb_radius_inverts_the_airy_pattern():
    for level in (0.1, 0.2, 0.5):
        r = pb_radius_deg(level, F_LO, 4.65)
        assert float(airy_power(math.radians(r), F_LO, 4.65)) == pytest.approx(level, abs=1e-6)
    # the half-power radius of a 4.65 m dish at 1.31 GHz is ~1.4 deg (FWHM ~ 1.02 lambda/D)
    assert 2 * pb_radius_deg(0.5, F_LO, 4.65) == pytest.approx(
        math.degrees(1.029 * C_M_S / F_LO / 4.65), rel=0.01)


def test_imsize_covers_the_beam_to_pb_level_plus_the_drift():
    o = ImagingOptions(max_imsize=100_000)
    s = _summary(max_uv_m=300.0)  # tiny-like array: large cells, no cap
    plan = plan_imaging(s, o)
    radius = pb_radius_deg(0.2, F_LO, 4.65)
    drift = 24 * 12.884902 * 360 / 86164.0905 * math.cos(math.radians(30.7))
    assert plan.drift_deg == pytest.approx(drift, rel=1e-6)
    assert plan.field_radius_deg == pytest.approx(radius + drift / 2, rel=1e-6)
    assert plan.image_half_width_deg >= plan.field_radius_deg
    assert plan.imsize == fast_fft_size(math.ceil(2 * plan.field_radius_deg * 3600 / plan.cell_arcsec))
    assert plan.pb_at_edge <= 0.2
    # a higher cutoff level images a smaller field
    assert plan_imaging(s, replace(o, pb_level=0.5)).imsize < plan.imsize
    # a shorter group drifts less: smaller field
    assert plan_imaging(_summary(max_uv_m=300.0, n_times=6), o).imsize < plan.imsize


def test_imsize_is_capped_and_the_shortfall_recorded():
    plan = plan_imaging(_summary(max_uv_m=2500.0), ImagingOptions(max_imsize=2048))
    assert plan.imsize == 2048
    assert plan.image_half_width_deg < plan.field_radius_deg
    assert plan.pb_at_edge > 0.2


def test_threshold_comes_from_the_measured_noise():
    o = ImagingOptions(robust=2.0, threshold_sigma=5.0)  # robust 2: natural, no penalty
    s = _summary(vis_sigma=2.0, n_unflagged=8_000_000)
    plan = plan_imaging(s, o)
    expected = 2.0 / math.sqrt(2) / math.sqrt(8_000_000 / 2)
    assert plan.noise_natural_jy == pytest.approx(expected)
    assert plan.threshold_jy == pytest.approx(5.0 * expected)
    params = build_tclean_params(s, o, "/scratch/img")
    assert float(params["threshold"][:-2]) == pytest.approx(5.0 * expected, rel=1e-5)
    assert params["nsigma"] == 5.0
    # four times the data halves the threshold
    assert plan_imaging(replace(s, n_unflagged=32_000_000), o).threshold_jy == \
        pytest.approx(plan.threshold_jy / 2)
    # no noise estimate: no absolute threshold, but tclean's own nsigma stop remains
    blind = plan_imaging(replace(s, vis_sigma_jy=None), o)
    assert blind.threshold_jy == 0 and blind.nsigma == 5.0


def test_briggs_penalty_from_the_uv_density():
    rng = np.random.default_rng(1)
    # a centrally concentrated uv distribution, like a dense core with long arms
    r = rng.exponential(200.0, 20000)
    phi = rng.uniform(0, np.pi, r.size)
    uv = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    f = np.array([1.4e9])
    cell = 20.0  # wavelengths
    natural = briggs_noise_factor(uv, f, cell, robust=5.0)
    mid = briggs_noise_factor(uv, f, cell, robust=0.5)
    uniform = briggs_noise_factor(uv, f, cell, robust=-2.0)
    assert natural == 1.0
    assert 1.0 < mid < uniform
    # equal density in every occupied cell: weighting changes nothing
    grid = np.stack(np.meshgrid(np.arange(1, 50) * cell * C_M_S / 1.4e9,
                                np.arange(1, 50) * cell * C_M_S / 1.4e9), axis=-1).reshape(-1, 2)
    assert briggs_noise_factor(grid, f, cell, robust=-2.0) == pytest.approx(1.0, abs=1e-9)
    # the plan multiplies the natural noise by it
    s = _summary(uv=uv * 5)
    plan = plan_imaging(s, ImagingOptions(robust=-1.0))
    assert plan.briggs_factor > 1 and plan.noise_expected_jy == pytest.approx(
        plan.noise_natural_jy * plan.briggs_factor)


def test_tiers_trade_depth_for_time():
    s = _summary()
    p = {t: build_tclean_params(s, ImagingOptions(tier=t), "/scratch/img") for t in TIERS}
    assert p["quick"]["niter"] < p["standard"]["niter"] < p["deep"]["niter"]
    assert 0 < p["quick"]["nmajor"] < p["standard"]["nmajor"] and p["deep"]["nmajor"] == -1
    thr = {t: float(p[t]["threshold"][:-2]) for t in p}
    assert thr["quick"] > thr["standard"] > thr["deep"] > 0
    assert p["quick"]["deconvolver"] == "hogbom"
    assert p["standard"]["deconvolver"] == "hogbom"
    assert build_tclean_params(s, ImagingOptions(deconvolver="multiscale"), "x")["deconvolver"] \
        == "multiscale"
    assert p["deep"]["deconvolver"] == "mtmfs" and p["deep"]["nterms"] == 2
    assert p["deep"]["scales"] == [0, 4, 12]  # point, one and three beams
    # see the params docstring: below 1 only with a clean mask
    assert all(q["cyclefactor"] >= 1.0 or q["usemask"] == "auto-multithresh" for q in p.values())
    for q in p.values():
        assert q["specmode"] == "mfs" and q["stokes"] == "I" and q["weighting"] == "briggs"
        assert q["savemodel"] == "none" and q["pblimit"] < 0 and not q["pbcor"]


def test_wprojection_only_when_the_w_term_matters():
    # tiny array, 6 m of w: plain gridding
    tiny = plan_imaging(_summary(max_uv_m=300.0, max_w_m=6.0), ImagingOptions())
    assert tiny.gridder == "standard" and tiny.wprojplanes == 1
    assert tiny.w_phase_rad < 0.5
    # full array at dec 30: N-S baselines of 1.5 km at 6.5 deg from zenith give ~170 m of w
    full = plan_imaging(_summary(max_w_m=170.0), ImagingOptions())
    assert full.gridder == "wproject" and full.wprojplanes >= 4
    params = build_tclean_params(_summary(max_w_m=170.0), ImagingOptions(), "x")
    assert params["gridder"] == "wproject" and params["wprojplanes"] == full.wprojplanes
    # far from zenith (dec -10) needs many more planes
    low = plan_imaging(_summary(max_w_m=1100.0, dec=-10.0), ImagingOptions())
    assert low.wprojplanes > 3 * full.wprojplanes
    # the rule itself: pi w theta^2 against the tolerance
    phase, planes = wproj_planes(5000.0, math.radians(1.0), 0.5)
    assert phase == pytest.approx(math.pi * 5000 * math.radians(1.0) ** 2)
    assert planes == math.ceil(phase / 0.5) == 10
    assert wproj_planes(1000.0, math.radians(1.0), 0.5)[1] == 4  # at least 4 once on
    assert wproj_planes(10.0, math.radians(1.0), 0.5) == (pytest.approx(math.pi * 10 * math.radians(1) ** 2), 1)


def test_image_is_recentred_on_the_beam_only_when_the_ms_was_rephased():
    assert build_tclean_params(_summary(), ImagingOptions(), "x")["phasecenter"] == ""
    moved = build_tclean_params(_summary(pointing_offset_deg=0.5), ImagingOptions(), "x")
    assert moved["phasecenter"].startswith("ICRS 200.5") and moved["phasecenter"].endswith("deg")


def test_builder_output_is_a_complete_tclean_call():
    s = _summary()
    params = build_tclean_params(s, ImagingOptions(), "/scratch/2026-06-01T044606")
    assert params["vis"] == s.ms_path and params["imagename"] == "/scratch/2026-06-01T044606"
    assert params["datacolumn"] == "corrected"
    assert params["imsize"][0] == params["imsize"][1] and params["imsize"][0] % 2 == 0
    assert params["cell"][0].endswith("arcsec")
    assert params["reffreq"] == f"{(F_LO + F_HI) / 2:.1f}Hz"
    assert params["robust"] == 0.5


def test_smearing_loss_matches_a_brute_force_channel_average():
    rng = np.random.default_rng(3)
    uv = rng.uniform(-2500, 2500, size=(400, 2))
    theta, dnu = math.radians(1.5), 1.0e6
    # a point source at theta along u: visibility phase 2 pi u theta nu / c, averaged over dnu
    nu = 1.4e9 + np.linspace(-dnu / 2, dnu / 2, 2001)
    b = np.hypot(uv[:, 0], uv[:, 1])
    brute = np.abs(np.exp(2j * np.pi * b[:, None] * theta * nu[None, :] / C_M_S).mean(axis=1))
    assert smearing_loss(uv, theta, dnu) == pytest.approx(1 - brute.mean(), rel=1e-3)
    assert smearing_loss(uv, theta, 0.0) == 0.0
    assert smearing_loss(None, theta, dnu) == 0.0


def test_chanbin_is_the_widest_divisor_within_the_smearing_budget():
    rng = np.random.default_rng(4)
    uv = rng.normal(0, 700, size=(5000, 2))
    s = replace(_summary(uv=uv), chan_width_hz=244140.625, chans_per_spw=48)
    theta = math.radians(1.88)
    native = smearing_loss(uv, theta, s.chan_width_hz)
    for budget in (0.002, 0.005, 0.02):
        k, loss = choose_chanbin(s, theta, budget)
        assert 48 % k == 0 and loss - native <= budget
        wider = [j for j in range(k + 1, 17) if 48 % j == 0]
        if wider:  # the next divisor up would break the budget
            assert smearing_loss(uv, theta, wider[0] * s.chan_width_hz) - native > budget
    assert choose_chanbin(s, theta, 0.0)[0] == 1
    assert choose_chanbin(replace(s, chans_per_spw=0), theta, 0.05)[0] == 1  # unknown: no averaging
    # a larger budget never averages less; the plan records what it chose
    assert choose_chanbin(s, theta, 0.02)[0] >= choose_chanbin(s, theta, 0.005)[0]
    plan = plan_imaging(s, ImagingOptions(max_smearing_loss=0.005))
    assert plan.chanbin == choose_chanbin(s, math.radians(min(plan.image_half_width_deg,
                                                              plan.field_radius_deg)), 0.005)[0]
    assert plan.chanbin > 1


def test_peel_replaces_an_outlying_block_and_keeps_a_steep_spectrum():
    """One block fitted wildly (it lost most of its data to flags, or kept interference) is
    replaced from its neighbours; a steep but smooth spectrum with noise keeps every block."""
    from dsa110_contimg.imaging.peel import replace_outlier_blocks

    freqs = np.linspace(1.31e9, 1.49e9, 16)
    rng = np.random.default_rng(1)
    steep = 15.0 * (freqs / 1.4e9) ** -1.0 * (1 + 0.003 * rng.standard_normal(16))
    faint = 0.3 + 0.05 * rng.standard_normal(16)
    flux = np.stack([steep, faint], axis=1)
    diag = np.ones_like(flux)
    same, replaced = replace_outlier_blocks(flux, diag, freqs)
    assert not replaced.any() and np.array_equal(same, flux)

    bad = flux.copy()
    bad[11] = [1175.0, -830.0]
    diag[4, 1] = 0.0  # no data left for the faint source in block 4
    fixed, replaced = replace_outlier_blocks(bad, diag, freqs)
    assert replaced[11].all() and replaced[4, 1] and replaced.sum() == 3
    assert fixed[11, 0] == pytest.approx(0.5 * (steep[10] + steep[12]), rel=1e-3)
    assert 0.1 < fixed[11, 1] < 0.5 and 0.1 < fixed[4, 1] < 0.5
    # fewer than three constrained blocks: left alone (the caller subtracts nothing)
    few = np.full((16, 1), np.nan)
    few[:2, 0] = 1.0
    out, replaced = replace_outlier_blocks(few, np.where(np.isfinite(few), 1.0, 0.0), freqs)
    assert not replaced.any()
