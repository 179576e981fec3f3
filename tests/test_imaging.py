"""Imaging stage end to end with real CASA on a perfectly calibrated tiny group.

The MS is calibrated from the simulator's truth gains (``imaging.simcal``), so these tests
judge imaging alone: positions, pb-corrected fluxes, products, headers, idempotency and the
refusal of unusable MSs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from structlog.testing import capture_logs

from dsa110_contimg.errors import BadInputError
from dsa110_contimg.imaging.options import ImagingOptions
from dsa110_contimg.imaging.pbcor import quiet_wcs as WCS
from dsa110_contimg.imaging.stage import ImagingInputs, _finished, image_group, product_names
from dsa110_contimg.instrument import PrimaryBeam
from dsa110_contimg.products import product_dir
from dsa110_contimg.qa.image import Beam, check_image_quality, fit_point_source
from dsa110_contimg.qa.options import ImageQAThresholds
from dsa110_contimg.simulate.truthcal import apply_truth_gains

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_calibrated_ms(tiny_ms, tiny_group, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the converted tiny group, perfectly calibrated from the injected gains."""
    _, truth = tiny_group
    ms = tmp_path_factory.mktemp("imaging_ms") / "tiny_cal.ms"
    shutil.copytree(tiny_ms, ms)
    info = apply_truth_gains(ms, truth)
    assert info["rows_flagged"] > 0  # autocorrelations and the dead station
    return ms, truth


@pytest.fixture(scope="module")
def imaged(tiny_calibrated_ms, tmp_path_factory):
    ms, truth = tiny_calibrated_ms
    out = tmp_path_factory.mktemp("imaging_products")
    gid = truth["group_id"]
    inputs = ImagingInputs(gid, ms, product_dir(out, gid), "corrected", "3C286")
    t0 = time.monotonic()
    result = image_group(inputs, ImagingOptions())
    print(f"\nimage_group (tiny, standard tier): {time.monotonic() - t0:.1f} s, "
          f"tclean {result.tclean_s:.1f} s, {result.nmajordone} major cycles, {result.stopreason}")
    return inputs, result, truth


def _fits2d(path: Path) -> tuple[np.ndarray, fits.Header]:
    with fits.open(path) as hdul:
        return np.squeeze(hdul[0].data).astype(float), hdul[0].header.copy()


def test_recovers_injected_sources_after_pbcor(imaged):
    """Every source > 10 x rms (apparent) with pb_mean > 0.3: position within 1/5 beam and
    pb-corrected flux within 5 % of the truth at band centre. Flux = amplitude of a fixed-shape
    restoring-beam fit in the pbcor image (the peak pixel alone is up to 3 % low at 5 px/beam)."""
    _, result, truth = imaged
    pbcor, header = _fits2d(result.pbcor_fits)
    wcs = WCS(header)
    beam = Beam.from_header(header)
    rows = []
    for src in truth["sources"]:
        if src["apparent_flux_jy"] <= 10 * result.rms_jy or src["pb_mean"] <= 0.3:
            continue
        fit = fit_point_source(pbcor, wcs, src["ra_deg"], src["dec_deg"], beam)
        assert fit is not None, f"{src['name']} not found"
        ratio = fit["flux_jy"] / src["flux_at_band_centre_jy"]
        rows.append((src["name"], src["flux_at_band_centre_jy"], fit["flux_jy"], ratio,
                     fit["offset_beams"], fit["offset_arcsec"], src["pb_mean"]))
    print("\nsource  truth_Jy  fit_Jy  ratio  offset_beams  offset_arcsec  pb_mean")
    for r in rows:
        print(f"{r[0]:7s} {r[1]:8.4f} {r[2]:7.4f} {r[3]:6.4f} {r[4]:12.3f} {r[5]:13.1f} {r[6]:8.3f}")
    assert len(rows) == len(truth["sources"]) >= 4, "every tiny-preset source is bright enough"
    for name, _, _, ratio, off_beams, _, _ in rows:
        assert abs(ratio - 1) < 0.05, f"{name}: flux ratio {ratio:.4f}"
        assert off_beams < 0.2, f"{name}: offset {off_beams:.3f} beam"


