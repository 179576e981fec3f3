"""Daemon parts that need no pipeline stage: executor, sd_notify, status API, metrics."""

import asyncio
import json
import os
import socket

import httpx
import pytest

import workerfns
from dsa110_contimg.daemon.api import StatusAPI
from dsa110_contimg.daemon.executor import LocalExecutor, TaskUsage
from dsa110_contimg.daemon.metrics import Metrics, render_prometheus
from dsa110_contimg.daemon.sdnotify import Notifier, watchdog_loop
from dsa110_contimg.errors import StageError


async def test_local_executor_fresh_process_per_task_survives_worker_death():
    ex = LocalExecutor(max_workers=2, log_format="json")
    try:
        (s1, pid1), (s2, pid2) = await asyncio.gather(ex.run(workerfns.add, 1, 2),
                                                      ex.run(workerfns.add, 3, 4))
        assert (s1, s2) == (3, 7)
        (_, pid3) = await ex.run(workerfns.add, 0, 0)
        assert len({pid1, pid2, pid3, os.getpid()}) == 4, "every task gets a fresh process"
        with pytest.raises(StageError, match="worker process died"):
            await ex.run(workerfns.die)
        assert ex.deaths == 1
        assert (await ex.run(workerfns.add, 5, 5))[0] == 10, "later tasks still run"
        with pytest.raises(RuntimeError):
            await ex.run(workerfns.casa_raises)
    finally:
        await ex.shutdown(kill=True)


async def test_local_executor_reports_the_workers_cpu_and_peak_rss():
    ex = LocalExecutor(max_workers=1, log_format="json")
    try:
        small, u_small = await ex.run_measured(workerfns.burn_and_hold, 0.0, 1)
        big, u_big = await ex.run_measured(workerfns.burn_and_hold, 0.5, 300)
    finally:
        await ex.shutdown(kill=True)
    assert (small, big) == (2**20, 300 * 2**20)
    assert isinstance(u_big, TaskUsage) and 0.5 <= u_big.cpu_s < 5.0
    # a forked worker starts from the forkserver's footprint, so only bounds are certain
    assert u_big.peak_rss_mb >= 300 and u_big.peak_rss_mb > u_small.peak_rss_mb, (u_small, u_big)
    both = u_small + u_big
    assert both.cpu_s == u_small.cpu_s + u_big.cpu_s and both.peak_rss_mb == u_big.peak_rss_mb


class _CannedExecutor:
    """Answers each stage function by name with a canned value and the usage it 'cost'."""

    def __init__(self, answers):
        self.answers = answers

    async def run_measured(self, fn, *args, group_id=None):
        return self.answers[fn.__name__]


async def test_scheduler_records_stage_usage_summed_over_stage_and_gate(tmp_path):
    from dsa110_contimg.config import load_settings
    from dsa110_contimg.conversion.convert import ConversionResult
    from dsa110_contimg.daemon.options import QueueOptions
    from dsa110_contimg.daemon.queue import GroupQueue
    from dsa110_contimg.daemon.scheduler import Scheduler
    from dsa110_contimg.qa.result import QAResult

    gid = "2026-06-01T04:46:06"
    s = load_settings({f"CONTIMG_{k.upper()}_DIR": str(tmp_path / k)
                       for k in ("input", "output", "state", "scratch")})
    conv = ConversionResult(gid, tmp_path / "x.ms", 16, 136, 6, 64, 1.3e9, 1.5e9, 30.7, 202.0,
                            30.7, 61192.2, "tmpfs", 5_800_000, 2.0)
    ex = _CannedExecutor({
        "convert_group": (conv, TaskUsage(3.0, 400.0)),
        "check_ms_after_conversion": (QAResult("conversion", True, {}, duration_s=0.25),
                                      TaskUsage(0.5, 150.0)),
    })
    async with await GroupQueue.open(tmp_path / "q.sqlite", QueueOptions()) as q:
        await q.create_group(gid)
        await q.record_file(gid, 0, tmp_path / f"{gid}_sb00.hdf5", 10, 1.0)
        await q.mark_ready(gid)
        sched = Scheduler(s, q, ex, lambda alert: None, None, None, Metrics(), worker_id="w")
        await sched._process(await q.claim("w"))
        group = await q.get_group(gid)
    assert group["state"] == "converted"
    (run,) = group["stage_runs"]
    assert (run["cpu_s"], run["peak_rss_mb"], run["qa_s"]) == (3.5, 400.0, 0.25)
    assert not sched._usage, "nothing kept after the stage"


