"""Ingest end to end: real files written by another process, watched, grouped and queued."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from dsa110_contimg.alerting.alert import Alert, Severity
from dsa110_contimg.config import IngestOptions, QueueOptions
from dsa110_contimg.conversion.validate import check_uvh5_header
from dsa110_contimg.daemon.grouping import Grouper
from dsa110_contimg.daemon.queue import GroupQueue
from dsa110_contimg.daemon.watcher import Watcher, run_ingest

FAST = IngestOptions(expected_subbands=4, group_tolerance_s=60.0, stable_seconds=0.6,
                     group_timeout_s=60.0, timeout_policy="process", min_subbands=3,
                     poll_interval_s=0.1)


def write_minimal_uvh5(path: Path) -> None:
    """A tiny but valid UVH5 file: 3 antennas, 1 time, 2 channels, XX/YY."""
    import astropy.units as u
    from astropy.coordinates import EarthLocation
    from pyuvdata import Telescope, UVData

    location = EarthLocation.from_geodetic(lon=-118.2825 * u.deg, lat=37.2339 * u.deg,
                                           height=1222 * u.m)
    telescope = Telescope.new(
        name="OVRO_DSA", location=location, instrument="DSA-110", mount_type="fixed",
        antenna_positions={1: np.zeros(3), 2: np.array([10.0, 0, 0]), 3: np.array([0, 20.0, 0])},
        x_orientation="east", feeds=["x", "y"])
    uv = UVData.new(freq_array=np.array([1.4e9, 1.4e9 + 244140.625]),
                    polarization_array=["xx", "yy"], times=np.array([2460676.5]),
                    telescope=telescope, antpairs=[(1, 2), (1, 3), (2, 3)],
                    integration_time=12.884902, channel_width=244140.625, empty=True)
    uv.write_uvh5(str(path), clobber=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.hdf5"
    write_minimal_uvh5(path)
    assert check_uvh5_header(path) is None
    return path


def put(directory: Path, name: str, template: Path, fraction: float = 1.0) -> Path:
    data = template.read_bytes()
    path = directory / name
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float,
                     what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Ingest:
    """Queue + watcher + grouper on a directory, the way the daemon runs them."""

    def __init__(self, tmp: Path, options: IngestOptions = FAST) -> None:
        self.input = tmp / "incoming"
        self.input.mkdir(exist_ok=True)
        self.db = tmp / "state" / "contimg.sqlite"
        self.options = options
        self.alerts: list[Alert] = []
        self.ready: dict[str, float] = {}

    async def __aenter__(self) -> Ingest:
        self.queue = await GroupQueue.open(self.db, QueueOptions())
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(run_ingest(
            self.input, self.queue, self.options, self.stop, emit=self.alerts.append,
            on_ready=lambda g: self.ready.setdefault(g, time.time())))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        t0 = time.monotonic()
        await asyncio.wait_for(self.task, 5)
        assert time.monotonic() - t0 < 2.0, "ingest did not stop promptly"
        await self.queue.close()

    async def states(self) -> dict[str, str]:
        return {g["id"]: g["state"] for g in await self.queue.list_groups()}


# --------------------------------------------------------------------------- the main path
_WRITER = r"""
import json, sys, time
template, outdir, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = open(template, "rb").read()
chunk = 4096
done = {}
for name, pause_at, pause_s in plan:
    with open(f"{outdir}/{name}", "wb") as f:
        for i in range(0, len(data), chunk):
            if pause_at is not None and i >= pause_at * len(data) > i - chunk:
                f.flush()
                time.sleep(pause_s)
            f.write(data[i:i + chunk])
            f.flush()
            time.sleep(0.015)
    done[name] = time.time()
