"""Daemon parts that need no pipeline stage: executor, sd_notify, status API, metrics."""

import asyncio
import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest

import workerfns
from dsa110_contimg.daemon.api import StatusAPI
from dsa110_contimg.daemon.executor import LocalExecutor
from dsa110_contimg.daemon.metrics import Metrics, render_prometheus
from dsa110_contimg.daemon.sdnotify import Notifier, watchdog_loop
from dsa110_contimg.daemon.worker import TaskUsage
from dsa110_contimg.errors import BadInputError, CalibrationUnavailable, StageError


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


async def test_local_executor_keeps_no_descriptor_of_a_failed_or_dead_worker():
    ex = LocalExecutor(max_workers=1, log_format="json")
    errors = []  # kept, as the scheduler's tasks keep theirs: tracebacks hold the frames
    try:
        await ex.run(workerfns.add, 0, 0)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            for fn in (workerfns.die, workerfns.raises):
                try:
                    await ex.run(fn)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
        after = len(os.listdir("/proc/self/fd"))
    finally:
        await ex.shutdown(kill=True)
    assert len(errors) == 10
    assert after <= before + 1, f"descriptors {before} -> {after} after 10 failed tasks"


async def test_local_executor_warms_up_without_taking_a_worker_slot():
    ex = LocalExecutor(max_workers=1, log_format="json")
    try:
        warm = asyncio.create_task(ex.warm())
        (total, pid), _ = await asyncio.gather(ex.run(workerfns.add, 2, 2), warm)
        seconds = warm.result()
        assert total == 4 and pid != os.getpid()
        assert seconds is not None and seconds > 0
        assert not ex._procs, "the warm-up's process has exited"
        again = await ex.warm()
        assert again is not None and again < max(seconds, 1.0), "the forkserver stays up"
    finally:
        await ex.shutdown(kill=True)


async def test_local_executor_lowers_a_tasks_cpu_priority_on_request():
    ex = LocalExecutor(max_workers=1, log_format="json")
    try:
        mine = os.nice(0)
        plain, _ = await ex.run_measured(workerfns.niceness)
        nicer, _ = await ex.run_measured(workerfns.niceness, nice=5)
        again, _ = await ex.run_measured(workerfns.niceness)
    finally:
        await ex.shutdown(kill=True)
    assert plain == again == mine, "the priority of one task does not stick to later ones"
    assert nicer == min(19, mine + 5)


