"""System monitors on real filesystems: an 8 MiB tmpfs when we may mount one, and a plain
directory whose thresholds are set relative to its current free space."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from dsa110_contimg.alerting.alert import Alert, Severity
from dsa110_contimg.alerting.monitors import GB, SystemMonitor, grade
from dsa110_contimg.alerting.options import AlertOptions, MonitorOptions
from dsa110_contimg.alerting.router import AlertRouter

pytestmark = pytest.mark.timeout(60)
MB = 1024 * 1024


def fill(path: Path, size: int) -> None:
    """A file occupying ``size`` bytes of the filesystem (allocated, not sparse)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.write(fd, b"\0" * size)
        os.fsync(fd)
    finally:
        os.close(fd)


def summary(alerts: list[Alert]) -> list[tuple[str, str, str]]:
    return sorted((a.category, a.severity.name, a.context["condition"].split(":")[0])
                  for a in alerts)


@pytest.fixture
def tmpfs_dir(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_small_tmpfs_fills_warns_escalates_and_clears(tmpfs_dir: Path) -> None:
    o = MonitorOptions(disk_warn_gb=5 * MB / GB, disk_crit_gb=2.5 * MB / GB,
                       tmpfs_warn_pct=50, tmpfs_crit_pct=75, hysteresis_pct=5)
    alerts: list[Alert] = []
    mon = SystemMonitor(o, {"scratch": tmpfs_dir}, tmpfs=tmpfs_dir, emit=alerts.append)

    assert await mon.check_once() == []
    fill(tmpfs_dir / "a", int(4.5 * MB))  # 3.5 MiB free, 56 % used
    got = await mon.check_once()
    assert summary(got) == [("disk", "WARNING", "disk"), ("tmpfs", "WARNING", "tmpfs")]
    assert await mon.check_once() == []  # once
    fill(tmpfs_dir / "b", 2 * MB)  # 1.5 MiB free, 81 % used
    got = await mon.check_once()
    assert summary(got) == [("disk", "CRITICAL", "disk"), ("tmpfs", "CRITICAL", "tmpfs")]
    assert await mon.check_once() == []
    (tmpfs_dir / "b").unlink()  # back to WARNING levels: de-escalation is silent
    assert await mon.check_once() == []
    assert mon.active() == {next(k for k in mon.active() if k.startswith("disk:")): "CRITICAL",
                            "tmpfs": "CRITICAL"}
    (tmpfs_dir / "a").unlink()
    got = await mon.check_once()
    assert summary(got) == [("disk", "INFO", "disk"), ("tmpfs", "INFO", "tmpfs")]
    assert all(a.title.startswith("Cleared: ") and a.context["was"] == "CRITICAL" for a in got)
    assert await mon.check_once() == [] and mon.active() == {}
    assert len(alerts) == 6  # everything check_once returned was emitted, nothing else
    disk_warn = next(a for a in alerts if a.category == "disk")
    assert str(tmpfs_dir) in disk_warn.message and "scratch" in disk_warn.title


async def test_plain_directory_thresholds_relative_to_free_space(tmp_path: Path) -> None:
    """Thresholds sit half a step either side of what each 512 MiB file takes away, so other
    processes writing to the same disk meanwhile do not change the outcome; if they moved free
    space by more than that, the test skips rather than report a false failure."""
    free0 = shutil.disk_usage(tmp_path).free
    step = 512 * MB
    if free0 < 4 * step:
        pytest.skip("needs 2 GiB free")
    o = MonitorOptions(disk_warn_gb=(free0 - step / 2) / GB, disk_crit_gb=(free0 - 1.5 * step) / GB,
                       hysteresis_pct=0)
    alerts: list[Alert] = []
    work = tmp_path / "products"
    work.mkdir()
    mon = SystemMonitor(o, {"output": work, "scratch": tmp_path}, emit=alerts.append)

    async def check(files: int) -> list[Severity]:
        got = [a.severity for a in await mon.check_once()]
        drift = shutil.disk_usage(tmp_path).free - (free0 - files * step)
        if abs(drift) > step / 2:
            pytest.skip(f"another process moved free space by {drift / MB:.0f} MiB meanwhile")
        return got

    try:
        assert await check(0) == []
        fill(work / "one.ms", step)
        assert await check(1) == [Severity.WARNING]
        assert await check(1) == []
        fill(work / "two.ms", step)
        assert await check(2) == [Severity.CRITICAL]
        assert await check(2) == []
    finally:
        for f in work.iterdir():
            f.unlink()
    assert await check(0) == [Severity.INFO]
    assert "output, scratch" in alerts[0].title  # one filesystem, one condition
    assert alerts[1].context["free_gb"] < o.disk_crit_gb


async def test_missing_watched_path_is_reported_once_and_clears(tmp_path: Path) -> None:
    alerts: list[Alert] = []
    gone = tmp_path / "incoming"
    mon = SystemMonitor(MonitorOptions(disk_warn_gb=0, disk_crit_gb=0), {"input": gone},
                        tmpfs=tmp_path / "no-shm", emit=alerts.append)
    first = await mon.check_once()
    assert sorted(a.title.split(" (")[0] for a in first) == [
        "Cannot measure free space of input", "Cannot measure tmpfs use"]
    assert "FileNotFoundError" in first[0].message
    assert await mon.check_once() == []
    gone.mkdir()
    (tmp_path / "no-shm").mkdir()
    assert [a.severity for a in await mon.check_once()] == [Severity.INFO, Severity.INFO]


async def test_queue_depth_stuck_groups_and_calibration_age() -> None:
    q: dict[str, Any] = {"counts": {"waiting": 3, "converting": 1, "done": 50}, "waiting": 3,
                         "oldest_active_age_s": {"converting": 10.0}}
    cal: list[float | None] = [2.0]

    async def queue_stats() -> dict[str, Any]:
        return q

    async def cal_age() -> float | None:
        return cal[0]

    o = MonitorOptions(queue_depth_warn=6, stuck_after_s=600, cal_age_warn_h=24, hysteresis_pct=5)
    mon = SystemMonitor(o, {}, emit=None, queue_stats=queue_stats, calibration_age_h=cal_age)
    assert await mon.check_once() == []

    q["waiting"] = 8
    q["oldest_active_age_s"] = {"converting": 900.0, "imaging": 30.0}
    q["oldest_active_group"] = {"converting": "2025-01-01T00:05:09"}
    cal[0] = 30.0
    got = {a.context["condition"]: a for a in await mon.check_once()}
    assert set(got) == {"queue_depth", "stuck:converting", "cal_age"}
    assert all(a.severity == Severity.WARNING for a in got.values())
    assert got["stuck:converting"].context["group"] == "2025-01-01T00:05:09"
    assert "2025-01-01T00:05:09" in got["stuck:converting"].message
    assert got["queue_depth"].context["counts"]["done"] == 50

    q["waiting"] = 6  # at the threshold, inside the hysteresis band: still raised, silent
    cal[0] = None  # unknown: no change
    assert await mon.check_once() == []
    q["waiting"] = 5
    q["oldest_active_age_s"] = {"imaging": 40.0}  # converting drained
    cal[0] = 0.5
    got = {a.context["condition"]: a for a in await mon.check_once()}
    assert set(got) == {"queue_depth", "stuck:converting", "cal_age"}
    assert all(a.severity == Severity.INFO for a in got.values())
    assert await mon.check_once() == []


async def test_hung_queue_probe_times_out_and_logs() -> None:
    async def never() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    mon = SystemMonitor(MonitorOptions(probe_timeout_s=0.2), {}, queue_stats=never)
    t0 = time.monotonic()
    with capture_logs() as logs:
        assert await mon.check_once() == []
    assert time.monotonic() - t0 < 1.0
    assert [e["probe"] for e in logs if e["event"] == "monitor_probe_failed"] == ["queue_stats"]


async def test_incomplete_queue_stats_are_logged_once() -> None:
    async def stats() -> dict[str, Any]:
        return {"counts": {"pending": 99}}

    mon = SystemMonitor(MonitorOptions(), {}, queue_stats=stats)
    with capture_logs() as logs:
        await mon.check_once()
        await mon.check_once()
    assert len([e for e in logs if e["event"] == "monitor_queue_stats_incomplete"]) == 1


async def test_run_loops_on_interval_feeds_router_and_stops(tmp_path: Path) -> None:
    calls: list[float] = []

    async def stats() -> dict[str, Any]:
        calls.append(time.monotonic())
        return {"waiting": 10, "oldest_active_age_s": {}}

    stop = asyncio.Event()
    with capture_logs() as logs:
        async with AlertRouter(AlertOptions()) as router:
            mon = SystemMonitor(MonitorOptions(interval_s=0.05, disk_warn_gb=0, disk_crit_gb=0),
                                {"output": tmp_path},
                                emit=router.emit, queue_stats=stats)
            task = asyncio.create_task(mon.run(stop))
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.wait_for(task, 1.0)
    assert 4 <= len(calls) <= 8
    raised = [e for e in logs if e["event"] == "alert" and e["category"] == "queue"]
    assert len(raised) == 1 and raised[0]["severity"] == "WARNING"
    assert router.stats()["emitted"] == {"queue": 1}


def test_grade_hysteresis() -> None:
    kw: dict[str, Any] = {"hysteresis": 0.1}
    assert grade(90, 90, 95, higher_is_worse=True, held=None, **kw) is None
    assert grade(95, 90, 95, higher_is_worse=True, held=None, **kw) == Severity.WARNING
    assert grade(96, 90, 95, higher_is_worse=True, held=None, **kw) == Severity.CRITICAL
    assert grade(85, 90, 95, higher_is_worse=True, held=Severity.WARNING, **kw) == Severity.WARNING
    assert grade(80, 90, 95, higher_is_worse=True, held=Severity.WARNING, **kw) is None
    assert grade(105, 100, 50, higher_is_worse=False, held=Severity.CRITICAL, **kw) == \
        Severity.CRITICAL
    assert grade(111, 100, 50, higher_is_worse=False, held=Severity.CRITICAL, **kw) is None


async def test_state_disk_has_its_own_thresholds(tmp_path: Path) -> None:
    """The state directory alerts on its own (small-disk) thresholds; sharing a filesystem
    with a data directory, the higher thresholds of the two apply to the one condition."""
    state = tmp_path / "state"
    state.mkdir()
    free_gb = shutil.disk_usage(state).free / GB
    alerts: list[Alert] = []
    # the data-disk thresholds would not fire; the state-disk warning (above free) does
    o = MonitorOptions(disk_warn_gb=0, disk_crit_gb=0, state_disk_warn_gb=free_gb * 2 + 1,
                       state_disk_crit_gb=0)
    mon = SystemMonitor(o, {"state": state}, emit=alerts.append)
    got = await mon.check_once()
    assert summary(got) == [("disk", "WARNING", "disk")]
    assert "state" in got[0].title and str(state) in got[0].message
    assert got[0].context["warn_gb"] == o.state_disk_warn_gb
    assert await mon.check_once() == []
    # critical on the state disk
    crit = MonitorOptions(disk_warn_gb=0, disk_crit_gb=0, state_disk_warn_gb=free_gb * 3 + 2,
                          state_disk_crit_gb=free_gb * 2 + 1)
    got = await SystemMonitor(crit, {"state": state}).check_once()
    assert summary(got) == [("disk", "CRITICAL", "disk")]
    # the data-disk thresholds do not apply to the state directory alone
    quiet = MonitorOptions(disk_warn_gb=free_gb * 2 + 1, disk_crit_gb=0, state_disk_warn_gb=0,
                           state_disk_crit_gb=0)
    assert await SystemMonitor(quiet, {"state": state}).check_once() == []
    # one filesystem, two names: one condition, graded against the higher thresholds
    shared = await SystemMonitor(o, {"output": tmp_path, "state": state}).check_once()
    assert summary(shared) == [("disk", "WARNING", "disk")]
    assert "output, state" in shared[0].title