print(json.dumps(done))
"""


async def test_files_from_another_process_become_one_group_each(tmp_path: Path,
                                                                template: Path) -> None:
    # two observations 5 minutes apart, subband timestamps jittered by up to 4 s, interleaved;
    # the first file seen of each (sb00) anchors the group, and the group is named by its
    # canonical time (all stamps differ here: the earliest), whichever file came first
    plan = []
    jitter = [0, 3, 1, 4]
    for sb in range(4):
        plan.append([f"2025-06-01T10:00:0{jitter[sb]}_sb{sb:02d}.hdf5", None, 0])
        plan.append([f"2025-06-01T10:05:0{jitter[3 - sb]}_sb{sb:02d}.hdf5", None, 0])
    # one file stalls half-way for longer than stable_seconds, as a busy writer can
    plan[5][1:] = [0.5, 1.5 * FAST.stable_seconds]
    async with Ingest(tmp_path) as ing:
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(template), str(ing.input), json.dumps(plan)],
            stdout=subprocess.PIPE, text=True)
        out, _ = await asyncio.to_thread(writer.communicate, timeout=60)
        assert writer.returncode == 0
        finished = json.loads(out)

        async def both_ready() -> bool:
            return len(ing.ready) == 2
        await wait_until(both_ready, 15, "both groups to be queued")
        assert await ing.states() == {"2025-06-01T10:00:00": "pending",
                                      "2025-06-01T10:05:00": "pending"}
        for group_id in ing.ready:
            files = await ing.queue.files_of(group_id)
            assert sorted(files) == [0, 1, 2, 3]
            names = {p.name for p in files.values()}
            assert all(n.startswith(group_id[:16]) for n in names)
            last_write = max(finished[n] for n in names)
            # never declared complete before every file had been still for stable_seconds
            # (the writer reads its clock just after its last write: allow for that delay)
            assert ing.ready[group_id] >= last_write + FAST.stable_seconds - 0.05
            record = await ing.queue.get_group(group_id)
            assert all(f["size"] == template.stat().st_size for f in record["files"])
        assert ing.alerts == []


async def test_restart_attaches_files_to_the_same_group(tmp_path: Path, template: Path) -> None:
    (tmp_path / "incoming").mkdir()
    put(tmp_path / "incoming", "2025-06-01T11:00:05_sb00.hdf5", template)
    async with Ingest(tmp_path) as ing:        # the file already present is found by the scan
        async def collecting() -> bool:
            return await ing.states() == {"2025-06-01T11:00:05": "collecting"}
        await wait_until(collecting, 10, "the pre-existing file to open a group")
        put(ing.input, "2025-06-01T11:00:03_sb01.hdf5", template)
        await wait_until(lambda: _has_files(ing.queue, "2025-06-01T11:00:05", 2), 10, "sb01")

    async with Ingest(tmp_path) as ing:        # restarted daemon, same database
        # a file earlier than the anchor still joins the anchored group, not a new one
        put(ing.input, "2025-06-01T11:00:01_sb02.hdf5", template)
        put(ing.input, "2025-06-01T11:00:09_sb03.hdf5", template)

        async def ready() -> bool:
            return bool(ing.ready)
        await wait_until(ready, 10, "the group to be queued after restart")
        # one group, named once complete by its canonical time (here the earliest stamp)
        assert await ing.states() == {"2025-06-01T11:00:01": "pending"}

    async with Ingest(tmp_path) as ing:        # all files seen again: nothing new happens
        await asyncio.sleep(FAST.stable_seconds + 0.5)
        assert await ing.states() == {"2025-06-01T11:00:01": "pending"}
        assert ing.alerts == [] and ing.ready == {}


async def _has_files(queue: GroupQueue, group_id: str, n: int) -> bool:
    return len(await queue.files_of(group_id)) == n


# --------------------------------------------------------------------------- bad inputs
async def test_bad_names_are_ignored_with_a_reason(tmp_path: Path, template: Path) -> None:
    bad = ["notes.txt", "2025-06-01T12:00:00_sb01.hdf5.tmp", "2025-06-01 12:00:00_sb01.hdf5",
           "2025-06-01T12:00:00_sb1.hdf5", "2025-06-01T12:00:00_sb\u0661\u0662.hdf5",
           ".2025-06-01T12:00:00_sb01.hdf5.swp", "2025-06-31T12:00:00_sb01.hdf5"]
    with capture_logs() as logs:
        async with Ingest(tmp_path) as ing:
            for name in bad:
                put(ing.input, name, template)
            (ing.input / "2025-06-01T12:00:00_sb02.hdf5").mkdir()  # a directory, not a file
            await asyncio.sleep(1.5)    # events plus the first rescan
            for name in bad:            # touched again: still ignored, logged only once
                os.utime(ing.input / name)
            await asyncio.sleep(0.5)
            assert await ing.states() == {}
    ignored = [e for e in logs if e["event"] == "watcher.ignored"]
    assert sorted(Path(e["path"]).name for e in ignored) == sorted(bad)
    reasons = {Path(e["path"]).name: e["reason"] for e in ignored}
    assert reasons["notes.txt"] == "suffix is not .hdf5"
    assert reasons["2025-06-01 12:00:00_sb01.hdf5"] == "contains whitespace"
    assert reasons["2025-06-01T12:00:00_sb\u0661\u0662.hdf5"] == "contains non-ASCII characters"
    assert "not a valid date" in reasons["2025-06-31T12:00:00_sb01.hdf5"]
    assert all(e["log_level"] == "debug" for e in ignored)


async def _run_grouper(tmp: Path, options: IngestOptions, files: dict[str, float],
                       template: Path, wait_s: float) -> tuple[dict, list[Alert]]:
    """Put complete (fraction 1) or truncated files in place, run a grouper until the group
    leaves ``collecting``, and return every group's record and the alerts raised."""
    tmp.mkdir(parents=True, exist_ok=True)
    alerts: list[Alert] = []
    async with await GroupQueue.open(tmp / "q.sqlite", QueueOptions()) as queue:
        grouper = Grouper(queue, options, emit=alerts.append)
        for name, fraction in files.items():
            grouper.submit(put(tmp, name, template, fraction))
        assert not grouper.idle()
        stop = asyncio.Event()
        task = asyncio.create_task(grouper.run(stop))

        async def settled() -> bool:
            groups = await queue.list_groups()
            return bool(groups) and all(g["state"] != "collecting" for g in groups)
        await wait_until(settled, wait_s, "the group to leave collecting")
        assert grouper.idle()
        stop.set()
        await asyncio.wait_for(task, 5)
        groups = {g["id"]: await queue.get_group(g["id"]) for g in await queue.list_groups()}
    return groups, alerts