def test_drift_averaged_beam_matches_the_simulated_beam(imaged):
    """The pb model at each source equals the simulator's time-averaged beam (pb_mean)."""
    _, result, truth = imaged
    pb, header = _fits2d(result.pb_fits)
    wcs = WCS(header).celestial
    for src in truth["sources"]:
        x, y = wcs.world_to_pixel_values(src["ra_deg"], src["dec_deg"])
        from scipy.ndimage import map_coordinates

        value = map_coordinates(pb, [[float(y)], [float(x)]], order=3)[0]
        # a single mid-group beam would be ~0.002 off here (tiny groups drift 0.28 deg)
        assert value == pytest.approx(src["pb_mean"], abs=3e-4), src["name"]


def test_products_headers_and_plan(imaged):
    inputs, result, _ = imaged
    names = product_names(inputs.product_dir, inputs.group_id)
    for key in ("image", "pbcor", "pb", "residual", "quicklook", "record"):
        assert names[key].exists(), key
    assert result.quicklook_png == names["quicklook"]
    assert names["quicklook"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert names["quicklook"].stat().st_size > 20_000
    assert not list(inputs.product_dir.parent.glob(".*staging*")), "staging dir cleaned up"
    image, h = _fits2d(result.image_fits)
    assert image.shape == (result.imsize, result.imsize)
    assert h["TELESCOP"] == "DSA-110" and h["ORIGIN"].startswith("dsa110-contimg")
    assert h["OBSERVER"] and h["DATE-OBS"].startswith(inputs.group_id[:10])
    assert h["RESTFRQ"] == pytest.approx(result.freq_hz)
    assert h["BMAJ"] * 3600 == pytest.approx(result.bmaj_arcsec, rel=1e-4)
    assert h["BMIN"] * 3600 == pytest.approx(result.bmin_arcsec, rel=1e-4)
    assert "BPA" in h and h["BUNIT"].lower() == "jy/beam"
    assert h["GROUPID"] == inputs.group_id and h["DATACOL"] == "corrected"
    assert abs(h["CDELT2"]) * 3600 == pytest.approx(result.cell_arcsec, rel=1e-6)
    pbcor, ph = _fits2d(result.pbcor_fits)
    pb, _ = _fits2d(result.pb_fits)
    assert ph["PBCOR"] is True and ph["PBLEVEL"] == pytest.approx(0.2)
    assert np.all(np.isnan(pbcor[pb < 0.2])) and np.all(np.isfinite(pbcor[pb >= 0.2]))
    inside = pb >= 0.2
    assert np.allclose(pbcor[inside], image[inside] / pb[inside], rtol=1e-5, atol=1e-7)
    # cell ~ beam / 5 from the longest baseline; the fitted minor axis is close to lambda/B
    assert 3.5 < result.bmin_arcsec / result.cell_arcsec < 6.5
    assert result.plan["pb_at_edge"] <= 0.2 + 0.01
    assert result.tclean_params["threshold"].endswith("Jy")
    assert float(result.tclean_params["threshold"][:-2]) > 0
    record = json.loads(names["record"].read_text())
    assert record["result"]["image_fits"] == str(result.image_fits)


def test_image_qa_passes_and_calibrator_flux_matches_catalogue(imaged):
    _, result, _ = imaged
    qa = check_image_quality(result, ImageQAThresholds(), calibrator="3C286")
    assert qa.passed, qa.failures
    cal = qa.metrics["calibrator"]
    assert abs(cal["ratio"] - 1) < 0.05, cal
    assert qa.metrics["rms_jy"] == pytest.approx(result.rms_jy, rel=1e-6)
    assert qa.metrics["dynamic_range"] > 200
    assert qa.duration_s > 0
    # the same verdict from the FITS path alone (re-judging archived images)
    again = check_image_quality(result.image_fits, ImageQAThresholds(), calibrator="3C286")
    assert again.passed and again.metrics["calibrator"]["ratio"] == pytest.approx(cal["ratio"])


def test_scipy_masks_clean_as_tclean_automask_does(imaged, tmp_path):
    """The same group imaged with tclean's own auto-multithresh: the scipy masker follows its
    rules, so clean finds the same components and the images agree."""
    inputs, result, _ = imaged
    assert ImagingOptions().masker == "scipy" and result.masks
    casa = image_group(replace(inputs, product_dir=product_dir(tmp_path, inputs.group_id)),
                       replace(ImagingOptions(), masker="casa"))
    assert not casa.masks
    print(f"\nscipy {result.iterdone} it, rms {result.rms_jy:.6g}, peak {result.peak_jy:.6g}; "
          f"casa {casa.iterdone} it, rms {casa.rms_jy:.6g}, peak {casa.peak_jy:.6g}")
    assert casa.iterdone == pytest.approx(result.iterdone, rel=0.02, abs=2)
    assert casa.rms_jy == pytest.approx(result.rms_jy, rel=0.005)
    assert casa.peak_jy == pytest.approx(result.peak_jy, rel=0.005)
    a, _ = _fits2d(result.image_fits)
    b, _ = _fits2d(casa.image_fits)
    assert np.abs(a - b).max() < 0.5 * result.rms_jy


def test_bright_calibrator_is_peeled_with_its_drift_beam_and_restored(imaged):
    """3C286 (15 Jy) is fitted along the drift, subtracted before clean, restored after."""
    _, result, truth = imaged
    cal = next(s for s in truth["sources"] if s["name"] == "3C286")
    (peeled,) = [p for p in result.peeled if p["name"] == "3C286"]
    assert peeled["restored"]
    assert peeled["flux_jy"] == pytest.approx(cal["flux_at_band_centre_jy"], rel=0.01)
    assert peeled["spectral_index"] == pytest.approx(cal["spectral_index"], abs=0.1)
    assert "peel" in result.timings_s and "restore" in result.timings_s
    # only faint emission is left for clean: the mask may go deeper per cycle, two cycles
    from dsa110_contimg.imaging.params import NMAJOR_AFTER_PEEL, SIDELOBETHRESHOLD_AFTER_PEEL

    assert result.tclean_params["sidelobethreshold"] == SIDELOBETHRESHOLD_AFTER_PEEL
    assert result.tclean_params["nmajor"] == NMAJOR_AFTER_PEEL
    assert result.nmajordone <= NMAJOR_AFTER_PEEL + 1  # + the initial residual
    # the masks came from imaging.cleanmask, never below auto-multithresh's noise threshold
    assert result.masks and result.masks[0]["pixels"] > 0
    assert all(m["threshold_jy"] >= 4.25 * m["rms_jy"] * (1 - 1e-9) for m in result.masks)
    _, header = _fits2d(result.image_fits)
    assert header["PEEL1"].startswith("3C286 ") and "restored" in header.comments["PEEL1"]
    # the residual no longer holds it: nothing of 15 Jy x beam is left at its position
    image, header = _fits2d(result.residual_fits)
    x, y = WCS(header).celestial.world_to_pixel_values(cal["ra_deg"], cal["dec_deg"])
    assert abs(image[int(round(float(y))), int(round(float(x)))]) < 0.01 * cal["apparent_flux_jy"]


def test_survey_catalogue_sources_are_peeled_and_restored_at_their_fitted_flux(
        tiny_calibrated_ms, tiny_group, tmp_path):
    """With the simulated sky's survey catalogue (3 % flux scatter, no spectral indices) every
    field source is fitted along the drift and restored: fluxes within 2 % of the truth."""
    from dsa110_contimg.simulate.survey import CATALOGUE_NAME

    ms, truth = tiny_calibrated_ms
    gid = truth["group_id"]
    inputs = ImagingInputs(gid, ms, product_dir(tmp_path, gid), "corrected", "3C286",
                           str(tiny_group[0] / CATALOGUE_NAME))
    result = image_group(inputs, ImagingOptions())
    fitted = {p["name"]: p for p in result.peeled}
    for src in truth["sources"]:
        p = fitted[src["name"]]
        assert p["restored"]
        assert p["flux_jy"] == pytest.approx(src["flux_at_band_centre_jy"], rel=0.02), src["name"]
    pbcor, header = _fits2d(result.pbcor_fits)
    for src in truth["sources"]:
        if src["pb_mean"] > 0.3:
            fit = fit_point_source(pbcor, WCS(header), src["ra_deg"], src["dec_deg"],
                                   Beam.from_header(header))
            assert fit["flux_jy"] == pytest.approx(src["flux_at_band_centre_jy"], rel=0.02)


def test_peeling_subtracts_the_fitted_source_from_the_visibilities(tiny_calibrated_ms, tmp_path):
    import casatasks

    from dsa110_contimg.calibration.casarun import open_table
    from dsa110_contimg.catalogue.reference import get_calibrator
    from dsa110_contimg.imaging.msinfo import pointing_icrs, summarize_ms
    from dsa110_contimg.imaging.peel import peel_sources, select_bright

    ms, truth = tiny_calibrated_ms
    copy = tmp_path / "copy.ms"
    casatasks.mstransform(vis=str(ms), outputvis=str(copy), datacolumn="corrected",
                          keepflags=False)
    s = summarize_ms(ms, "corrected")
    times = np.asarray(s.times_mjd_s)
    tra, tdec = pointing_icrs(s.pointing_az_deg, s.pointing_alt_deg, np.asarray(s.array_itrf_m),
                              times)
    w = np.asarray(s.time_weights)
    ref = (s.freq_min_hz + s.freq_max_hz) / 2
    bright = select_bright(tra, tdec, w, ref, PrimaryBeam.airy(s.dish_diameter_m), 0.5)
    assert [c.name for c in bright] == ["3C286"]
    assert select_bright(tra, tdec, w, ref, PrimaryBeam.airy(s.dish_diameter_m), 0.0) == []  # 0: off
    with open_table(copy) as tb:
        before = tb.getcol("DATA")
    (p,), _ = peel_sources(copy, bright, s.pointing_az_deg, s.pointing_alt_deg, ref,
                        PrimaryBeam.airy(s.dish_diameter_m), tra, tdec, w)
    cal = next(x for x in truth["sources"] if x["name"] == "3C286")
    assert p.flux_jy == pytest.approx(cal["flux_at_band_centre_jy"], rel=0.01)
    assert p.catalogue_jy == pytest.approx(get_calibrator("3C286").flux_at(ref))
    with open_table(copy) as tb:
        after = tb.getcol("DATA")
    # the calibrator dominated the visibilities; what is left is the faint field and noise
    assert np.abs(after).mean() < 0.25 * np.abs(before).mean()
    # fitting again finds (almost) nothing more of it
    (again,), _ = peel_sources(copy, bright, s.pointing_az_deg, s.pointing_alt_deg, ref,
                            PrimaryBeam.airy(s.dish_diameter_m), tra, tdec, w)
    assert abs(again.flux_jy) < 0.01 * p.flux_jy


def _peel_setup(ms: Path, tmp_path: Path, name: str):
    import casatasks

    from dsa110_contimg.imaging.msinfo import pointing_icrs, summarize_ms
    from dsa110_contimg.imaging.peel import select_bright

    copy = tmp_path / name
    casatasks.mstransform(vis=str(ms), outputvis=str(copy), datacolumn="corrected",
                          keepflags=False)
    s = summarize_ms(ms, "corrected")
    tra, tdec = pointing_icrs(s.pointing_az_deg, s.pointing_alt_deg, np.asarray(s.array_itrf_m),
                              np.asarray(s.times_mjd_s))
    w = np.asarray(s.time_weights)
    ref = (s.freq_min_hz + s.freq_max_hz) / 2
    bright = select_bright(tra, tdec, w, ref, PrimaryBeam.airy(s.dish_diameter_m), 0.5)
    args = (bright, s.pointing_az_deg, s.pointing_alt_deg, ref, PrimaryBeam.airy(s.dish_diameter_m), tra, tdec, w)
    return copy, args


def test_phase_selfcal_on_the_peeled_source_removes_antenna_phase_errors(tiny_calibrated_ms,
                                                                           tmp_path):
    """Phase errors injected per antenna and integration (15 deg rms) are measured on 3C286
    and taken out: the fit and the residual match those of the clean copy."""
    from dsa110_contimg.calibration.casarun import open_table
    from dsa110_contimg.imaging.peel import peel_sources

    ms, _ = tiny_calibrated_ms
    clean, args = _peel_setup(ms, tmp_path, "clean.ms")
    corrupt, _ = _peel_setup(ms, tmp_path, "corrupt.ms")
    plain, _ = _peel_setup(ms, tmp_path, "plain.ms")
    phi = np.radians(np.random.default_rng(7).normal(0, 15, (100, 128)))
    for path in (corrupt, plain):
        with open_table(path, readonly=False) as tb:
            t, a1, a2 = tb.getcol("TIME"), tb.getcol("ANTENNA1"), tb.getcol("ANTENNA2")
            it = np.unique(t, return_inverse=True)[1]
            turn = np.exp(1j * (phi[it, a1] - phi[it, a2]))
            tb.putcol("DATA", tb.getcol("DATA") * turn[None, None])
    (ref,), sc_ref = peel_sources(clean, *args)
    (fixed,), sc = peel_sources(corrupt, *args, selfcal_min_jy=1.0)
    (unfixed,), sc_off = peel_sources(plain, *args)
    assert not sc_ref["applied"] and not sc_off["applied"] and sc["applied"]
    assert sc["phase_rms_deg"] == pytest.approx(15, rel=0.3)
    assert fixed.flux_jy == pytest.approx(ref.flux_jy, rel=0.003)
    assert unfixed.flux_jy < 0.98 * ref.flux_jy  # what the errors cost without self-calibration
    with open_table(clean) as ta, open_table(corrupt) as tb_:
        r_ref, r_fix = np.abs(ta.getcol("DATA")).mean(), np.abs(tb_.getcol("DATA")).mean()
    assert r_fix == pytest.approx(r_ref, rel=0.03)


def test_phase_gains_and_integration_chunks():
    from dsa110_contimg.imaging.peel import integration_chunks, phase_gains

    rng = np.random.default_rng(1)
    g = np.exp(1j * rng.uniform(-np.pi, np.pi, 20))
    a1, a2 = np.triu_indices(20, 1)
    est = phase_gains(g[a1] * np.conj(g[a2]) * rng.uniform(0.5, 2, len(a1)), a1, a2, 20)
    r = est * np.conj(g)
    assert np.abs(np.angle(r / r[0])).max() < 1e-5
    assert integration_chunks(np.repeat([1.0, 2, 3, 4], 5), 12) == [(0, 10), (10, 20)]
    assert integration_chunks(np.array([1.0, 2, 1]), 8) is None  # not time-ordered


def test_rerun_is_skipped_and_a_new_tier_reimages(imaged):
    inputs, result, _ = imaged
    t0 = time.monotonic()
    again = image_group(inputs, ImagingOptions())
    assert again.skipped and time.monotonic() - t0 < 5
    assert again.image_fits == result.image_fits and again.rms_jy == result.rms_jy
    quick = image_group(inputs, ImagingOptions(tier="quick"))
    assert not quick.skipped and quick.tier == "quick"
    assert quick.nmajordone <= 4  # nmajor 3 (+ the initial residual)
    assert quick.tclean_params["deconvolver"] == "hogbom"
    assert product_names(inputs.product_dir, inputs.group_id)["record"].exists()
    # re-calibration rewrites the MS's data files: the image is stale, not finished
    assert _finished(inputs, ImagingOptions(tier="quick")) is not None
    later = time.time() + 100
    for f in Path(inputs.ms_path).glob("table.f*"):
        os.utime(f, (later, later))
    assert _finished(inputs, ImagingOptions(tier="quick")) is None


def _broken_copy(src: Path, dest: Path, how: str) -> Path:
    import casatools

    shutil.copytree(src, dest)
    tb = casatools.table()
    tb.open(str(dest), nomodify=False)
    try:
        if how == "flag":
            flags = tb.getcol("FLAG")
            tb.putcol("FLAG", np.ones_like(flags))
        elif how == "nan":
            data = tb.getcol("CORRECTED_DATA")
            data[:, :, ::7] = np.nan
            tb.putcol("CORRECTED_DATA", data)
    finally:
        tb.close()
    if how == "empty":  # same structure and subtables, no rows (the storage can't remove rows)
        shutil.rmtree(dest)
        tb.open(str(src))
        try:
            tb.copy(str(dest), deep=True, valuecopy=True, norows=True).close()
        finally:
            tb.close()
    return dest


@pytest.mark.parametrize("how, reason", [("flag", "flagged"), ("nan", "NaN"),
                                         ("empty", "no rows")])
def test_unusable_ms_raises_bad_input_before_tclean(tiny_calibrated_ms, tmp_path, how, reason):
    """Refused with BadInputError (quarantine: re-running cannot help) and nothing published."""
    ms, truth = tiny_calibrated_ms
    broken = _broken_copy(ms, tmp_path / f"{how}.ms", how)
    gid = truth["group_id"]
    pdir = product_dir(tmp_path / "out", gid)
    t0 = time.monotonic()
    with pytest.raises(BadInputError, match=reason):
        image_group(ImagingInputs(gid, broken, pdir, "corrected"), ImagingOptions())
    assert time.monotonic() - t0 < 30, "refused before tclean"
    assert not pdir.exists() or not any(pdir.iterdir())
    assert not list(pdir.parent.glob(".*staging*"))


def test_missing_corrected_column_is_refused(tiny_calibrated_ms, tmp_path):
    ms, truth = tiny_calibrated_ms
    gid = truth["group_id"]
    inputs = ImagingInputs(gid, tmp_path / "nope.ms", product_dir(tmp_path, gid))
    with pytest.raises(BadInputError, match="does not exist"):
        image_group(inputs, ImagingOptions())
    with pytest.raises(BadInputError, match="MODEL_DATA"):
        image_group(replace(inputs, ms_path=ms, datacolumn="model"), ImagingOptions())


def test_nan_missed_by_the_sample_is_found_after_tclean(tiny_calibrated_ms, tmp_path,
                                                         monkeypatch):
    """One NaN row outside the sampled blocks: tclean blanks the image, the full scan finds
    the NaN, and the verdict is still BadInputError rather than a retried CASA fault."""
    import casatools

    from dsa110_contimg.imaging import msinfo

    monkeypatch.setattr(msinfo, "_SAMPLE_ROWS", 16)  # 8 blocks of 2 rows
    ms, truth = tiny_calibrated_ms
    broken = tmp_path / "one_nan.ms"
    shutil.copytree(ms, broken)
    tb = casatools.table()
    tb.open(str(broken), nomodify=False)
    try:
        nrows = tb.nrows()
        sampled = {r for s in np.linspace(0, nrows - 2, 8).astype(int) for r in (s, s + 1)}
        flags = tb.getcol("FLAG")
        row = next(r for r in range(nrows // 2, nrows)
                   if r not in sampled and not flags[:, :, r].all())
        cell = tb.getcell("CORRECTED_DATA", row)
        cell[0, 0] = np.nan
        tb.putcell("CORRECTED_DATA", row, cell)
    finally:
        tb.close()
    gid = truth["group_id"]
    with pytest.raises(BadInputError, match="1 unflagged NaN/Inf"):
        image_group(ImagingInputs(gid, broken, product_dir(tmp_path / "out", gid)),
                    ImagingOptions(tier="quick"))


def test_fingerprint_follows_the_field_catalogue_content(tmp_path):
    """A new survey catalogue peels other sources: a finished group must be imaged again."""
    from dsa110_contimg.imaging.stage import options_fingerprint

    cat = tmp_path / "cat.csv"
    cat.write_text("name,ra_deg,dec_deg,flux_jy\nA,10.0,30.0,0.5\n")
    o = ImagingOptions()
    first = options_fingerprint(o, "corrected", str(cat))
    assert first == options_fingerprint(o, "corrected", str(cat))
    assert first != options_fingerprint(o, "corrected", None)
    cat.write_text("name,ra_deg,dec_deg,flux_jy\nA,10.0,30.0,0.6\n")
    assert first != options_fingerprint(o, "corrected", str(cat))


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_product_damaged_behind_the_record_is_imaged_again(imaged, tmp_path, how):
    inputs = replace(imaged[0], product_dir=tmp_path / imaged[0].product_dir.name)
    options = ImagingOptions(tier="quick")
    result = image_group(inputs, options)
    record = json.loads(product_names(inputs.product_dir, inputs.group_id)["record"].read_text())
    assert record["stamps"]["image"]["size"] == result.image_fits.stat().st_size
    assert image_group(inputs, options).skipped
    victim = result.pbcor_fits
    size = victim.stat().st_size
    if how == "empty":  # renamed into place, data lost in a power cut
        victim.write_bytes(b"")
    else:  # same size, the last block never written: zeros
        data = bytearray(victim.read_bytes())
        data[-2880:] = bytes(2880)
        victim.write_bytes(bytes(data))
    with capture_logs() as logs:
        assert _finished(inputs, options) is None
    assert [(e["event"], e["path"]) for e in logs] == [("imaging.redo", str(victim))]
    again = image_group(inputs, options)
    assert not again.skipped and again.pbcor_fits == victim and victim.stat().st_size == size
    assert image_group(inputs, options).skipped
