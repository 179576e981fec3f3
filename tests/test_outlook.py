"""The calibration outlook: transits, field-model availability, gaps, the early alert, the
`contimg calibration` command, the status-API endpoint and the start-up catalogue build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from dsa110_contimg.alerting.monitors import CalibrationOutlookMonitor
from dsa110_contimg.alerting.options import MonitorOptions
from dsa110_contimg.calibration.calset import CalSet, CalTable
from dsa110_contimg.calibration.options import CalibrationOptions
from dsa110_contimg.calibration.outlook import (
    MJD_UNIX_EPOCH,
    compute_outlook,
    gather_outlook,
    iso_utc,
    newest_pointing_dec,
)
from dsa110_contimg.catalogue import CatalogueSource, SkyCatalogue, write_sources
from dsa110_contimg.catalogue.reference import get_calibrator
from dsa110_contimg.daemon.calregistry import CalRegistry
from dsa110_contimg.errors import ConfigError
from dsa110_contimg.instrument import PrimaryBeam

DEC = 30.7
NOW = datetime(2026, 6, 1, 0, 0, tzinfo=UTC).timestamp() / 86400.0 + MJD_UNIX_EPOCH
H = 1.0 / 24.0
CAL = get_calibrator("3C286")
FAR = get_calibrator("3C147")  # dec +49.9: never within reach of dec 30.7
CANDIDATES = [CAL, FAR]


def _transit_after(mjd: float) -> float:
    """3C286's next transit, from the simulator's independent computation."""
    from astropy.utils import iers

    from dsa110_contimg.simulate.core import transit_time

    after = datetime.fromtimestamp((mjd - MJD_UNIX_EPOCH) * 86400.0, UTC)
    with iers.conf.set_temp("auto_download", False), iers.conf.set_temp("auto_max_age", None):
        t = transit_time(CAL.ra_deg, CAL.dec_deg, after)
    return t.timestamp() / 86400.0 + MJD_UNIX_EPOCH


T = _transit_after(NOW)  # ~04:47 UTC


def _calibrator_set(name: str, mid: float, bp_h: float = 24.0, g_h: float = 1.0) -> CalSet:
    bp = (mid - bp_h * H, mid + bp_h * H)
    g = (mid - g_h * H, mid + g_h * H)
    tables = (CalTable("K", Path(f"/x/{name}.K"), *bp), CalTable("BP", Path(f"/x/{name}.B"), *bp),
              CalTable("G", Path(f"/x/{name}.G"), *g), CalTable("Gp", Path(f"/x/{name}.Gp"), *g))
    return CalSet(name, tables, "24", CAL.name, mid, DEC)


def _field_set(name: str, mid: float, g_h: float = 1.0) -> CalSet:
    return CalSet(name, (CalTable("G", Path(f"/x/{name}.G"), mid - g_h * H, mid + g_h * H),),
                  "24", "field", mid, DEC)


def _bright_sky() -> list[CatalogueSource]:
    """2 Jy every degree of RA along the pointing's declination: a bright field all day."""
    return [CatalogueSource(f"S{i:03d}", float(i), DEC, 2.0) for i in range(360)]


def _cone_of(sources):
    from dsa110_contimg.catalogue import angular_separation_deg

    def cone(ra, dec, radius):
        return [s for s in sources if angular_separation_deg(ra, dec, s.ra_deg, s.dec_deg) <= radius]

    return cone


def _gaps(o):
    return [(g.missing, round((g.start_mjd - NOW) * 24, 2), round((g.end_mjd - NOW) * 24, 2))
            for g in o.gaps]