@pytest.mark.skipif("OMP_NUM_THREADS" in os.environ, reason="an operator's OMP_NUM_THREADS wins")
async def test_local_executor_gives_a_task_the_cores_free_when_it_starts():
    ex = LocalExecutor(max_workers=2, log_format="json")
    ex.cores = 2  # as on the bench machine, whatever runs the tests
    try:
        alone = await ex.run(workerfns.omp_threads_after, 0.0)
        first = asyncio.create_task(ex.run(workerfns.omp_threads_after, 1.5))
        await asyncio.sleep(0.3)  # the first task holds one core
        second = await ex.run(workerfns.omp_threads_after, 0.0)
        assert (alone, await first, second) == ("2", "2", "1")
        assert await ex.run(workerfns.omp_threads_after, 0.0) == "2", "the core is free again"
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
    """Answers each task function by name with a canned (value, usage), or raises a canned
    exception, as a worker would; records which functions were sent."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []
        self.nice = {}

    async def run_measured(self, fn, *args, group_id=None, nice=0):
        self.calls.append(fn.__name__)
        self.nice[fn.__name__] = nice
        answer = self.answers[fn.__name__]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class _FakeRegistry:
    def __init__(self, in_force=None):
        self.in_force = in_force
        self.failed, self.registered = [], []

    async def find_valid(self, mid_mjd, dec_deg, options):
        return self.in_force

    async def find_bandpass(self, mid_mjd, dec_deg, options):
        return self.in_force

    async def bandpass_checked(self, bandpass_set, mid_mjd, dec_deg, within_h,
                               max_noise_deg=180.0):
        return None

    async def mark_failed(self, name, reason):
        self.failed.append((name, reason))
        return True

    async def register(self, calset, status="active"):
        self.registered.append(calset)


GID = "2026-06-01T04:46:06"


def _settings(tmp_path):
    from dsa110_contimg.config import load_settings

    return load_settings({f"CONTIMG_{k.upper()}_DIR": str(tmp_path / k)
                          for k in ("input", "output", "state", "scratch")})


def _conversion_answer(tmp_path, ms=None):
    """A canned conversion whose MS (``ms``, default tmp_path/x.ms) is a stand-in directory."""
    from dsa110_contimg.conversion.convert import ConversionResult
    from dsa110_contimg.qa.result import QAResult

    ms = ms or tmp_path / "x.ms"
    ms.mkdir(parents=True, exist_ok=True)
    (ms / "table.dat").write_bytes(b"stand-in")
    (ms / "table.f0").write_bytes(b"\0" * 1000)
    conv = ConversionResult(GID, ms, 16, 136, 6, 64, 1.3e9, 1.5e9, 30.7, 202.0,
                            30.7, 61192.2, "tmpfs", 5_800_000, 2.0)
    return conv, QAResult("ms_after_conversion", True, {}, duration_s=0.25)


async def _queue_with_group(q, tmp_path):
    await q.create_group(GID)
    await q.record_file(GID, 0, tmp_path / f"{GID}_sb00.hdf5", 10, 1.0)
    await q.mark_ready(GID)


async def test_scheduler_runs_stage_and_gate_as_one_task_and_records_its_usage(tmp_path):
    from dsa110_contimg.config import QueueOptions
    from dsa110_contimg.daemon.queue import GroupQueue
    from dsa110_contimg.daemon.scheduler import Scheduler

    ex = _CannedExecutor({"convert_and_check": (_conversion_answer(tmp_path),
                                                TaskUsage(3.5, 400.0))})
    async with await GroupQueue.open(tmp_path / "q.sqlite", QueueOptions()) as q:
        await _queue_with_group(q, tmp_path)
        sched = Scheduler(_settings(tmp_path), q, ex, lambda alert: None, None, None, Metrics(),
                          worker_id="w")
        await sched._process(await q.claim("w"))
        group = await q.get_group(GID)
    assert ex.calls == ["convert_and_check"], "one worker task per stage, gate included"
    assert group["state"] == "converted"
    assert group["flags"]["conversion"]["ms_path"] == str(tmp_path / "x.ms")
    (run,) = group["stage_runs"]
    assert (run["cpu_s"], run["peak_rss_mb"], run["qa_s"]) == (3.5, 400.0, 0.25)
    assert not sched._usage, "nothing kept after the stage"


async def test_scheduler_retries_a_completion_the_locked_database_refused(tmp_path):
    """The database locked past its busy timeout when the stage finishes: the completion is
    retried until it lands (the group advances), instead of the group staying claimed."""
    import sqlite3
    import threading
    import time

    from dsa110_contimg.config import QueueOptions
    from dsa110_contimg.daemon.queue import GroupQueue
    from dsa110_contimg.daemon.scheduler import Scheduler

    ex = _CannedExecutor({"convert_and_check": (_conversion_answer(tmp_path), TaskUsage(1, 1))})
    db = tmp_path / "q.sqlite"
    async with await GroupQueue.open(db, QueueOptions(), busy_timeout_s=0.2) as q:
        await _queue_with_group(q, tmp_path)
        sched = Scheduler(_settings(tmp_path), q, ex, lambda alert: None, None, None, Metrics(),
                          worker_id="w")
        claim = await q.claim("w")
        held = threading.Event()

        def hold_lock(seconds):
            raw = sqlite3.connect(db, isolation_level=None)
            raw.execute("BEGIN IMMEDIATE")
            held.set()
            time.sleep(seconds)
            raw.execute("ROLLBACK")
            raw.close()

        locker = threading.Thread(target=hold_lock, args=(2.0,))
        locker.start()
        held.wait()
        await sched._process(claim)
        locker.join()
        group = await q.get_group(GID)
    assert group["state"] == "converted" and group["worker"] is None
    assert [r["outcome"] for r in group["stage_runs"]] == ["ok"]


async def test_scheduler_holds_a_group_on_a_full_disk_without_using_an_attempt(tmp_path):
    from dsa110_contimg.alerting.alert import Severity
    from dsa110_contimg.config import QueueOptions
    from dsa110_contimg.daemon.queue import GroupQueue
    from dsa110_contimg.daemon.scheduler import Scheduler
    from dsa110_contimg.errors import DiskFull

    alerts = []
    full = DiskFull("no space left on device writing /products/x.ms")
    ex = _CannedExecutor({"convert_and_check": full})
    async with await GroupQueue.open(tmp_path / "q.sqlite", QueueOptions(max_attempts=1)) as q:
        await _queue_with_group(q, tmp_path)
        sched = Scheduler(_settings(tmp_path), q, ex, alerts.append, None, None, Metrics(),
                          worker_id="w")
        for _ in range(3):  # more tries than max_attempts: none of them counts
            await sched._process(await q.claim("w", now=time.time() + 3600))
        group = await q.get_group(GID)
        assert (group["state"], group["attempts"]) == ("pending", 0)
        assert group["not_before"] > time.time() + 30, "tried again after the disk retry delay"
        assert [r["outcome"] for r in group["stage_runs"]] == ["abandoned"] * 3
        assert "no space left" in group["stage_runs"][0]["error"]
        assert [(a.severity, a.category) for a in alerts] == [(Severity.CRITICAL, "disk.full")]
        ex.answers["convert_and_check"] = (_conversion_answer(tmp_path), TaskUsage(1, 1))
        await sched._process(await q.claim("w", now=time.time() + 3600))
        assert await q.group_state(GID) == "converted"
    assert [(a.severity, a.category) for a in alerts][1:] == [(Severity.INFO, "disk.full")]
    assert sched.disk_full is None


async def test_scheduler_sweep_takes_back_a_claim_left_behind_but_not_one_in_flight(tmp_path):
    from dsa110_contimg.config import QueueOptions
    from dsa110_contimg.daemon.queue import GroupQueue
    from dsa110_contimg.daemon.scheduler import Scheduler

    alerts = []
    async with await GroupQueue.open(tmp_path / "q.sqlite",
                                     QueueOptions(claim_timeout_s=1)) as q:
        await _queue_with_group(q, tmp_path)
        sched = Scheduler(_settings(tmp_path), q, _CannedExecutor({}), alerts.append, None,
                          None, Metrics(), worker_id="w")
        await q.claim("w")
        await asyncio.sleep(1.2)
        sched.inflight[GID] = asyncio.current_task()  # still running here: leave it alone
        await sched._sweep()
        assert (await q.get_group(GID))["state"] == "converting"
        del sched.inflight[GID]  # its task is gone (crashed): nothing heartbeats the claim
        sched._next_sweep = 0.0
        await sched._sweep()
        group = await q.get_group(GID)
    assert group["state"] == "pending" and group["attempts"] == 0
    assert [a.category for a in alerts] == ["daemon.recovered"]


async def test_scheduler_logs_and_alerts_a_group_task_that_crashed(tmp_path):
    import sqlite3

    from dsa110_contimg.daemon.scheduler import Scheduler

    alerts = []
    sched = Scheduler(_settings(tmp_path), None, _CannedExecutor({}), alerts.append, None, None,
                      Metrics(), worker_id="w")

    async def crash():
        raise sqlite3.DatabaseError("database disk image is malformed")

    task = asyncio.create_task(crash())
    sched.inflight[GID] = task
    task.add_done_callback(lambda t: sched._finished(GID, t))
    with pytest.raises(sqlite3.DatabaseError):
        await task
    await asyncio.sleep(0)
    assert GID not in sched.inflight
    (alert,) = alerts
    assert alert.category == "daemon.task" and "malformed" in alert.message


def _calset(name="2026-06-01T044606_3C286"):
    from dsa110_contimg.calibration.calset import CalSet

    return CalSet(name, (), "24", "3C286", 61192.2, 30.7)


def _cal_result(mode="solved", new_set=None, applied=None):
    from dsa110_contimg.calibration.stage import CalibrationResult

    return CalibrationResult(GID, Path("x.ms"), mode, "3C286" if mode == "solved" else None,
                             new_set, applied, "24" if mode != "uncalibrated" else None)


async def _calibrate(tmp_path, answer, registry, ms=None, before=None):
    """Convert (canned, MS at ``ms``), call ``before()``, then run the calibration claim with
    ``answer`` from its task."""
    from dsa110_contimg.config import QueueOptions
    from dsa110_contimg.daemon.queue import GroupQueue
    from dsa110_contimg.daemon.scheduler import Scheduler

    alerts, metrics = [], Metrics()
    ex = _CannedExecutor({"convert_and_check": (_conversion_answer(tmp_path, ms),
                                                TaskUsage(1, 1)),
                          "calibrate_and_check": answer})
    async with await GroupQueue.open(tmp_path / "q.sqlite", QueueOptions()) as q:
        await _queue_with_group(q, tmp_path)
        s = _settings(tmp_path)
        sched = Scheduler(s, q, ex, alerts.append, registry, None, metrics, worker_id="w")
        await sched._process(await q.claim("w"))
        if before is not None:
            before()
        claim = await q.claim("w")
        assert claim.stage == "calibration"
        await sched._process(claim)
        group = await q.get_group(GID)
    qa_json = s.paths.output_dir / GID[:10] / GID / "qa.json"
    qa = json.loads(qa_json.read_text()) if qa_json.exists() else None
    return group, qa, alerts, metrics, ex


async def test_calibration_qa_failure_marks_the_new_set_failed_and_quarantines(tmp_path):
    from dsa110_contimg.qa.result import QAResult

    new = _calset()
    verdict = QAResult("calibration", False, {"antenna_coverage": 0.2},
                       failures=("only 3/16 antennas have solutions",))
    reg = _FakeRegistry()
    group, qa, alerts, metrics, ex = await _calibrate(
        tmp_path, ((_cal_result("solved", new, new.name), verdict), TaskUsage(2, 2)), reg)
    assert ex.calls == ["convert_and_check", "calibrate_and_check"]
    # conversion at the daemon's priority; calibration (and imaging) CONTIMG_BACKGROUND_NICE below
    assert ex.nice == {"convert_and_check": 0, "calibrate_and_check": 10}
    assert group["state"] == "quarantined" and "QA failed" in group["last_error"]
    assert "antennas have solutions" in group["last_error"]
    assert reg.failed == [(new.name, "calibration QA failed")] and not reg.registered
    assert qa["stages"]["calibration"]["passed"] is False and qa["passed"] is False
    assert metrics.qa_failures["calibration"] == 1
    assert any(a.category == "calibration.quarantined" for a in alerts)
    assert "calibration" not in group["flags"], "a failed group is not marked calibrated"


async def test_kept_ms_moves_to_its_product_directory_when_the_group_is_quarantined(tmp_path):
    """An MS kept in the tmpfs work area does not stay in RAM once its group stops."""
    from dsa110_contimg.qa.result import QAResult

    work = tmp_path / "tmpfs" / "contimg-work" / "2026-06-01T044606.ms"
    verdict = QAResult("calibration", False, {}, failures=("bad",))
    group, *_ = await _calibrate(
        tmp_path, ((_cal_result("solved", _calset(), None), verdict), TaskUsage(2, 2)),
        _FakeRegistry(), ms=work)
    assert group["state"] == "quarantined"
    final = tmp_path / "output" / GID[:10] / GID / "2026-06-01T044606.ms"
    assert not work.exists()
    assert (final / "table.dat").read_bytes() == b"stand-in"
    assert (final / "table.f0").stat().st_size == 1000


async def test_lost_ms_sends_the_group_back_to_conversion(tmp_path):
    """tmpfs emptied (a reboot) under a converted group: convert again, no attempt used."""
    work = tmp_path / "tmpfs" / "contimg-work" / "2026-06-01T044606.ms"
    group, _, alerts, _, ex = await _calibrate(
        tmp_path, RuntimeError("calibration must not run"), _FakeRegistry(), ms=work,
        before=lambda: shutil.rmtree(work))
    assert ex.calls == ["convert_and_check"], "calibration never ran on a missing MS"
    assert (group["state"], group["attempts"]) == ("pending", 0)
    assert "convert again" in group["events"][-1]["reason"]
    assert [a.category for a in alerts] == ["conversion.lost"]


async def test_calibration_qa_pass_registers_the_new_set_with_its_metrics(tmp_path):
    from dsa110_contimg.qa.result import QAResult

    new = _calset()
    verdict = QAResult("calibration", True, {"antenna_coverage": 1.0}, duration_s=0.1)
    reg = _FakeRegistry()
    group, qa, alerts, _, _ = await _calibrate(
        tmp_path, ((_cal_result("solved", new, new.name), verdict), TaskUsage(7.0, 900.0)), reg)
    assert group["state"] == "calibrated" and not reg.failed
    assert [c.qa for c in reg.registered] == [{"antenna_coverage": 1.0}]
    assert group["flags"]["calibration"]["new_set"]["name"] == new.name
    assert qa["stages"]["calibration"]["passed"] is True
    assert any(a.category == "calibration.new" for a in alerts)
    run = group["stage_runs"][-1]
    assert (run["stage"], run["cpu_s"], run["peak_rss_mb"], run["qa_s"]) == \
        ("calibration", 7.0, 900.0, 0.1)


class _RefusingRegistry(_FakeRegistry):
    """Refuses the first ``n`` registrations as a full (or locked) database does."""

    def __init__(self, n):
        super().__init__()
        self.refusals = n

    async def register(self, calset, status="active"):
        import sqlite3

        if self.refusals:
            self.refusals -= 1
            raise sqlite3.OperationalError("database or disk is full")
        await super().register(calset, status)


async def test_calibration_set_refused_by_the_database_is_registered_on_retry(tmp_path,
                                                                              monkeypatch):
    """The state disk full (or the database locked) as a calibration ends: registering its
    set is retried until it lands; the stage is not run again, no attempt is charged."""
    from dsa110_contimg.daemon import scheduler
    from dsa110_contimg.qa.result import QAResult

    monkeypatch.setattr(scheduler, "_RETRY_FIRST_S", 0.01)
    new = _calset()
    reg = _RefusingRegistry(2)
    group, *_, ex = await _calibrate(
        tmp_path, ((_cal_result("solved", new, new.name), QAResult("calibration", True, {})),
                   TaskUsage(1, 1)), reg)
    assert (group["state"], group["attempts"]) == ("calibrated", 0)
    assert [r["outcome"] for r in group["stage_runs"]] == ["ok", "ok"]
    assert ex.calls == ["convert_and_check", "calibrate_and_check"]
    assert [c.name for c in reg.registered] == [new.name] and reg.refusals == 0


async def test_applied_set_failing_qa_quarantines_without_touching_the_registry(tmp_path):
    from dsa110_contimg.qa.result import QAResult

    in_force = _calset("2026-06-01T040000_3C286")
    verdict = QAResult("calibration", False, {}, failures=("CORRECTED_DATA is all zero",))
    reg = _FakeRegistry(in_force)
    group, _, _, _, _ = await _calibrate(
        tmp_path, ((_cal_result("applied", None, in_force.name), verdict), TaskUsage(1, 1)), reg)
    assert group["state"] == "quarantined" and not reg.failed and not reg.registered


async def test_uncalibrated_result_passes_without_a_gate_verdict(tmp_path):
    group, qa, alerts, _, _ = await _calibrate(
        tmp_path, ((_cal_result("uncalibrated"), None), TaskUsage(1, 1)), _FakeRegistry())
    assert group["state"] == "calibrated"
    assert qa["stages"]["calibration"]["metrics"] == {"mode": "uncalibrated"}
    assert any(a.category == "calibration.stale" for a in alerts)


@pytest.mark.parametrize("exc, state", [
    (CalibrationUnavailable("no set"), "converted"),
    (BadInputError("everything flagged"), "quarantined"),
    (StageError("gaincal failed"), "converted"),
])
async def test_stage_exceptions_from_the_combined_task_keep_their_meaning(tmp_path, exc, state):
    reg = _FakeRegistry()
    group, qa, alerts, metrics, _ = await _calibrate(tmp_path, exc, reg)
    assert group["state"] == state
    assert not reg.failed and not reg.registered and not metrics.qa_failures
    assert qa is None or "calibration" not in qa["stages"], "no gate verdict without a stage"
    if isinstance(exc, CalibrationUnavailable):
        assert group["flags"]["held"] == "no set" and group["attempts"] == 0
    elif isinstance(exc, StageError):
        assert group["attempts"] == 1 and "gaincal failed" in group["last_error"]


def test_task_functions_skip_the_gate_when_the_stage_raises_or_is_uncalibrated(monkeypatch):
    from dsa110_contimg.calibration import stage
    from dsa110_contimg.daemon import tasks
    from dsa110_contimg.qa import calibration as qa_cal
    from dsa110_contimg.qa.options import CalQAThresholds

    gated = []
    monkeypatch.setattr(qa_cal, "check_calibration_quality",
                        lambda calset, ms, th: gated.append((calset, ms)) or "verdict")
    in_force = _calset("in-force")
    inputs = stage.CalibrationInputs(GID, Path("x.ms"), Path("c"), 30.7, 61192.2, in_force)

    def raises(inputs, options):
        raise CalibrationUnavailable("no set")

    monkeypatch.setattr(stage, "calibrate_group", raises)
    with pytest.raises(CalibrationUnavailable):
        tasks.calibrate_and_check(inputs, None, CalQAThresholds())
    monkeypatch.setattr(stage, "calibrate_group", lambda i, o: _cal_result("uncalibrated"))
    assert tasks.calibrate_and_check(inputs, None, CalQAThresholds())[1] is None
    assert not gated
    monkeypatch.setattr(stage, "calibrate_group", lambda i, o: _cal_result("applied"))
    assert tasks.calibrate_and_check(inputs, None, CalQAThresholds())[1] == "verdict"
    new = _calset()
    monkeypatch.setattr(stage, "calibrate_group", lambda i, o: _cal_result("solved", new))
    tasks.calibrate_and_check(inputs, None, CalQAThresholds())
    assert gated == [(in_force, Path("x.ms")), (new, Path("x.ms"))], "new set first, else in force"
    for fn in (tasks.convert_and_check, tasks.calibrate_and_check, tasks.image_and_check):
        assert pickle.loads(pickle.dumps(fn)) is fn, "sent to workers by reference"


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
                                 {"output": shutil.disk_usage(tmp_path).free, "input": None})

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


async def test_a_damaged_calibration_set_is_retired_and_the_group_tries_again(tmp_path):
    """A registered set whose table no longer matches its seal (a power cut, a disk fault):
    the set is marked failed, the group goes straight back without using an attempt."""
    import pickle

    from dsa110_contimg.errors import CalSetDamaged

    damaged = CalSetDamaged("calibration set S: table /c/S.G does not match its seal: size",
                            "S")
    back = pickle.loads(pickle.dumps(damaged))  # it crosses the worker boundary pickled
    assert (type(back), str(back), back.set_name) == (CalSetDamaged, str(damaged), "S")
    reg = _FakeRegistry(in_force=_calset())
    group, _, alerts, _, _ = await _calibrate(tmp_path, damaged, reg)
    assert reg.failed and reg.failed[0][0] == "S" and "seal" in reg.failed[0][1]
    assert (group["state"], group["attempts"]) == ("converted", 0)
    assert group["not_before"] <= time.time()
    assert group["stage_runs"][-1]["outcome"] == "abandoned"
    assert any(a.category == "calibration.damaged" for a in alerts)


def test_only_passing_database_errors_are_retried_by_the_bookkeeping():
    import sqlite3

    from dsa110_contimg.daemon.scheduler import transient_db_error

    for text in ("database is locked", "database or disk is full", "disk I/O error",
                 "unable to open database file"):
        assert transient_db_error(sqlite3.OperationalError(text)), text
    assert not transient_db_error(sqlite3.OperationalError("no such table: groups"))