async def test_shutdown_kill_abandons_running_stage():
    ex = LocalExecutor(max_workers=1, log_format="json")
    fut = asyncio.ensure_future(ex.run(workerfns.sleep_then, 1, 60))
    await asyncio.sleep(1.5)
    await asyncio.wait_for(ex.shutdown(kill=True), 20)
    with pytest.raises((StageError, asyncio.CancelledError)):
        await asyncio.wait_for(fut, 5)


async def test_sd_notify_protocol_on_a_real_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    n = Notifier(path)
    n.ready(status="ready")
    assert server.recv(4096).decode() == "READY=1\nSTATUS=ready"
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(n, 0.05, stop))
    await asyncio.sleep(0.2)
    stop.set()
    await task
    pings = []
    server.settimeout(0.1)
    try:
        while True:
            pings.append(server.recv(4096).decode())
    except TimeoutError:
        pass
    assert pings.count("WATCHDOG=1") >= 3
    assert Notifier("").send(ready=1) is False


def _api(tmp_path, token="s3cret-token"):
    calls = []

    async def queue():
        return {"counts": {"pending": 1, "done": 2}, "groups": []}

    async def group(gid):
        if gid == "2026-06-01T04:46:06":
            return {"id": gid, "state": "done"}
        raise LookupError(gid)

    async def requeue(gid):
        calls.append(gid)
        return f"group {gid} requeued"

    async def images():
        return [{"group_id": "2026-06-01T04:46:06", "quicklook_path": str(tmp_path / "out" / "q.png"),
                 "qa_passed": True, "rms_jy": 0.001, "dynamic_range": 500, "bmaj_arcsec": 30,
                 "bmin_arcsec": 20}]

    async def health():
        return {"executor": "local"}

    async def metrics():
        return render_prometheus({"pending": 1}, Metrics(), {"sent": {"slack": {"qa": 2}}},
                                 {"output": tmp_path})

    async def empty():
        return []

    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "q.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "secret.png").write_bytes(b"outside")
    providers = {"queue": queue, "group": group, "requeue": requeue, "images": images,
                 "health": health, "metrics": metrics, "alerts": empty, "calibration": empty}
    return StatusAPI("127.0.0.1", 0, token, tmp_path / "out", providers), calls


async def test_status_api_reads_and_token_protected_writes(tmp_path):
    api, calls = _api(tmp_path)
    port = await api.start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as c:
            assert (await c.get("/health")).json()["status"] == "ok"
            assert (await c.get("/api/queue")).json()["counts"]["done"] == 2
            assert (await c.get("/api/groups/2026-06-01T04:46:06")).json()["state"] == "done"
            assert (await c.get("/api/groups/..%2F..%2Fetc")).status_code == 400
            assert (await c.get("/api/groups/2027-01-01T00:00:00")).status_code == 404
            m = (await c.get("/metrics")).text
            assert 'contimg_groups{state="pending"} 1' in m and "contimg_disk_free_bytes" in m
            page = (await c.get("/")).text
            assert "2026-06-01T04:46:06" in page and "/products/q.png" in page
            assert (await c.get("/products/q.png")).content.startswith(b"\x89PNG")
            assert (await c.get("/products/../secret.png")).status_code == 404
            assert (await c.get("/products/%2E%2E/secret.png")).status_code == 404
            url = "/api/groups/2026-06-01T04:46:06/requeue"
            assert (await c.post(url)).status_code == 401
            assert (await c.post(url, headers={"Authorization": "Bearer wrong"})).status_code == 401
            r = await c.post(url, headers={"Authorization": "Bearer s3cret-token"})
            assert r.status_code == 200 and calls == ["2026-06-01T04:46:06"]
            assert (await c.delete("/api/queue")).status_code == 405
            for path in ("/", "/metrics", "/health", "/api/queue"):
                assert "s3cret-token" not in (await c.get(path)).text
    finally:
        await api.stop()


async def test_state_changes_disabled_without_token(tmp_path):
    api, calls = _api(tmp_path, token="")
    port = await api.start()
    try:
        async with httpx.AsyncClient() as c:
            r = await c.post(f"http://127.0.0.1:{port}/api/groups/2026-06-01T04:46:06/requeue",
                             headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403 and calls == []
    finally:
        await api.stop()


def test_prometheus_text_has_no_settings():
    text = render_prometheus({"done": 3}, Metrics(), {}, {})
    assert "contimg_groups{state=\"done\"} 3" in text
    json.dumps(text)


def test_harness_reaps_a_daemon_a_failed_test_left_running(tmp_path):
    import os

    from daemon_harness import Daemon

    d = Daemon(tmp_path)
    proc = d.start()
    try:
        assert proc.poll() is None
        assert Daemon.reap_all() == 1
        assert proc.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # the whole group is gone, workers included
    finally:
        d._log.close()