# --------------------------------------------------------------------------- transits
def test_next_transits_match_the_simulator_and_skip_far_calibrators():
    o = compute_outlook(NOW, DEC, CalibrationOptions(), bandpass=None, gain=None,
                        candidates=CANDIDATES, cone=None, hours=48)
    assert [t.calibrator for t in o.transits] == ["3C286", "3C286"]
    first, second = o.transits
    assert abs(first.mjd - T) * 86400 < 1.0
    assert abs(second.mjd - _transit_after(T + 0.5)) * 86400 < 1.0
    assert 23.9 < (second.mjd - first.mjd) * 24 < 23.95  # one sidereal day
    assert 10 < first.apparent_jy < CAL.flux_at(1.405e9)  # dimmed a little by the 0.19 deg offset
    doc = o.as_dict()
    json.dumps(doc, allow_nan=False)
    assert doc["transits"][0]["utc"] == iso_utc(first.mjd)


def test_faint_or_distant_candidates_are_not_transits():
    opts = replace(CalibrationOptions(), min_calibrator_flux_jy=100.0)
    o = compute_outlook(NOW, DEC, opts, bandpass=None, gain=None, candidates=CANDIDATES,
                        cone=None)
    assert o.transits == ()
    assert [g.missing for g in o.gaps] == ["bandpass"]
    assert "no calibrator transits before" in o.gaps[0].reason and o.gaps[0].ongoing


# --------------------------------------------------------------------------- gaps
async def _registry(tmp_path, *sets: CalSet) -> CalRegistry:
    reg = await CalRegistry.open(tmp_path / "db.sqlite")
    for s in sets:
        await reg.register(s)
    return reg


async def test_bandpass_expiring_before_the_next_transit_is_a_gap(tmp_path):
    opts = replace(CalibrationOptions(), bp_validity_h=22.0)
    reg = await _registry(tmp_path, _calibrator_set("cal", NOW - 20 * H, bp_h=22.0),
                          _field_set("fld", NOW - 0.5 * H))
    try:
        o = await gather_outlook(reg, None, DEC, opts, PrimaryBeam(), now_mjd=NOW)
        o2 = compute_outlook(NOW, DEC, opts, bandpass=_calibrator_set("cal", NOW - 20 * H, bp_h=22.0),
                             gain=_field_set("fld", NOW - 0.5 * H), candidates=CANDIDATES,
                             cone=None)
    finally:
        await reg.close()
    assert o.bandpass is not None and o.bandpass.name == "cal"
    assert abs(o.bandpass.expires_mjd - (NOW + 2 * H)) < 1e-9 and abs(o.bandpass.age_h - 20) < 1e-6
    assert o.gain is not None and o.gain.name == "fld" and o.gain.calibrator == "field"
    t = (T - NOW) * 24
    expected = [("gain", 0.5, 2.0), ("bandpass", 2.0, round(t, 2)), ("gain", round(t + 1, 2), 24.0)]
    assert _gaps(o) == expected == _gaps(o2)
    bp_gap = o.gaps[1]
    assert bp_gap.reason == (f"no bandpass after {iso_utc(NOW + 2 * H)}: next transit 3C286 at "
                             f"{iso_utc(T)}")
    assert "no catalogue" in o.gaps[0].reason and "next transit 3C286" in o.gaps[0].reason


async def test_bright_field_closes_gain_gaps_but_not_the_bandpass_gap(tmp_path):
    # a field solve needs a bandpass unless the field is bright enough for one of its own
    opts = replace(CalibrationOptions(), bp_validity_h=22.0, field_bandpass_min_jy=1e4)
    reg = await _registry(tmp_path, _calibrator_set("cal", NOW - 20 * H, bp_h=22.0),
                          _field_set("fld", NOW - 0.5 * H))
    write_sources(tmp_path / "catalogue.sqlite", _bright_sky())
    try:
        o = await gather_outlook(reg, tmp_path / "catalogue.sqlite", DEC, opts, PrimaryBeam(),
                                 now_mjd=NOW)
    finally:
        await reg.close()
    assert o.field_status == "catalogue"
    assert all(s.usable for s in o.field) and min(s.model_jy for s in o.field) > 1.0
    assert [g.missing for g in o.gaps] == ["bandpass"]  # a field solve needs a bandpass
    assert o.as_dict()["field"]["usable_fraction"] == 1.0
    # a field above CONTIMG_CAL_FIELD_BANDPASS_MIN_JY gives a bandpass of its own: no gap
    bright_bp = compute_outlook(NOW, DEC, replace(opts, field_bandpass_min_jy=1.0),
                                bandpass=_calibrator_set("cal", NOW - 20 * H, bp_h=22.0),
                                gain=_field_set("fld", NOW - 0.5 * H), candidates=CANDIDATES,
                                cone=_cone_of(_bright_sky()))
    assert bright_bp.gaps == ()