def _group_of(sbs: list[int], day: str = "2025-06-01T13:00:0") -> dict[str, float]:
    return {f"{day}{i % 10}_sb{sb:02d}.hdf5": 1.0 for i, sb in enumerate(sbs)}


async def test_missing_subband_timeout_policies(tmp_path: Path, template: Path) -> None:
    timeout = replace(FAST, group_timeout_s=1.0, stable_seconds=0.2)
    ok, few, strict = "2025-06-01T13:00:00", "2025-06-01T13:10:00", "2025-06-01T13:20:00"
    with capture_logs() as logs:
        (process_ok, a1), (process_few, a2), (quarantine, a3) = await asyncio.gather(
            _run_grouper(tmp_path / "a", timeout, _group_of([0, 1, 3], ok[:-1]), template, 10),
            _run_grouper(tmp_path / "b", timeout, _group_of([0, 2], few[:-1]), template, 10),
            _run_grouper(tmp_path / "c", replace(timeout, timeout_policy="quarantine"),
                         _group_of([0, 1, 3], strict[:-1]), template, 10))

    g = process_ok[ok]
    assert g["state"] == "pending" and sorted(f["subband"] for f in g["files"]) == [0, 1, 3]
    assert "timed out, processing anyway: 3/4 subbands complete" in g["flags"]["incomplete"]
    assert "missing sb02" in g["flags"]["incomplete"]
    assert g["events"][-1]["reason"] == g["flags"]["incomplete"]
    assert [(a.severity, a.category, a.title) for a in a1] == [
        (Severity.WARNING, "ingest", "Group processed incomplete")]
    assert any(e["event"] == "ingest.group_ready" and e["group_id"] == ok
               and "missing sb02" in e["note"] for e in logs)

    g = process_few[few]
    assert g["state"] == "quarantined"
    assert "2/4 subbands complete" in g["last_error"] and "missing sb01, sb03" in g["last_error"]
    assert "policy 'process' needs at least 3" in g["last_error"]
    assert len(a2) == 1 and g["last_error"] in a2[0].message

    g = quarantine[strict]
    assert g["state"] == "quarantined" and "(policy 'quarantine')" in g["last_error"]
    assert len(a3) == 1 and a3[0].context["group_id"] == strict
    for group_id in (few, strict):
        assert any(e["event"] == "ingest.group_quarantined" and e["group_id"] == group_id
                   and "timed out" in e["reason"] for e in logs)


async def test_truncated_file_quarantines_its_group(tmp_path: Path, template: Path) -> None:
    files = _group_of([0, 1, 2, 3], day="2025-06-01T14:00:0")
    files["2025-06-01T14:00:02_sb02.hdf5"] = 0.5
    with capture_logs() as logs:
        groups, alerts = await _run_grouper(
            tmp_path, replace(FAST, stable_seconds=0.2), files, template, 10)
    g = groups["2025-06-01T14:00:00"]
    assert g["state"] == "quarantined"
    assert g["last_error"].startswith(
        "2025-06-01T14:00:02_sb02.hdf5 is unreadable after it stopped growing: OSError")
    assert "truncated file" in g["last_error"]
    assert alerts[0].context["files"] == [str(tmp_path / "2025-06-01T14:00:02_sb02.hdf5")]
    assert any(e["event"] == "ingest.header_not_readable_yet" for e in logs)
    assert any(e["event"] == "ingest.group_quarantined" and "sb02" in e["reason"] for e in logs)


