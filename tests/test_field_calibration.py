"""Field calibration: a group with no calibrator transit solves its gains on its own field.

Truth: tiny groups simulated with the absolute-time gain drift (phase random walk ~25 deg/h),
so the gain solved at the calibrator's transit is tens of degrees wrong three hours later.
The field group is solved against the simulator's survey catalogue of its sky (3 % flux
errors, no spectral indices) with the calibrator's K and BP, and must recover the drifted
gains; the carried-over gain, applied to the same group, must not.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from conftest import convert_groups_isolated
from dsa110_contimg.calibration.calset import CalSet
from dsa110_contimg.calibration.fieldsolve import FIELD_CALIBRATOR, registered_part
from dsa110_contimg.calibration.options import CalibrationOptions
from dsa110_contimg.calibration.stage import CalibrationInputs, calibrate_group
from dsa110_contimg.daemon.calregistry import CalRegistry
from dsa110_contimg.errors import CalibrationUnavailable
from dsa110_contimg.qa.calibration import check_calibration_quality
from dsa110_contimg.qa.options import CalQAThresholds
from dsa110_contimg.simulate import core
from dsa110_contimg.simulate.survey import CATALOGUE_NAME
from test_calibration import gain_errors

pytestmark = pytest.mark.slow

OPTIONS = CalibrationOptions()
QA = CalQAThresholds()
MJD_JD = 2400000.5
SEED = 11


@pytest.fixture(scope="module")
def drift_groups(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """A calibrator group (3C286 transits) and a field group 3 h later, gains drifting."""
    out = tmp_path_factory.mktemp("drift")
    cal_t = core.simulate_groups(out / "cal", preset="tiny", groups=1, seed=SEED,
                                 gain_drift=True)[0]
    start = datetime.fromisoformat(cal_t["group_id"]).replace(tzinfo=UTC) + timedelta(hours=3)
    field_t = core.simulate_groups(out / "field", preset="tiny", groups=1, seed=SEED,
                                   calibrator="none", start=start,
                                   dec_deg=cal_t["pointing"]["dec_deg"], gain_drift=True)[0]
    assert not any(s["transits_in_group"] for s in field_t["sources"])
    res = convert_groups_isolated(out / "cal", [cal_t], out / "conv_cal")
    res += convert_groups_isolated(out / "field", [field_t], out / "conv_field")
    return {"cal": (Path(res[0].ms_path), cal_t), "field": (Path(res[1].ms_path), field_t),
            "catalogue": (out / "field" / CATALOGUE_NAME, {})}


def _inputs(ms: Path, truth: dict, work: Path, **kw) -> CalibrationInputs:
    dest = work / ms.name
    shutil.copytree(ms, dest)
    return CalibrationInputs(group_id=truth["group_id"], ms_path=dest,
                             caltable_dir=work / "caltables",
                             pointing_dec_deg=truth["pointing"]["dec_deg"],
                             mid_mjd=truth["mid_jd"] - MJD_JD, **kw)


@pytest.fixture(scope="module")
def calibrator_set(drift_groups, tmp_path_factory) -> CalSet:
    ms, truth = drift_groups["cal"]
    res = calibrate_group(_inputs(ms, truth, tmp_path_factory.mktemp("calset")), OPTIONS)
    assert res.mode == "solved" and res.new_set is not None
    return res.new_set


def test_drift_makes_the_carried_gain_wrong_and_the_field_solve_recovers_it(
        drift_groups, calibrator_set, tmp_path):
    ms, truth = drift_groups["field"]
    catalogue = drift_groups["catalogue"][0]
    opts = replace(OPTIONS, field_catalogue=str(catalogue))
    carried = calibrate_group(_inputs(ms, truth, tmp_path / "applied",
                                      apply_set=calibrator_set), replace(opts, field_solve=False))
    assert carried.mode == "applied"
    stale = gain_errors(calibrator_set, carried.ms_path, truth)
    assert stale["phase_rms_deg"] > 20.0, stale  # three hours of drift

    inp = _inputs(ms, truth, tmp_path / "field", apply_set=calibrator_set,
                  bandpass_set=calibrator_set)
    res = calibrate_group(inp, opts)
    assert res.mode == "field", res.notes
    assert res.calibrator is None and res.new_set is not None
    fset = res.new_set
    assert fset.calibrator == FIELD_CALIBRATOR
    assert {t.kind for t in fset.tables} == {"K", "BP", "G"}
    # K and BP are the calibrator's own tables; only G is new, and only G is registered
    assert fset.table("BP").path == calibrator_set.table("BP").path
    assert [t.kind for t in registered_part(fset).tables] == ["G"]
    err = gain_errors(fset, inp.ms_path, truth)
    print("field recovery:", json.dumps({k: round(v, 4) for k, v in err.items()}))
    # the tiny array's own calibrator solve reaches 1.5 deg (test_calibration); the field
    # solve adds the field's noise and the survey's position errors (removed as a gradient)
    assert err["phase_rms_detrended_deg"] <= 2.0, err
    assert err["gradient_offset_beams"] <= 0.1, err
    assert err["amp_rms"] <= 0.02, err
    assert err["abs_amp_rms"] <= 0.03, err  # flux scale carried from the calibrator
    model = fset.params["field_model"]
    assert model["n_sources"] >= 1 and model["model_apparent_jy"] >= OPTIONS.field_min_model_jy
    assert all(0.9 < r < 1.1 for r in fset.params["model_scale_ratio"])
    assert res.step_durations["model"] > 0 and res.step_durations["Gp"] > 0
    qa = check_calibration_quality(fset, inp.ms_path, QA)
    assert qa.passed, qa.reason


async def test_field_set_is_registered_as_gain_only(calibrator_set, tmp_path):
    """A registered field solution supplies the gain, never a bandpass of its own."""
    reg = await CalRegistry.open(tmp_path / "contimg.sqlite", OPTIONS)
    try:
        await reg.register(calibrator_set)
        mid = calibrator_set.mid_mjd + 3 / 24
        assert await reg.find_valid(mid, calibrator_set.dec_deg) is None  # G expired
        bp = await reg.find_bandpass(mid, calibrator_set.dec_deg)
        assert bp is not None and bp.name == calibrator_set.name and bp.table("G") is not None
        fake_g = replace(calibrator_set.table("G"), valid_start_mjd=mid - 1 / 24,
                         valid_end_mjd=mid + 1 / 24)
        field = CalSet("later_field", (fake_g,), calibrator_set.refant, FIELD_CALIBRATOR, mid,
                       calibrator_set.dec_deg)
        await reg.register(field)
        found = await reg.find_valid(mid, calibrator_set.dec_deg)
        assert found is not None and found.params["g_set"] == "later_field"
        assert found.params["bp_set"] == calibrator_set.name
        # any declination by default; the old limit is a setting
        assert await reg.find_bandpass(mid, calibrator_set.dec_deg + 10) is not None
        limited = replace(OPTIONS, bp_max_dec_offset_deg=1.0)
        assert await reg.find_bandpass(mid, calibrator_set.dec_deg + 10, limited) is None
    finally:
        await reg.close()


async def test_a_recent_passing_bandpass_check_is_found_per_bandpass_and_declination(
        calibrator_set, tmp_path):
    reg = await CalRegistry.open(tmp_path / "contimg.sqlite", OPTIONS)
    dec, mid = calibrator_set.dec_deg, calibrator_set.mid_mjd + 3 / 24
    g = calibrator_set.table("G")
    try:
        await reg.register(calibrator_set)
        for name, t, res in (("checked", mid, {"available": True}),
                             ("unchecked", mid + 0.2 / 24, {"available": False, "reason": "x"}),
                             ("too noisy", mid + 0.3 / 24,
                              {"available": True, "noise_phase_rms_deg": 6.5}),
                             ("cited", mid + 0.4 / 24, None)):
            params = {"bandpass_set": calibrator_set.name}
            if res is not None:
                params["bandpass_residual"] = res
            await reg.register(CalSet(name, (g,), calibrator_set.refant, FIELD_CALIBRATOR, t,
                                      dec, params))
        name = calibrator_set.name
        assert await reg.bandpass_checked(name, mid + 0.5 / 24, dec, 1.0,
                                          max_noise_deg=5.0) == "checked"
        assert await reg.bandpass_checked(name, mid + 0.5 / 24, dec, 1.0) == "too noisy"
        assert await reg.bandpass_checked(name, mid + 1.5 / 24, dec, 1.0) is None  # too old
        assert await reg.bandpass_checked(name, mid, dec + 2.0, 1.0) is None  # new declination
        assert await reg.bandpass_checked("another_bp", mid, dec, 1.0) is None
        assert await reg.bandpass_checked(name, mid, dec, 0.0) is None  # 0: check every group
        await reg.mark_failed("checked", "later found bad")
        await reg.mark_failed("too noisy", "later found bad")
        assert await reg.bandpass_checked(name, mid, dec, 1.0) is None
    finally:
        await reg.close()


def test_without_a_catalogue_the_group_is_held_naming_it(drift_groups, calibrator_set, tmp_path):
    ms, truth = drift_groups["field"]
    inp = _inputs(ms, truth, tmp_path, bandpass_set=calibrator_set)
    with pytest.raises(CalibrationUnavailable, match="no sky catalogue"):
        calibrate_group(inp, OPTIONS)
    broken = tmp_path / "broken.csv"
    broken.write_text("name,ra_deg\nx,1\n")
    with pytest.raises(Exception, match="broken.csv"):
        calibrate_group(inp, replace(OPTIONS, field_catalogue=str(broken)))


def test_faint_field_applies_the_gain_in_force(drift_groups, calibrator_set, tmp_path):
    ms, truth = drift_groups["field"]
    catalogue = drift_groups["catalogue"][0]
    faint = replace(OPTIONS, field_catalogue=str(catalogue), field_min_model_jy=1e4)
    inp = _inputs(ms, truth, tmp_path / "a", bandpass_set=calibrator_set,
                  apply_set=calibrator_set)
    res = calibrate_group(inp, faint)
    assert res.mode == "applied"
    assert any("too faint" in n for n in res.notes)
    inp = _inputs(ms, truth, tmp_path / "b", bandpass_set=calibrator_set)
    with pytest.raises(CalibrationUnavailable, match="too faint"):
        calibrate_group(inp, faint)


def test_drift_is_continuous_across_separate_runs(tmp_path):
    """Two runs with one seed see one drift: the gains depend on absolute time only."""
    from dsa110_contimg.simulate.gains import evaluate_gains

    a = core.simulate_groups(tmp_path / "a", preset="tiny", groups=2, seed=3, gain_drift=True)
    b = core.simulate_groups(tmp_path / "b", preset="tiny", groups=1, seed=3, gain_drift=True,
                             start=datetime.fromisoformat(a[1]["group_id"]).replace(tzinfo=UTC))
    assert json.dumps(a[1]["gains"], sort_keys=True) == json.dumps(b[0]["gains"], sort_keys=True)
    f = np.array([1.4e9])
    t = np.array(a[1]["times_jd"])
    ga = evaluate_gains(a[1]["gains"], f, t, 1.4e9, 1.875e8, a[1]["mid_jd"])
    gb = evaluate_gains(b[0]["gains"], f, t, 1.4e9, 1.875e8, a[1]["mid_jd"])
    assert np.array_equal(ga, gb)
    # and the drift is real: an hour later the phases have moved by tens of degrees
    later = evaluate_gains(a[1]["gains"], f, t + 1 / 24, 1.4e9, 1.875e8, a[1]["mid_jd"] + 1 / 24)
    moved = np.degrees(np.angle(later / ga))
    assert 10 < np.sqrt(np.mean(moved ** 2)) < 60
    plain = core.simulate_groups(tmp_path / "c", preset="tiny", groups=1, seed=3)[0]
    assert "drift" not in plain["gains"]


def _solved_elsewhere(tmp_path_factory, name: str, seed: int, calibrator: str) -> CalSet:
    out = tmp_path_factory.mktemp(name)
    t = core.simulate_groups(out / "raw", preset="tiny", groups=1, seed=seed,
                             calibrator=calibrator, gain_drift=True)[0]
    ms = Path(convert_groups_isolated(out / "raw", [t], out / "conv")[0].ms_path)
    res = calibrate_group(_inputs(ms, t, out / "work"), OPTIONS)
    assert res.mode == "solved" and res.new_set is not None
    return res.new_set


def test_bandpass_from_another_declination_is_used_and_a_wrong_one_refused(
        drift_groups, tmp_path_factory, tmp_path):
    """The bandpass is instrumental: one solved on 3C147 (dec +50) calibrates the field group
    at dec +31. A bandpass of another instrument state (another seed's gains) is refused."""
    ms, truth = drift_groups["field"]
    opts = replace(OPTIONS, field_catalogue=str(drift_groups["catalogue"][0]))
    other_dec = _solved_elsewhere(tmp_path_factory, "dec50", SEED, "3C147")
    assert abs(other_dec.dec_deg - truth["pointing"]["dec_deg"]) > 15
    inp = _inputs(ms, truth, tmp_path / "ok", bandpass_set=other_dec)
    res = calibrate_group(inp, opts)
    assert res.mode == "field"
    err = gain_errors(res.new_set, inp.ms_path, truth)
    assert err["phase_rms_detrended_deg"] <= 2.0 and err["amp_rms"] <= 0.02, err
    qa = check_calibration_quality(res.new_set, inp.ms_path, QA)
    assert qa.passed, qa.reason
    assert qa.metrics["bp_residual_phase_rms_deg"] < QA.max_bp_residual_phase_deg
    # a group following a passing check cites it instead of repeating the residual solve
    inp = _inputs(ms, truth, tmp_path / "cited", bandpass_set=other_dec,
                  bandpass_checked_by="earlier_field")
    res = calibrate_group(inp, opts)
    assert res.mode == "field" and "bandpass_check" not in res.step_durations
    assert "bandpass_residual" not in res.new_set.params
    qa = check_calibration_quality(res.new_set, inp.ms_path, QA)
    assert qa.passed and qa.metrics["bandpass_checked_by"] == "earlier_field"

    wrong = _solved_elsewhere(tmp_path_factory, "wrong", SEED + 1, "3C286")
    inp = _inputs(ms, truth, tmp_path / "wrong", bandpass_set=wrong)
    res = calibrate_group(inp, opts)
    qa = check_calibration_quality(res.new_set, inp.ms_path, QA)
    assert not qa.passed
    assert "does not fit" in qa.reason, qa.reason


def test_without_a_bandpass_a_bright_field_solves_the_whole_chain(drift_groups, tmp_path):
    """No transit yet: a field bright enough (CONTIMG_CAL_FIELD_BANDPASS_MIN_JY) gives K, BP
    and G of its own; a fainter one leaves the group held, saying so."""
    ms, truth = drift_groups["field"]
    opts = replace(OPTIONS, field_catalogue=str(drift_groups["catalogue"][0]))
    inp = _inputs(ms, truth, tmp_path / "held")
    with pytest.raises(CalibrationUnavailable, match="CONTIMG_CAL_FIELD_BANDPASS_MIN_JY"):
        calibrate_group(inp, opts)
    inp = _inputs(ms, truth, tmp_path / "bp")
    res = calibrate_group(inp, replace(opts, field_bandpass_min_jy=0.5))
    assert res.mode == "field" and res.new_set is not None
    fset = res.new_set
    assert fset.calibrator == FIELD_CALIBRATOR and {"K", "BP", "G"} <= {t.kind for t in fset.tables}
    assert [t.kind for t in registered_part(fset).tables] == [t.kind for t in fset.tables]
    assert any("solved on the field" in n for n in res.notes)
    err = gain_errors(fset, inp.ms_path, truth)
    print("field bandpass recovery:", json.dumps({k: round(v, 4) for k, v in err.items()}))
    # ~1.5 Jy on 16 antennas gives a bandpass S/N of ~20 per channel and antenna: ~4 deg and
    # ~10 % per channel (the reason the default asks for 5 Jy); uncalibrated, the phases are
    # off by tens of degrees and the amplitudes by 15 %
    assert err["phase_rms_detrended_deg"] <= 6.0 and err["amp_rms"] <= 0.15, err
    assert err["abs_amp_rms"] <= 0.15, err
    qa = check_calibration_quality(fset, inp.ms_path, QA)
    assert qa.passed, qa.reason


def test_a_corrupt_catalogue_at_run_time_holds_the_group_naming_it(drift_groups, calibrator_set,
                                                                  tmp_path):
    """A catalogue file that is garbage, or an SQLite file cut short: the group is held and
    the reason names the file; the stage does not crash."""
    from dsa110_contimg.catalogue import write_sources
    from dsa110_contimg.catalogue.sources import CatalogueSource

    ms, truth = drift_groups["field"]
    garbage = tmp_path / "catalogue.sqlite"
    garbage.write_bytes(b"\x00not a catalogue\n" * 100)
    inp = _inputs(ms, truth, tmp_path / "a", bandpass_set=calibrator_set, catalogue_db=garbage)
    with pytest.raises(CalibrationUnavailable, match=r"sky catalogue unusable.*catalogue\.sqlite"):
        calibrate_group(inp, OPTIONS)
    good = tmp_path / "good.sqlite"
    write_sources(good, [CatalogueSource(f"S{i}", float(i), 30.0, 1.0) for i in range(2000)])
    cut = tmp_path / "cut.sqlite"
    cut.write_bytes(good.read_bytes()[:8192])
    inp = _inputs(ms, truth, tmp_path / "b", bandpass_set=calibrator_set, catalogue_db=cut)
    with pytest.raises(CalibrationUnavailable, match=r"cut\.sqlite"):
        calibrate_group(inp, OPTIONS)


def test_reruns_skip_only_when_nothing_that_decides_the_result_changed(
        drift_groups, calibrator_set, tmp_path):
    """A finished field solve is skipped on a re-run with the same inputs; another beam model
    or another bandpass solves again. A calibrator group re-run with its own earlier set as
    the bandpass in force solves again instead of borrowing (and deleting) its own tables."""
    ms, truth = drift_groups["field"]
    opts = replace(OPTIONS, field_catalogue=str(drift_groups["catalogue"][0]))
    inp = _inputs(ms, truth, tmp_path / "f", bandpass_set=calibrator_set)
    assert calibrate_group(inp, opts).mode == "field"
    assert calibrate_group(inp, opts).skipped
    from dsa110_contimg.instrument import PrimaryBeam

    wider = replace(inp, beam=PrimaryBeam("gaussian", 4.65, 1.2))
    again = calibrate_group(wider, opts)
    assert not again.skipped and again.new_set.params["beam"]["kind"] == "gaussian"

    cms, ctruth = drift_groups["cal"]
    cinp = _inputs(cms, ctruth, tmp_path / "c")
    first = calibrate_group(cinp, OPTIONS)
    rerun = calibrate_group(replace(cinp, bandpass_set=first.new_set), replace(OPTIONS, min_snr=2.0))
    assert rerun.mode == "solved" and not rerun.skipped
    assert all((Path(t.path) / "table.dat").exists() for t in rerun.new_set.tables)


def test_a_residual_bandpass_check_too_noisy_to_tell_warns_instead_of_failing():
    """A faint field: the residual's noise per block is above the error the check looks for,
    so the check cannot fail the group; a clean field with the same residual does."""
    from dsa110_contimg.qa.calibration import _field_checks
    from dsa110_contimg.qa.result import GateBuilder

    def gate(noise):
        g = GateBuilder("calibration")
        _field_checks(g, {"field_model": {"model_apparent_jy": 1.0},
                          "bandpass_residual": {"available": True, "phase_rms_deg": 19.7,
                                                "amp_rms": 0.01,
                                                "noise_phase_rms_deg": noise}}, QA)
        return g.result()

    noisy, clean = gate(6.5), gate(1.0)
    assert noisy.passed and any("could not be checked" in w for w in noisy.warnings)
    assert not clean.passed and "does not fit" in clean.reason