async def test_no_catalogue_gain_gap_runs_from_expiry_to_the_next_transit(tmp_path):
    opts = CalibrationOptions()
    prev = _transit_after(NOW - 1.0)  # yesterday's transit: its bandpass outlives the next one
    reg = await _registry(tmp_path, _calibrator_set("cal", prev), _field_set("fld", NOW - 0.5 * H))
    try:
        o = await gather_outlook(reg, tmp_path / "absent.sqlite", DEC, opts, PrimaryBeam(),
                                 now_mjd=NOW)
    finally:
        await reg.close()
    t = (T - NOW) * 24
    assert _gaps(o) == [("gain", 0.5, round(t - 1, 2)), ("gain", round(t + 1, 2), 24.0)]
    assert o.gaps[0].reason.startswith(f"no gain after {iso_utc(NOW + 0.5 * H)}: no catalogue")
    assert o.field_status == "no catalogue" and o.field == ()
    # with the bright field and field solves off, the same gaps remain
    off = compute_outlook(NOW, DEC, replace(opts, field_solve=False),
                          bandpass=_calibrator_set("cal", prev), gain=_field_set("fld", NOW - 0.5 * H),
                          candidates=CANDIDATES, cone=_cone_of(_bright_sky()), step_min=30)
    assert _gaps(off) == _gaps(o) and "field solves are off" in off.gaps[0].reason


def test_faint_field_is_named_with_its_flux():
    faint = [replace(s, flux_jy=0.03) for s in _bright_sky()]
    prev = _transit_after(NOW - 1.0)
    o = compute_outlook(NOW, DEC, CalibrationOptions(), bandpass=_calibrator_set("cal", prev),
                        gain=_field_set("fld", NOW - 0.5 * H), candidates=CANDIDATES,
                        cone=_cone_of(faint), step_min=30)
    assert [g.missing for g in o.gaps] == ["gain", "gain"]
    assert "field model" in o.gaps[0].reason and "< 0.2 Jy" in o.gaps[0].reason
    assert not any(s.usable for s in o.field)


def test_recent_transit_still_being_solved_counts_as_coming():
    """A transit 20 min ago whose set is not registered yet will give a bandpass soon."""
    past = _transit_after(NOW - 1.0)
    now = past + 20 / 1440
    old = _calibrator_set("old", _transit_after(NOW - 2.0))  # its bandpass lapsed minutes ago
    opts = replace(CalibrationOptions(), field_bandpass_min_jy=1e4)  # no bandpass on fields
    o = compute_outlook(now, DEC, opts, bandpass=old, gain=None,
                        candidates=CANDIDATES, cone=_cone_of(_bright_sky()), step_min=30,
                        recent_sets=[old])
    assert o.transits[0].pending and o.gaps == ()
    solved_and_failed = _calibrator_set("new", past + 2 / 1440)
    o = compute_outlook(now, DEC, opts, bandpass=old, gain=None,
                        candidates=CANDIDATES, cone=_cone_of(_bright_sky()), step_min=30,
                        recent_sets=[old, solved_and_failed])
    assert not any(t.pending for t in o.transits)
    assert o.gaps and o.gaps[0].missing == "bandpass" and o.gaps[0].ongoing


def test_newest_pointing_skips_groups_not_converted_yet():
    groups = [{"id": "b", "flags": {}}, {"id": "a", "flags": {"conversion": {"pointing_dec_deg": 30.7}}}]
    assert newest_pointing_dec(groups) == (30.7, "a")
    assert newest_pointing_dec([{"id": "c", "flags": {}}]) is None