async def test_duplicate_subband_quarantines_naming_both(tmp_path: Path, template: Path) -> None:
    files = {"2025-06-01T12:00:00_sb03.hdf5": 1.0, "2025-06-01T12:00:01_sb00.hdf5": 1.0,
             "2025-06-01T12:00:02_sb03.hdf5": 1.0}
    with capture_logs() as logs:
        groups, alerts = await _run_grouper(tmp_path, FAST, files, template, 10)
    g = groups["2025-06-01T12:00:00"]
    assert g["state"] == "quarantined"
    first, second = (str(tmp_path / n) for n in ("2025-06-01T12:00:00_sb03.hdf5",
                                                 "2025-06-01T12:00:02_sb03.hdf5"))
    assert g["last_error"] == (f"group 2025-06-01T12:00:00: duplicate subband sb03: "
                               f"{first} and {second}")
    assert alerts[0].title == "Group quarantined at ingest"
    assert alerts[0].context["files"] == [first, second]
    assert any(e["event"] == "ingest.group_quarantined" and e["reason"] == g["last_error"]
               for e in logs)


async def test_replaced_file_is_noticed(tmp_path: Path, template: Path) -> None:
    async with Ingest(tmp_path, replace(FAST, expected_subbands=2, stable_seconds=0.3)) as ing:
        put(ing.input, "2025-06-01T15:00:00_sb00.hdf5", template, 0.5)
        put(ing.input, "2025-06-01T15:00:00_sb01.hdf5", template)
        await asyncio.sleep(0.1)
        # the correlator rewrites sb00 in place of the broken one before it is judged
        put(tmp_path, "staging.partial", template)
        os.replace(tmp_path / "staging.partial", ing.input / "2025-06-01T15:00:00_sb00.hdf5")

        async def ready() -> bool:
            return "2025-06-01T15:00:00" in ing.ready
        await wait_until(ready, 10, "the group with the replaced file")
        # a replacement after the group was queued is reported, not silently used
        put(tmp_path, "staging.partial", template)
        os.replace(tmp_path / "staging.partial", ing.input / "2025-06-01T15:00:00_sb01.hdf5")

        async def alerted() -> bool:
            return bool(ing.alerts)
        await wait_until(alerted, 5, "an alert about the late change")
        assert "changed after group 2025-06-01T15:00:00 was queued" in ing.alerts[0].message
        assert await ing.states() == {"2025-06-01T15:00:00": "pending"}


async def test_group_taken_out_of_collecting_by_an_operator(tmp_path: Path,
                                                            template: Path) -> None:
    async with await GroupQueue.open(tmp_path / "q.sqlite", QueueOptions()) as queue:
        grouper = Grouper(queue, replace(FAST, stable_seconds=0.2))
        grouper.submit(put(tmp_path, "2025-06-01T17:00:00_sb00.hdf5", template))
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(grouper.run(stop))
            await wait_until(lambda: _has_files(queue, "2025-06-01T17:00:00", 1), 5, "sb00")
            await queue.quarantine("2025-06-01T17:00:00", "operator: bad weather")
            grouper.submit(put(tmp_path, "2025-06-01T17:00:01_sb01.hdf5", template))
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(task, 5)
        assert grouper.idle()
        assert (await queue.get_group("2025-06-01T17:00:00"))["state"] == "quarantined"
        assert not any(e["log_level"] == "error" for e in logs)
        assert [e["event"] for e in logs if e["event"].startswith("ingest.group_left")] == [
            "ingest.group_left_collecting"]


# --------------------------------------------------------------------------- the watcher
async def test_watcher_deduplicates_and_stops(tmp_path: Path, template: Path) -> None:
    seen: list[str] = []
    watcher = Watcher(tmp_path, lambda p: seen.append(p.name))
    a = put(tmp_path, "2025-06-01T16:00:00_sb00.hdf5", template)
    await watcher.scan()
    await watcher.scan()
    await watcher.consider(a)
    assert seen == [a.name]
    os.utime(a, ns=(1, 1))                       # mtime change
    await watcher.consider(a)
    put(tmp_path, "x.partial", template)
    os.replace(tmp_path / "x.partial", a)        # new inode
    await watcher.consider(a)
    a.unlink()
    await watcher.consider(a)                          # vanished: forwarded once
    await watcher.consider(a)
    assert seen == [a.name] * 4

    seen.clear()
    b = put(tmp_path, "2025-06-01T16:00:00_sb01.hdf5", template)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.sleep(0.2)
    assert seen == [b.name]                      # found by the start-up scan
    c = put(tmp_path, "2025-06-01T16:00:00_sb02.hdf5", template)
    deadline = time.monotonic() + 5
    while c.name not in seen and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert seen == [b.name, c.name]
    stop.set()
    t0 = time.monotonic()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - t0 < 1.0


