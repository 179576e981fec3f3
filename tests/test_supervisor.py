"""The supervisor of the daemon's background tasks: restarts, reports, gives up."""

from __future__ import annotations

import asyncio

from dsa110_contimg.alerting.alert import Severity
from dsa110_contimg.daemon.supervisor import Supervisor


async def test_a_task_that_dies_is_restarted_and_reported():
    alerts, fatal = [], []
    sup = Supervisor(alerts.append, fatal.append, backoff_s=0.05)
    runs = []
    stop = asyncio.Event()

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise OSError("input directory gone")
        await stop.wait()

    sup.start("watcher", flaky)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if len(runs) == 3:
            break
    st = sup.report()["watcher"]
    assert (len(runs), st["state"], st["restarts"]) == (3, "running", 2)
    assert "input directory gone" in st["last_error"] and sup.healthy()
    assert [(a.severity, a.category) for a in alerts] == [(Severity.ERROR, "daemon.task")] * 2
    assert not fatal
    stop.set()
    await sup.stop()
    assert sup.report()["watcher"]["state"] == "stopped"


async def test_a_task_that_returns_while_the_daemon_runs_counts_as_dead():
    alerts = []
    sup = Supervisor(alerts.append, lambda name: None, backoff_s=10)
    async def returns():
        return None

    sup.start("grouper", returns)
    await asyncio.sleep(0.05)
    st = sup.report()["grouper"]
    assert st["state"] == "restarting" and "returned" in st["last_error"]
    assert not sup.healthy()
    await sup.stop()


async def test_a_task_that_keeps_dying_is_given_up_and_the_daemon_told():
    alerts, fatal = [], []
    sup = Supervisor(alerts.append, fatal.append, max_restarts=2, window_s=60, backoff_s=0.01)

    async def broken():
        raise RuntimeError("cannot start")

    sup.start("monitor", broken)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if fatal:
            break
    assert fatal == ["monitor"] and sup.failed == "monitor"
    assert sup.report()["monitor"]["state"] == "failed" and not sup.healthy()
    assert alerts[-1].severity == Severity.CRITICAL
    await sup.stop()


async def test_the_daemon_restarts_a_killed_background_task_and_reports_it_in_health(
        tmp_path, monkeypatch):
    """The real daemon in this process; its grouper is killed once (raises): /health shows
    it restarted, and ingest works afterwards."""
    import os
    import signal

    import httpx

    from daemon_harness import Daemon
    from dsa110_contimg.config import load_settings
    from dsa110_contimg.daemon import grouping, service
    from dsa110_contimg.simulate import simulate_groups

    d = Daemon(tmp_path)  # its directories and settings; the daemon runs here, not as a child
    settings = load_settings({k: v for k, v in d.env.items() if k.startswith("CONTIMG_")})
    real_run, kills = grouping.Grouper.run, []

    async def killed_once(self, stop_event):
        if not kills:
            kills.append(1)
            raise RuntimeError("grouper killed by the test")
        return await real_run(self, stop_event)

    monkeypatch.setattr(grouping.Grouper, "run", killed_once)
    daemon = asyncio.create_task(service.run_daemon(settings))
    try:
        port_file = d.state / "api.port"
        for _ in range(300):
            if port_file.exists() or daemon.done():
                break
            await asyncio.sleep(0.1)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            first = (await c.get("/health")).json()
            for _ in range(100):
                health = (await c.get("/health")).json()
                if health["tasks"]["grouper"]["state"] == "running":
                    break
                await asyncio.sleep(0.1)
        seen = {first["tasks"]["grouper"]["state"], health["tasks"]["grouper"]["state"]}
        assert health["tasks"]["grouper"]["restarts"] == 1, health
        assert "grouper killed by the test" in health["tasks"]["grouper"]["last_error"]
        assert health["status"] == "ok" and health["tasks"]["watcher"]["restarts"] == 0
        assert seen <= {"restarting", "running"}
        (truth,) = await asyncio.to_thread(simulate_groups, d.input, preset="tiny", groups=1,
                                           seed=5)
        for _ in range(300):
            if d.states().get(truth["group_id"], "collecting") != "collecting":
                break
            await asyncio.sleep(0.1)
        assert d.states().get(truth["group_id"]) not in (None, "collecting", "quarantined")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler: drain and stop
        assert await asyncio.wait_for(daemon, 120) == 0