# --------------------------------------------------------------------------- early alert
def _outlook_fn(calls):
    opts = replace(CalibrationOptions(), bp_validity_h=22.5)
    bp = _calibrator_set("cal", NOW - 20 * H, bp_h=22.5)  # bandpass expires at NOW + 2.5 h
    gain = _field_set("fld", NOW - 0.5 * H)  # gain expires at NOW + 0.5 h

    async def outlook(now_mjd):
        calls.append(now_mjd)
        return compute_outlook(now_mjd, DEC, opts, bandpass=bp, gain=gain,
                               candidates=CANDIDATES, cone=None).as_dict()

    return outlook


async def test_early_alert_fires_once_per_gap_within_the_lead_time():
    calls, sent = [], []
    mon = CalibrationOutlookMonitor(MonitorOptions(), _outlook_fn(calls), emit=sent.append)
    first = await mon.check(NOW)
    assert len(first) == 1 and sent == first
    a = first[0]
    assert a.severity.name == "WARNING" and a.category == "calibration.gap"
    assert iso_utc(NOW + 0.5 * H) in a.title and "no gain" in a.title
    assert "held" in a.message and "no catalogue" in a.message
    assert a.context["gap_key"] == CalibrationOutlookMonitor.gap_key(NOW + 0.5 * H)
    # the bandpass gap 2.5 h away is beyond the 2 h lead; nothing repeats
    assert await mon.check(NOW) == []
    assert await mon.check(NOW + 10 / 1440) == []
    # the gain gap has begun (seen as starting "now"): still the same gap; the bandpass gap is
    # now 1.75 h away: one alert for it
    later = await mon.check(NOW + 0.75 * H)
    assert [x.context["missing"] for x in later] == ["bandpass"]
    assert await mon.check(NOW + 0.8 * H) == []
    assert len(sent) == 2 and calls[0] == NOW


async def test_early_alert_survives_a_failing_outlook_and_nothing_to_report():
    async def broken(now_mjd):
        raise RuntimeError("boom")

    async def nothing(now_mjd):
        return None

    import asyncio

    stop = asyncio.Event()
    opts = replace(MonitorOptions(), cal_outlook_interval_s=10)
    task = asyncio.create_task(CalibrationOutlookMonitor(opts, broken).run(stop, first_delay_s=0.01))
    await asyncio.sleep(0.1)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert await CalibrationOutlookMonitor(opts, nothing).check(NOW) == []