# --------------------------------------------------------------------------- the input mount
async def test_an_input_directory_that_goes_away_and_comes_back_loses_nothing(
        tmp_path: Path, template: Path) -> None:
    """The input directory vanishes (an unmounted NFS share) for longer than the group
    timeout: the group waits instead of timing out, keeps its files, and completes once the
    directory is back; the watcher watches the directory anew."""
    options = replace(FAST, group_timeout_s=1.5, stable_seconds=0.2, timeout_policy="quarantine")
    gid = "2025-06-01T18:00:00"
    async with Ingest(tmp_path, options) as ing:
        for sb in range(3):
            put(ing.input, f"{gid}_sb{sb:02d}.hdf5", template)
        await wait_until(lambda: _has_files(ing.queue, gid, 3), 10, "three files recorded")
        away = tmp_path / "away"
        ing.input.rename(away)
        await asyncio.sleep(3 * options.group_timeout_s)
        assert (await ing.states())[gid] == "collecting", "timed out while its input was away"
        put(away, f"{gid}_sb03.hdf5", template)  # written on the server meanwhile
        away.rename(ing.input)
        await wait_until(lambda: _state_is(ing.queue, gid, "pending"), 15,
                         "the group complete once its directory is back")
        group = await ing.queue.get_group(gid)
    assert sorted(f["subband"] for f in group["files"]) == [0, 1, 2, 3]
    assert not ing.alerts


async def test_a_requeued_group_stopped_at_ingest_finds_its_files_again(
        tmp_path: Path, template: Path) -> None:
    """Timed out and quarantined with a subband missing; the file turns up later; the
    operator's requeue sends the group back to collecting and ingest finds all four."""
    options = replace(FAST, group_timeout_s=1.0, stable_seconds=0.2, timeout_policy="quarantine")
    gid = "2025-06-01T19:00:00"
    async with Ingest(tmp_path, options) as ing:
        for sb in range(3):
            put(ing.input, f"{gid}_sb{sb:02d}.hdf5", template)
        await wait_until(lambda: _state_is(ing.queue, gid, "quarantined"), 10, "timed out")
        put(ing.input, f"{gid}_sb03.hdf5", template)  # late: ignored for a stopped group
        await asyncio.sleep(0.5)
        assert await ing.queue.requeue(gid, expected_subbands=4) == "collecting"
        await wait_until(lambda: _state_is(ing.queue, gid, "pending"), 20,
                         "the requeued group complete")
        group = await ing.queue.get_group(gid)
    assert sorted(f["subband"] for f in group["files"]) == [0, 1, 2, 3]


async def _state_is(queue: GroupQueue, gid: str, state: str) -> bool:
    groups = {g["id"]: g["state"] for g in await queue.list_groups()}
    return groups.get(gid) == state


async def test_a_restart_while_the_input_mount_is_away_keeps_the_groups_files(
        tmp_path: Path, template: Path) -> None:
    """The daemon starts while the input mount is away (an empty mount point): the group it
    was collecting keeps its files and waits; when they are back it completes."""
    options = replace(FAST, group_timeout_s=1.0, stable_seconds=0.2, timeout_policy="quarantine")
    gid = "2025-06-01T20:00:00"
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    db = tmp_path / "state" / "contimg.sqlite"
    async with await GroupQueue.open(db, QueueOptions()) as queue:
        await queue.create_group(gid)
        for sb in range(3):
            await queue.record_file(gid, sb, incoming / f"{gid}_sb{sb:02d}.hdf5", 1, 1.0)
    async with Ingest(tmp_path, options) as ing:  # nothing in the directory: the mount is away
        await asyncio.sleep(3 * options.group_timeout_s)
        assert (await ing.states())[gid] == "collecting", "timed out with its mount away"
        assert len(await ing.queue.files_of(gid)) == 3, "files dropped with the mount away"
        for sb in range(4):
            put(ing.input, f"{gid}_sb{sb:02d}.hdf5", template)
        await wait_until(lambda: _state_is(ing.queue, gid, "pending"), 15, "complete")
