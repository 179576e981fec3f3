"""The product, end to end: the real daemon as a subprocess on simulated groups, real CASA."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime, timedelta

import httpx
import pytest

from daemon_harness import Daemon
from dsa110_contimg.conversion.workarea import work_dir
from dsa110_contimg.simulate import simulate_groups

pytestmark = pytest.mark.slow

STAGE_TIMEOUT = 900


def _done(n):
    return lambda st: len(st) >= n and all(s == "done" for s in st.values())


def _products(d: Daemon, gid: str):
    day = gid[:10]
    return d.output / day / gid


def _group_row(d: Daemon, gid: str) -> dict:
    with d.db() as con:
        row = con.execute("SELECT * FROM groups WHERE id = ?", (gid,)).fetchone()
    out = dict(row)
    out["flags"] = json.loads(out["flags"] or "{}")
    return out


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_two_groups_calibrator_then_applied_set_status_api_and_sigterm(tmp_path):
    d = Daemon(tmp_path)
    d.start()
    truths = simulate_groups(d.input, preset="tiny", groups=2, seed=11)
    g1, g2 = (t["group_id"] for t in truths)
    d.wait_for(_done(2), STAGE_TIMEOUT, "both groups done")

    status = json.loads(d.cli("status", "--json").stdout)
    assert status["counts"]["done"] == 2 and status["counts"]["quarantined"] == 0
    for gid in (g1, g2):
        pdir = _products(d, gid)
        assert list(pdir.glob("*.pbcor.fits")) and list(pdir.glob("*.image.fits")), gid
        qa = json.loads((pdir / "qa.json").read_text())
        assert qa["passed"] and set(qa["stages"]) == {"conversion", "calibration", "imaging"}
    cal1 = _group_row(d, g1)["flags"]["calibration"]
    cal2 = _group_row(d, g2)["flags"]["calibration"]
    assert cal1["mode"] == "solved" and cal1["calibrator"] == "3C286" and cal1["new_set"]
    assert cal2["mode"] == "applied", cal2
    assert cal1["new_set"]["name"] in (cal2["applied_set"] or ""), (cal1, cal2)

    base = f"http://127.0.0.1:{d.api_port()}"
    health = httpx.get(base + "/health", timeout=10).json()
    assert health["status"] == "ok"
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert 'contimg_groups{state="done"} 2' in metrics
    hist = httpx.get(f"{base}/api/groups/{g1}", timeout=10).json()
    ok_runs = [r for r in hist["stage_runs"] if r["outcome"] == "ok"]
    assert [r["stage"] for r in ok_runs] == ["conversion", "calibration", "imaging"]
    assert all(r["duration_s"] > 0 and r["metrics"]["qa"]["passed"] for r in ok_runs)
    sets = httpx.get(base + "/api/calibration", timeout=10).json()
    assert sets, "the calibration set in force is listed"
    page = httpx.get(base + "/", timeout=10).text
    assert g1 in page and "QA passed" in page

    browser = _chromium()
    if browser:
        shot = tmp_path / "status.png"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}"]
        dom = subprocess.run([browser, *flags, "--dump-dom", base + "/"], capture_output=True,
                             text=True, timeout=120).stdout
        assert f"data-group=\"{g2}\"" in dom and "<img" in dom and "QA passed" in dom
        subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,900",
                        base + "/"], capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 5000
        png = httpx.get(base + "/api/images", timeout=10).json()[0]["quicklook_path"]
        assert png and png.endswith(".png")

    # the last conversion's tile files wait in tmpfs for the next group; a stopped daemon
    # gives that memory back
    pool = work_dir(d.tmpfs, d.state) / "warm-columns"
    assert sorted(p.name.split("-")[0] for p in pool.iterdir()) in (["DATA", "FLAG"],
                                                                     ["DATA", "DATA", "FLAG", "FLAG"])
    d.terminate()
    assert d.wait(90) == 0
    assert any(e.get("event") == "daemon_stopped" for e in d.events())
    assert not pool.exists()  # nor its directory


def test_sigkill_in_each_stage_then_restart_finishes_exactly_once(tmp_path):
    d = Daemon(tmp_path)
    truths = simulate_groups(d.input, preset="tiny", groups=2, seed=12)
    d.start()
    for active in ("converting", "calibrating", "imaging"):
        d.wait_for(lambda st, a=active: a in st.values() or _done(2)(st), STAGE_TIMEOUT,
                   f"a group {active}")
        time.sleep(1.0)
        d.kill_all()
        leftovers = [p for p in d.output.rglob("*") if ".tmp" in p.name or "partial" in p.name]
        assert not leftovers, f"half-written products visible after SIGKILL: {leftovers}"
        d.start()
    d.wait_for(_done(2), STAGE_TIMEOUT, "all groups done after restarts")
    d.terminate()
    assert d.wait(90) == 0

    runs = d.stage_runs()
    for t in truths:
        ok = [r["stage"] for r in runs if r["group_id"] == t["group_id"] and r["outcome"] == "ok"]
        assert sorted(ok) == ["calibration", "conversion", "imaging"], (t["group_id"], ok)
        pdir = _products(d, t["group_id"])
        assert len(list(pdir.glob("*.ms"))) == 1 and len(list(pdir.glob("*.pbcor.fits"))) == 1
    with d.db() as con:
        assert con.execute("SELECT count(*) FROM groups").fetchone()[0] == 2
    assert not list(d.scratch.glob("contimg-stage-*")), "stale staging was cleaned"
    assert any(e.get("event") == "claims_recovered" for e in d.events())


def test_sigterm_drains_and_a_failing_gate_stops_only_its_group(tmp_path):
    d = Daemon(tmp_path)
    good = simulate_groups(d.input, preset="tiny", groups=1, seed=13)[0]
    start = datetime.fromisoformat(good["group_id"]).replace(tzinfo=None) + timedelta(hours=3)
    bad = simulate_groups(d.input, preset="tiny", groups=1, seed=14, calibrator="none",
                          dec_deg=good["pointing"]["dec_deg"], start=start,
                          faults={sb: "zeros" for sb in range(16)})[0]
    d.start()
    d.wait_for(lambda st: "calibrating" in st.values(), STAGE_TIMEOUT, "a group calibrating")
    d.terminate()
    assert d.wait(120) == 0, d.log_tail()
    states = d.states()
    assert states[good["group_id"]] in ("converted", "calibrated"), states
    assert not list(d.output.rglob("*.tmp")), "nothing half-written after a drain"
    d.start("--once")
    assert d.wait(STAGE_TIMEOUT) == 0, d.log_tail()
    states = d.states()
    assert states[good["group_id"]] == "done"
    assert states[bad["group_id"]] == "quarantined"
    row = _group_row(d, bad["group_id"])
    assert "QA failed" in row["last_error"] and "zero" in row["last_error"].lower()
    alerts = [e for e in d.events() if e.get("event") == "alert"
              and e.get("category") == "conversion.quarantined"]
    assert alerts, "the quarantine raised an alert"
    r = d.cli("requeue", bad["group_id"])
    assert r.returncode == 0 and "requeued" in r.stdout


def test_group_hours_after_the_transit_is_calibrated_on_its_field(tmp_path):
    """Lights-out: with a sky catalogue a group 3 h after the last transit ends done in mode
    'field'; without one it is held, and the alert names the missing catalogue."""
    d = Daemon(tmp_path / "with")
    cal = simulate_groups(d.input, preset="tiny", groups=1, seed=21, gain_drift=True)[0]
    start = datetime.fromisoformat(cal["group_id"]) + timedelta(hours=3)
    field = simulate_groups(d.input, preset="tiny", groups=1, seed=21, gain_drift=True,
                            calibrator="none", dec_deg=cal["pointing"]["dec_deg"],
                            start=start)[0]
    survey = d.input / "sky_nvss.tdat"  # the field group's sky, as NVSS lists it
    r = d.cli("catalog", "build", "--no-bundled", str(survey))
    assert r.returncode == 0, r.stderr
    d.start("--once")
    assert d.wait(STAGE_TIMEOUT) == 0, d.log_tail()
    assert d.states() == {cal["group_id"]: "done", field["group_id"]: "done"}, d.log_tail()
    c1 = _group_row(d, cal["group_id"])["flags"]["calibration"]
    c2 = _group_row(d, field["group_id"])["flags"]["calibration"]
    assert c1["mode"] == "solved" and c2["mode"] == "field", (c1, c2)
    qa = json.loads((_products(d, field["group_id"]) / "qa.json").read_text())
    assert qa["stages"]["calibration"]["metrics"]["field_model_apparent_jy"] > 0.2

    bare = Daemon(tmp_path / "without")
    for name in cal["files"] + field["files"]:
        shutil.copy(d.input / name, bare.input / name)
    bare.start("--once")
    assert bare.wait(STAGE_TIMEOUT) == 0, bare.log_tail()
    states = bare.states()
    assert states[cal["group_id"]] == "done" and states[field["group_id"]] == "converted"
    held = _group_row(bare, field["group_id"])["flags"].get("held") or ""
    assert "no sky catalogue" in held, held
    alerts = [e for e in bare.events() if e.get("event") == "alert"
              and e.get("category") == "calibration.stale"
              and field["group_id"] in json.dumps(e)]
    assert any("no sky catalogue" in json.dumps(a) for a in alerts), alerts


def test_a_group_in_flight_at_repeated_unclean_starts_is_quarantined_as_poison(tmp_path):
    """A group that takes the daemon down with it (here: SIGKILL while it is converting,
    CONTIMG_POISON_STARTS times in a row) is quarantined at the next start with a reason and
    an alert, instead of crash-looping the daemon; no attempt was charged for the kills."""
    d = Daemon(tmp_path, CONTIMG_POISON_STARTS="2", CONTIMG_MAX_ATTEMPTS="1")
    (truth,) = simulate_groups(d.input, preset="tiny", groups=1, seed=13)
    gid = truth["group_id"]
    for run in range(1, 3):
        d.start()
        deadline = time.monotonic() + 120  # past start-up's recovery, then converting again
        while sum(e.get("event") == "daemon_ready" for e in d.events()) < run:
            assert time.monotonic() < deadline, d.log_tail()
            time.sleep(0.1)
        d.wait_for(lambda st: st.get(gid) == "converting", STAGE_TIMEOUT, "converting")
        d.kill_all()
    d.start()
    d.wait_for(lambda st: st.get(gid) == "quarantined", 120, "the poison group quarantined")
    d.terminate()
    assert d.wait(90) == 0
    row = _group_row(d, gid)
    assert "suspected poison group" in row["last_error"] and row["attempts"] == 0, row
    alerts = [e for e in d.events() if e.get("event") == "alert"
              and e.get("category") == "daemon.poison"]
    assert alerts and gid in json.dumps(alerts[0])
    r = d.cli("requeue", gid)
    assert r.returncode == 0 and "requeued to pending" in r.stdout