# --------------------------------------------------------------------------- CLI
def _cli(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    env["CONTIMG_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "calibration", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_json_lists_the_next_transits(tmp_path):
    r = _cli(tmp_path, "--dec", "30.7", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["pointing_dec_deg"] == 30.7 and doc["hours"] == 24
    assert [t["calibrator"] for t in doc["transits"]] == ["3C286"]
    assert doc["bandpass"] is None and doc["gaps"][0]["missing"] == "bandpass"
    assert not (tmp_path / "state").exists()  # read only: nothing created


def test_cli_without_pointing_exits_2_with_one_line(tmp_path):
    r = _cli(tmp_path)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "--dec" in r.stderr


async def test_cli_takes_the_pointing_from_the_newest_converted_group(tmp_path):
    from dsa110_contimg.config import QueueOptions, load_settings
    from dsa110_contimg.daemon.commands import calibration_outlook
    from dsa110_contimg.daemon.queue import GroupQueue

    s = load_settings({"CONTIMG_STATE_DIR": str(tmp_path)})
    async with await GroupQueue.open(s.queue_db, QueueOptions()) as q:
        assert await calibration_outlook(s, None, 24.0) is None  # no group converted yet
        await q.create_group("2026-06-01T04:46:06")
        await q.set_flag("2026-06-01T04:46:06", "conversion", {"pointing_dec_deg": 30.2})
    o = await calibration_outlook(s, None, 6.0)
    assert o.pointing_dec_deg == 30.2 and o.pointing_source == "group 2026-06-01T04:46:06"
    assert o.hours == pytest.approx(6.0)


# --------------------------------------------------------------------------- API
async def test_api_serves_the_outlook(tmp_path):
    from dsa110_contimg.config import QueueOptions, load_settings
    from dsa110_contimg.daemon.api import StatusAPI
    from dsa110_contimg.daemon.queue import GroupQueue
    from dsa110_contimg.daemon.service import outlook_provider

    s = load_settings({"CONTIMG_STATE_DIR": str(tmp_path)})
    queue = await GroupQueue.open(s.queue_db, QueueOptions())
    registry = await CalRegistry.open(s.queue_db)
    provider = outlook_provider(s, registry, queue)
    api = StatusAPI("127.0.0.1", 0, "", tmp_path, {"calibration_outlook": provider})
    port = await api.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.get("/api/calibration/outlook")
            assert r.status_code == 503 and "pointing" in r.json()["error"]
            await queue.create_group("2026-06-01T04:46:06")
            await queue.set_flag("2026-06-01T04:46:06", "conversion", {"pointing_dec_deg": DEC})
            r = await c.get("/api/calibration/outlook")
            assert r.status_code == 200
            doc = r.json()
            assert doc["pointing_dec_deg"] == DEC and doc["transits"][0]["calibrator"] == "3C286"
            assert (await c.post("/api/calibration/outlook")).status_code == 404
        bare = StatusAPI("127.0.0.1", 0, "", tmp_path, {})
        assert (await bare.route("GET", "/api/calibration/outlook", {})).status == 404
    finally:
        await api.stop()
        await registry.close()
        await queue.close()


# --------------------------------------------------------------------------- start-up build
async def test_startup_builds_the_catalogue_from_the_configured_file(tmp_path):
    from dsa110_contimg.config import load_settings
    from dsa110_contimg.daemon.service import ensure_catalogue

    src = tmp_path / "field.csv"
    src.write_text("name,ra_deg,dec_deg,flux_jy\nA,10.0,30.7,1.5\nB,11.0,30.9,0.4\n")
    s = load_settings({"CONTIMG_STATE_DIR": str(tmp_path / "state"),
                       "CONTIMG_CAL_FIELD_CATALOGUE": str(src)})
    report = await ensure_catalogue(s)
    assert report is not None and s.catalogue_db.is_file()
    with SkyCatalogue.open(s.catalogue_db) as cat:
        assert {x.name for x in cat.cone(10.5, 30.8, 1.0)} == {"A", "B"}
    assert await ensure_catalogue(s) is None  # current: not rebuilt
    src.write_text(src.read_text() + "C,12.0,30.7,2.0\n")
    assert await ensure_catalogue(s) is not None  # changed: rebuilt


async def test_startup_build_of_a_malformed_file_is_a_configuration_error(tmp_path):
    from dsa110_contimg.config import load_settings
    from dsa110_contimg.daemon.service import ensure_catalogue

    bad = tmp_path / "field.csv"
    bad.write_text("name,ra_deg,dec_deg,flux_jy\nA,10.0,30.7,1.5\nB,eleven,30.9,0.4\n")
    s = load_settings({"CONTIMG_STATE_DIR": str(tmp_path / "state"),
                       "CONTIMG_CAL_FIELD_CATALOGUE": str(bad)})  # the header passes the cheap check
    with pytest.raises(ConfigError) as err:
        await ensure_catalogue(s)
    msg = str(err.value)
    assert msg.startswith("CONTIMG_CAL_FIELD_CATALOGUE: ") and f"{bad}:3:" in msg
    assert "\n" not in msg and not s.catalogue_db.exists()


def test_config_check_names_the_variable_and_the_file(tmp_path):
    from dsa110_contimg.config import load_settings

    odd = tmp_path / "odd.txt"
    odd.write_text("this is not a catalogue\n")
    for path in (odd, tmp_path / "missing.csv"):
        with pytest.raises(ConfigError, match="CONTIMG_CAL_FIELD_CATALOGUE") as err:
            load_settings({"CONTIMG_CAL_FIELD_CATALOGUE": str(path)})
        assert str(path) in str(err.value)
