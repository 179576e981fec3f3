"""The durable group queue: state machine, claims across processes, crashes, migrations."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsa110_contimg.config import QueueOptions
from dsa110_contimg.daemon.queue import (
    LEGAL_TRANSITIONS,
    MIGRATIONS,
    SCHEMA_VERSION,
    STATES,
    DuplicateSubband,
    GroupQueue,
    UnknownGroup,
    is_legal,
)
from dsa110_contimg.daemon.status import requeue_group, status_report
from dsa110_contimg.errors import ConfigError, IllegalTransition
from dsa110_contimg.products import InvalidName, group_time

OPTS = QueueOptions(max_attempts=3, backoff_base_s=10.0, backoff_max_s=15.0,
                    heartbeat_s=0.1, claim_timeout_s=5.0)
G1 = "2025-01-01T00:00:00"
G2 = "2025-01-01T00:05:09"
W = "worker-a"


def gid(i: int) -> str:
    return f"2025-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}"


async def new_group(q: GroupQueue, group_id: str, subbands: int = 2) -> None:
    await q.create_group(group_id)
    for sb in range(subbands):
        await q.record_file(group_id, sb, f"/in/{group_id}_sb{sb:02d}.hdf5", 100 + sb, 1.5)


async def drive(q: GroupQueue, group_id: str, state: str) -> None:
    """Bring a fresh group to ``state`` through the public API only."""
    await new_group(q, group_id)
    if state == "collecting":
        return
    if state == "quarantined":
        await q.quarantine(group_id, "bad data")
        return
    await q.mark_ready(group_id)
    path = ["pending", "converting", "converted", "calibrating", "calibrated", "imaging", "done"]
    if state == "failed":
        claim = await q.claim(W)
        assert claim is not None
        await q.fail(group_id, W, "boom", retry=False)
        return
    for here in path[1:path.index(state) + 1]:
        if here in ("converting", "calibrating", "imaging"):
            assert (await q.claim(W)) is not None
        else:
            await q.complete(group_id, W, 1.0, {})


@pytest.fixture
async def queue(tmp_path: Path):
    q = await GroupQueue.open(tmp_path / "q.sqlite", OPTS)
    yield q
    await q.close()


async def state_of(q: GroupQueue, group_id: str) -> str:
    return (await q.get_group(group_id))["state"]


# --------------------------------------------------------------------------- state machine
OPS = ("mark_ready", "claim", "complete", "fail", "defer", "release", "quarantine", "requeue",
       "reconvert")
# What each operation does from each state; None = refused with IllegalTransition.
EXPECTED: dict[str, dict[str, str | None]] = {
    "collecting": {"mark_ready": "pending", "quarantine": "quarantined"},
    "pending": {"claim": "converting", "quarantine": "quarantined"},
    "converting": {"complete": "converted", "fail": "pending", "defer": "pending",
                   "release": "pending", "quarantine": "quarantined", "reconvert": "pending"},
    "converted": {"claim": "calibrating", "quarantine": "quarantined"},
    "calibrating": {"complete": "calibrated", "fail": "converted", "defer": "converted",
                    "release": "converted", "quarantine": "quarantined", "reconvert": "pending"},
    "calibrated": {"claim": "imaging", "quarantine": "quarantined"},
    "imaging": {"complete": "done", "fail": "calibrated", "defer": "calibrated",
                "release": "calibrated", "quarantine": "quarantined", "reconvert": "pending"},
    "done": {},
    "failed": {"requeue": "pending"},
    "quarantined": {"requeue": "pending"},
}


async def apply(q: GroupQueue, op: str, group_id: str) -> None:
    if op == "mark_ready":
        await q.mark_ready(group_id)
    elif op == "claim":
        if await q.claim("worker-b") is None:
            raise IllegalTransition("nothing claimable")
    elif op == "complete":
        await q.complete(group_id, W, 2.0, {"rms": 1.0})
    elif op == "fail":
        await q.fail(group_id, W, "transient")
    elif op == "defer":
        await q.defer(group_id, W, time.time() + 60, "no calibration yet")
    elif op == "release":
        await q.release(group_id, W)
    elif op == "quarantine":
        await q.quarantine(group_id, "operator says no")
    elif op == "requeue":
        await q.requeue(group_id)
    elif op == "reconvert":
        await q.reconvert(group_id, W, "MS lost")


@pytest.mark.parametrize("state", STATES)
async def test_every_operation_from_every_state(tmp_path: Path, state: str) -> None:
    for op in OPS:
        async with await GroupQueue.open(tmp_path / f"{op}.sqlite", OPTS) as q:
            await drive(q, G1, state)
            assert await state_of(q, G1) == state
            expected = EXPECTED[state].get(op)
            if expected is None:
                with pytest.raises(IllegalTransition):
                    await apply(q, op, G1)
                assert await state_of(q, G1) == state, f"{op} changed a refused group"
            else:
                await apply(q, op, G1)
                assert await state_of(q, G1) == expected, op
                assert is_legal(state, expected)


def test_expected_table_covers_exactly_the_legal_transitions() -> None:
    exercised = {(s, t) for s, ops in EXPECTED.items() for t in ops.values() if t}
    # active -> failed is reached by fail() once attempts run out (tested below)
    exercised |= {(a, "failed") for a in ("converting", "calibrating", "imaging")}
    # quarantined -> collecting: the requeue of a group stopped at ingest with files missing
    exercised.add(("quarantined", "collecting"))
    assert exercised == set(LEGAL_TRANSITIONS)


async def test_requeue_sends_a_group_stopped_at_ingest_short_of_files_to_collecting(
        queue: GroupQueue) -> None:
    await queue.create_group(G1)
    await queue.record_file(G1, 0, Path(f"/in/{G1}_sb00.hdf5"), 10, 1.0)
    await queue.quarantine(G1, "timed out: 1/16 subbands")
    assert await queue.requeue(G1, expected_subbands=16) == "collecting"
    assert await state_of(queue, G1) == "collecting"
    await queue.quarantine(G1, "timed out again")
    assert await queue.requeue(G1) == "pending", "without an expected count: pending as before"


async def test_claim_walks_stages_oldest_first_and_done_once(queue: GroupQueue) -> None:
    await new_group(queue, G2)
    await new_group(queue, G1)
    await queue.mark_ready(G2)
    await queue.mark_ready(G1)
    stages = []
    while (claim := await queue.claim(W)) is not None:
        stages.append((claim.group_id, claim.stage, claim.attempt))
        assert claim.files == {0: Path(f"/in/{claim.group_id}_sb00.hdf5"),
                               1: Path(f"/in/{claim.group_id}_sb01.hdf5")}
        assert await queue.complete(claim.group_id, W, 0.5, {"stage": claim.stage})
    assert stages == [(G1, "conversion", 1), (G1, "calibration", 1), (G1, "imaging", 1),
                      (G2, "conversion", 1), (G2, "calibration", 1), (G2, "imaging", 1)]
    counts = await queue.counts()
    assert counts == {**dict.fromkeys(STATES, 0), "done": 2}
    history = await queue.get_group(G1)
    assert [(r["stage"], r["outcome"], r["duration_s"], r["metrics"])
            for r in history["stage_runs"]] == [
        ("conversion", "ok", 0.5, {"stage": "conversion"}),
        ("calibration", "ok", 0.5, {"stage": "calibration"}),
        ("imaging", "ok", 0.5, {"stage": "imaging"})]
    assert [e["to_state"] for e in history["events"]] == [
        "collecting", "pending", "converting", "converted", "calibrating", "calibrated",
        "imaging", "done"]
    with pytest.raises(IllegalTransition):
        await queue.complete(G1, W, 1.0, {})
    with pytest.raises(IllegalTransition):
        await queue.requeue(G1)


async def test_collecting_is_never_claimed_and_empty_group_is_not_ready(queue: GroupQueue) -> None:
    await queue.create_group(G1)
    assert await queue.claim(W) is None
    with pytest.raises(IllegalTransition, match="no files"):
        await queue.mark_ready(G1)
    with pytest.raises(UnknownGroup):
        await queue.mark_ready(G2)


async def test_only_the_claim_holder_may_finish(queue: GroupQueue) -> None:
    await drive(queue, G1, "converting")
    for call in (queue.complete(G1, "intruder", 1.0, {}), queue.fail(G1, "intruder", "x"),
                 queue.release(G1, "intruder"), queue.defer(G1, "intruder", 0, "x"),
                 queue.quarantine(G1, "x", worker_id="intruder")):
        with pytest.raises(IllegalTransition, match="not claimed by intruder"):
            await call
    assert await queue.heartbeat(G1, "intruder") is False
    assert await queue.heartbeat(G1, W) is True
    assert await state_of(queue, G1) == "converting"


async def test_backoff_then_failed(queue: GroupQueue) -> None:
    await drive(queue, G1, "pending")
    t0 = 1_000_000.0
    claim = await queue.claim(W, now=t0)
    assert claim is not None and claim.attempt == 1
    assert await queue.fail(G1, W, "CASA fault 1", now=t0) == "pending"
    group = await queue.get_group(G1)
    assert (group["attempts"], group["not_before"], group["last_error"]) == (1, t0 + 10,
                                                                             "CASA fault 1")
    assert await queue.claim(W, now=t0 + 9.9) is None          # still backing off
    claim = await queue.claim(W, now=t0 + 10)
    assert claim is not None and claim.attempt == 2
    assert await queue.fail(G1, W, "CASA fault 2", now=t0 + 11) == "pending"
    assert (await queue.get_group(G1))["not_before"] == t0 + 11 + 15  # 20 s capped at 15 s
    claim = await queue.claim(W, now=t0 + 26)
    assert claim is not None and claim.attempt == 3
    assert await queue.fail(G1, W, "CASA fault 3", now=t0 + 27) == "failed"
    group = await queue.get_group(G1)
    assert group["state"] == "failed" and group["attempts"] == 3
    assert [r["outcome"] for r in group["stage_runs"]] == ["failed"] * 3
    assert "3 attempts used: CASA fault 3" in group["events"][-1]["reason"]
    assert await queue.claim(W, now=t0 + 10_000) is None


async def test_attempts_are_per_stage(queue: GroupQueue) -> None:
    await drive(queue, G1, "pending")
    await queue.claim(W, now=1.0)
    await queue.fail(G1, W, "once", now=1.0)
    await queue.claim(W, now=100.0)
    await queue.complete(G1, W, 1.0, {}, now=100.0)
    claim = await queue.claim(W, now=100.0)
    assert claim is not None and (claim.stage, claim.attempt) == ("calibration", 1)
    assert (await queue.get_group(G1))["last_error"] is None


async def test_not_retryable_fails_at_once(queue: GroupQueue) -> None:
    await drive(queue, G1, "calibrating")
    assert await queue.fail(G1, W, "bad input", retry=False, metrics={"flagged": 0.99}) == "failed"
    group = await queue.get_group(G1)
    assert group["attempts"] == 1 and group["resting_state"] == "converted"
    assert group["stage_runs"][-1]["metrics"] == {"flagged": 0.99}


async def test_defer_and_release_use_no_attempt(queue: GroupQueue) -> None:
    await drive(queue, G1, "calibrated")
    claim = await queue.claim(W, now=50.0)
    assert claim is not None and claim.stage == "imaging"
    await queue.defer(G1, W, until_ts=500.0, reason="no calibration yet", now=60.0)
    assert await queue.claim(W, now=499.0) is None
    claim = await queue.claim(W, now=500.0)
    assert claim is not None and claim.attempt == 1
    await queue.release(G1, W, now=510.0)
    group = await queue.get_group(G1)
    assert group["state"] == "calibrated" and group["attempts"] == 0
    imaging = [r for r in group["stage_runs"] if r["stage"] == "imaging"]
    assert [(r["outcome"], r["duration_s"]) for r in imaging] == [("abandoned", 10.0)]
    assert any("deferred: no calibration yet" in (e["reason"] or "") for e in group["events"])


async def test_reconvert_sends_a_lost_ms_back_to_conversion_without_an_attempt(
        queue: GroupQueue) -> None:
    await drive(queue, G1, "calibrated")
    claim = await queue.claim(W, now=50.0)
    assert claim is not None and claim.stage == "imaging"
    await queue.reconvert(G1, W, "/dev/shm/x.ms no longer exists", now=55.0)
    group = await queue.get_group(G1)
    assert (group["state"], group["attempts"]) == ("pending", 0)
    imaging = [r for r in group["stage_runs"] if r["stage"] == "imaging"]
    assert [(r["outcome"], r["error"]) for r in imaging] == [
        ("abandoned", "/dev/shm/x.ms no longer exists")]
    assert "convert again: /dev/shm/x.ms" in group["events"][-1]["reason"]
    claim = await queue.claim(W, now=56.0)
    assert claim is not None and claim.stage == "conversion"


async def test_requeue_resets_attempts_and_keeps_the_reason(queue: GroupQueue) -> None:
    await drive(queue, G1, "failed")
    await queue.requeue(G1)
    group = await queue.get_group(G1)
    assert (group["state"], group["attempts"], group["not_before"]) == ("pending", 0, 0.0)
    assert "requeued (was failed: boom)" in group["events"][-1]["reason"]
    assert any(e["to_state"] == "failed" and "boom" in e["reason"] for e in group["events"])
    await drive(queue, G2, "quarantined")
    await queue.requeue(G2)
    assert await state_of(queue, G2) == "pending"


async def test_quarantine_of_an_active_claim_closes_its_run(queue: GroupQueue) -> None:
    await drive(queue, G1, "converting")
    await queue.quarantine(G1, "truncated sb03", worker_id=W)
    group = await queue.get_group(G1)
    assert group["state"] == "quarantined" and group["worker"] is None
    assert group["stage_runs"][-1]["outcome"] == "failed"
    assert group["stage_runs"][-1]["error"] == "truncated sb03"
    assert await queue.heartbeat(G1, W) is False


async def test_record_file_duplicates_and_refresh(queue: GroupQueue) -> None:
    await queue.create_group(G1)
    assert await queue.create_group(G1) is False      # idempotent
    await queue.record_file(G1, 3, "/in/a_sb03.hdf5", 10, 1.0)
    await queue.record_file(G1, 3, "/in/a_sb03.hdf5", 20, 2.0)  # same file grew
    assert (await queue.file_records(G1))[3].size == 20
    with pytest.raises(DuplicateSubband) as info:
        await queue.record_file(G1, 3, "/in/b_sb03.hdf5", 10, 1.0)
    assert "/in/a_sb03.hdf5" in str(info.value) and "/in/b_sb03.hdf5" in str(info.value)
    await queue.record_file(G1, 4, "/in/a_sb04.hdf5", 10, 1.0)
    assert (await queue.get_group(G1))["n_subbands"] == 2
    await queue.remove_file(G1, 4)
    assert list(await queue.files_of(G1)) == [3]
    await queue.mark_ready(G1)
    with pytest.raises(IllegalTransition, match="only while collecting"):
        await queue.record_file(G1, 5, "/in/a_sb05.hdf5", 10, 1.0)


async def test_find_group_for_nearest_anchor(queue: GroupQueue) -> None:
    await queue.create_group("2025-01-01T00:00:00")
    await queue.create_group("2025-01-01T00:01:30")
    t = group_time("2025-01-01T00:00:50")
    assert await queue.find_group_for(t, 60) == "2025-01-01T00:01:30"  # 40 s beats 50 s
    assert await queue.find_group_for(group_time("2025-01-01T00:00:10"), 60) == G1
    assert await queue.find_group_for(group_time("2025-01-01T00:03:00"), 60) is None
    assert await queue.find_group_for(t.timestamp(), 5) is None


async def test_flags_reach_the_claim(queue: GroupQueue) -> None:
    await drive(queue, G1, "converted")
    await queue.set_flag(G1, "calibration", "uncalibrated")
    claim = await queue.claim(W)
    assert claim is not None and claim.flags == {"calibration": "uncalibrated"}


async def test_list_groups_filters_and_rejects_unknown_states(queue: GroupQueue) -> None:
    await drive(queue, G1, "pending")
    await drive(queue, G2, "collecting")
    assert [g["id"] for g in await queue.list_groups()] == [G2, G1]
    assert [g["id"] for g in await queue.list_groups(states=["pending"])] == [G1]
    assert await queue.list_groups(states=[]) == []
    with pytest.raises(ValueError, match="unknown state"):
        await queue.list_groups(states=["pending'; DROP TABLE groups; --"])


async def test_concurrent_coroutines_claim_each_group_once(queue: GroupQueue) -> None:
    for i in range(30):
        await drive(queue, gid(i), "pending")

    async def worker(name: str) -> list[str]:
        got = []
        while (claim := await queue.claim(name)) is not None:
            got.append(claim.group_id)
            await asyncio.sleep(0)
        return got

    results = await asyncio.gather(*(worker(f"w{i}") for i in range(4)))
    claimed = [g for r in results for g in r]
    assert sorted(claimed) == sorted(gid(i) for i in range(30))


async def test_cancelled_callers_never_leave_half_a_transaction(queue: GroupQueue) -> None:
    await drive(queue, G1, "pending")
    outcomes = set()
    for ticks in range(12):   # cancel after 0, 1, 2 ... event-loop steps: between statements
        task = asyncio.create_task(queue.claim(W))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
            outcomes.add("finished")
        except asyncio.CancelledError:
            outcomes.add("cancelled")
        group = await queue.get_group(G1)   # the shared connection is still usable
        open_runs = [r for r in group["stage_runs"] if r["finished"] is None]
        if group["state"] == "converting":  # committed whole: the claim and its run
            assert group["worker"] == W and len(open_runs) == 1
            await queue.release(G1, W)
        else:                               # or not at all
            assert group["state"] == "pending" and open_runs == []
    assert "cancelled" in outcomes


# --------------------------------------------------------------------------- processes
_CLAIMER = r"""
import asyncio, json, os, sys, time
from pathlib import Path
from dsa110_contimg.config import QueueOptions
from dsa110_contimg.daemon.queue import GroupQueue

async def main(db, go, name):
    async with await GroupQueue.open(Path(db), QueueOptions()) as q:
        Path(go + "." + name).touch()
        while not os.path.exists(go):
            time.sleep(0.002)
        got = []
        while (claim := await q.claim(name)) is not None:
            got.append(claim.group_id)
            await asyncio.sleep(0.002)  # "work": the other process gets the lock meanwhile
    print(json.dumps(got))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_processes_never_claim_one_group_twice(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    n = 150
    async with await GroupQueue.open(db, OPTS) as q:
        for i in range(n):
            await drive(q, gid(i), "pending")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(db), str(go), f"p{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"go.p{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline, "claimer processes did not start"
        await asyncio.sleep(0.01)
    go.touch()                    # both have the database open: start together
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claimed = outs[0] + outs[1]
    assert len(claimed) == n and set(claimed) == {gid(i) for i in range(n)}
    assert all(outs), f"no contention happened: {[len(o) for o in outs]}"
    async with await GroupQueue.open(db, OPTS) as q:
        assert (await q.counts())["converting"] == n
        for g in (gid(0), gid(n - 1)):
            assert len((await q.get_group(g))["stage_runs"]) == 1
    print(f"claims per process: {[len(o) for o in outs]}")


_SLEEPER = r"""
import asyncio, sys
from pathlib import Path
from dsa110_contimg.config import QueueOptions
from dsa110_contimg.daemon.queue import GroupQueue

async def main(db):
    q = await GroupQueue.open(Path(db), QueueOptions(claim_timeout_s=5))
    claim = await q.claim("doomed")
    print(claim.group_id, flush=True)
    while True:
        await q.heartbeat(claim.group_id, "doomed")
        await asyncio.sleep(0.05)

asyncio.run(main(sys.argv[1]))
"""


async def test_stale_claim_of_a_killed_process_is_recovered(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    async with await GroupQueue.open(db, OPTS) as q:
        await drive(q, G1, "pending")
        proc = subprocess.Popen([sys.executable, "-c", _SLEEPER, str(db)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == G1
            await asyncio.sleep(0.3)
            assert await q.recover_stale() == []      # heartbeats are fresh
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        last = (await q.get_group(G1))["heartbeat"]
        assert await q.recover_stale(now=last + OPTS.claim_timeout_s - 0.5) == []
        assert await q.recover_stale(now=last + OPTS.claim_timeout_s + 0.5) == [G1]
        group = await q.get_group(G1)
        assert group["state"] == "pending" and group["worker"] is None
        assert group["stage_runs"][-1]["outcome"] == "abandoned"
        assert "doomed" in group["stage_runs"][-1]["error"]
        claim = await q.claim(W)
        assert claim is not None and claim.attempt == 1, "a lost claim is not a failed attempt"
        # a running daemon's sweep leaves the groups it still has in flight alone
        later = time.time() + OPTS.claim_timeout_s + 1
        assert await q.recover_stale(now=later, exclude={G1}) == []
        assert await q.recover_stale(now=later) == [G1]
        group = await q.get_group(G1)
        assert (group["unclean_starts"], group["attempts"]) == (2, 0), "abandoned claims count"
        await q.claim(W)
        await q.complete(G1, W, 1.0, {})  # a stage completes: the count starts again
        assert (await q.get_group(G1))["unclean_starts"] == 0
        # at start-up every claim is taken back, heartbeat or not, as an unclean start
        for start in range(1, OPTS.poison_starts):
            await q.claim(W)
            assert await q.recover_stale(all_active=True) == [G1]
            group = await q.get_group(G1)
            assert (group["state"], group["unclean_starts"], group["attempts"]) == (
                "converted", start, 0)
        # in flight at poison_starts unclean starts in a row: quarantined, not crash-looping
        await q.claim(W)
        assert await q.recover_stale(all_active=True) == [G1]
        group = await q.get_group(G1)
        assert group["state"] == "quarantined"
        assert "suspected poison group" in group["last_error"]
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


_CRASH_MID_TRANSACTION = r"""
import asyncio, os, signal, sys
from pathlib import Path
from dsa110_contimg.config import QueueOptions
from dsa110_contimg.daemon.queue import GroupQueue

def die_mid_claim(sql):
    # the claim has moved the group and opened its stage run, and is about to read the file
    # list before committing: crash right here
    if sql.lstrip().startswith("SELECT subband, path FROM group_files"):
        os.kill(os.getpid(), signal.SIGKILL)

async def main(db):
    q = await GroupQueue.open(Path(db), QueueOptions())
    await q._db.set_trace_callback(die_mid_claim)
    await q.claim("crasher")

asyncio.run(main(sys.argv[1]))
"""


async def test_crash_between_statements_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    async with await GroupQueue.open(db, OPTS) as q:
        await drive(q, G1, "pending")
    proc = subprocess.run([sys.executable, "-c", _CRASH_MID_TRANSACTION, str(db)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    async with await GroupQueue.open(db, OPTS) as q:
        group = await q.get_group(G1)
        assert group["state"] == "pending" and group["worker"] is None
        assert group["stage_runs"] == []
        claim = await q.claim(W)
        assert claim is not None and claim.attempt == 1


# --------------------------------------------------------------------------- schema
def _make_v1_database(path: Path) -> None:
    """A database as version 1 of the queue left it, sharing the file with another component."""
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INT)")
        for statement in MIGRATIONS[1]:
            raw.execute(statement)
        raw.execute("INSERT INTO schema_versions VALUES ('queue', 1), ('calibration', 7)")
        raw.execute("CREATE TABLE caltables (name TEXT, valid_from REAL)")
        raw.execute("INSERT INTO caltables VALUES ('bp.tb', 1.0)")
        raw.execute("INSERT INTO groups (id, anchor, state, created, updated, attempts, "
                    "last_error) VALUES (?, 0, 'failed', 1.0, 2.0, 3, 'disk full')", (G1,))
        raw.execute("INSERT INTO group_files VALUES (?, 0, '/in/x_sb00.hdf5', 5, 1.0)", (G1,))


async def test_migrates_an_older_schema_and_keeps_other_tables(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    _make_v1_database(db)
    async with await GroupQueue.open(db, OPTS) as q:
        group = await q.get_group(G1)
        assert group["state"] == "failed" and group["last_error"] == "disk full"
        assert [e["to_state"] for e in group["events"]] == ["failed"]
        await q.requeue(G1)
        assert await state_of(q, G1) == "pending"
    with sqlite3.connect(db) as raw:
        versions = dict(raw.execute("SELECT component, version FROM schema_versions"))
        assert versions == {"queue": SCHEMA_VERSION, "calibration": 7}
        assert raw.execute("SELECT name FROM caltables").fetchall() == [("bp.tb",)]
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    async with await GroupQueue.open(db, OPTS) as q:   # reopening migrates nothing
        assert await state_of(q, G1) == "pending"


async def test_v3_adds_usage_columns_and_keeps_earlier_runs(tmp_path: Path) -> None:
    """A v2 database with a finished run gains cpu_s/peak_rss_mb/qa_s, NULL for that run."""
    db = tmp_path / "q.sqlite"
    with sqlite3.connect(db) as raw:
        raw.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INT)")
        for version in (1, 2):
            for statement in MIGRATIONS[version]:
                raw.execute(statement)
        raw.execute("INSERT INTO schema_versions VALUES ('queue', 2)")
        raw.execute("INSERT INTO groups (id, anchor, state, created, updated) "
                    "VALUES (?, 0, 'converted', 1.0, 2.0)", (G1,))
        raw.execute("INSERT INTO stage_runs (group_id, stage, attempt, started, finished, "
                    "duration_s, outcome) VALUES (?, 'conversion', 1, 1.0, 2.0, 1.0, 'ok')", (G1,))
    async with await GroupQueue.open(db, OPTS) as q:
        (run,) = (await q.get_group(G1))["stage_runs"]
        assert run["duration_s"] == 1.0 and run["outcome"] == "ok"
        assert run["cpu_s"] is None and run["peak_rss_mb"] is None and run["qa_s"] is None
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT version FROM schema_versions WHERE component = 'queue'"
                           ).fetchone()[0] == SCHEMA_VERSION >= 3


async def test_complete_records_worker_usage_and_qa_time(queue: GroupQueue) -> None:
    await drive(queue, G1, "converting")
    await queue.complete(G1, W, 12.5, {"rms": 1.0}, cpu_s=20.25, peak_rss_mb=512.0, qa_s=0.4)
    assert (await queue.claim(W)).stage == "calibration"
    await queue.complete(G1, W, 3.0, {}, cpu_s=float("nan"))  # unknown usage stays NULL
    conv, cal = (await queue.get_group(G1))["stage_runs"]
    assert (conv["duration_s"], conv["cpu_s"], conv["peak_rss_mb"], conv["qa_s"]) == \
        (12.5, 20.25, 512.0, 0.4)
    assert cal["cpu_s"] is None and cal["peak_rss_mb"] is None and cal["qa_s"] is None


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    with sqlite3.connect(db) as raw:
        raw.execute("CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INT)")
        raw.execute("INSERT INTO schema_versions VALUES ('queue', ?)", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer than this software"):
        await GroupQueue.open(db, OPTS)


async def test_foreign_keys_are_enforced(queue: GroupQueue) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        async with queue._write() as db:
            await db.execute("INSERT INTO group_files VALUES ('nope', 0, '/x', 1, 1.0)")


# --------------------------------------------------------------------------- CLI helpers
async def test_status_report_and_requeue_messages(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    with pytest.raises(ConfigError, match="no queue database"):
        await status_report(db, as_json=False)
    async with await GroupQueue.open(db, OPTS) as q:
        await drive(q, G1, "quarantined")
        await drive(q, G2, "converting")
    text = await status_report(db, as_json=False)
    assert "quarantined       1" in text and "converting        1" in text
    assert G1 in text and "bad data" in text and f"worker {W}" in text
    data = json.loads(await status_report(db, as_json=True))
    assert data["counts"]["quarantined"] == 1 and data["counts"]["done"] == 0
    assert {g["id"] for g in data["groups"]} == {G1, G2}

    assert await requeue_group(db, G1) == f"group {G1} requeued to pending (was quarantined: bad data)"
    with pytest.raises(IllegalTransition, match="only failed or quarantined"):
        await requeue_group(db, G2)
    with pytest.raises(UnknownGroup, match="no group 2030-01-01T00:00:00"):
        await requeue_group(db, "2030-01-01T00:00:00")
    with pytest.raises(InvalidName, match="YYYY-MM-DDTHH:MM:SS"):
        await requeue_group(db, "../../etc/passwd")


async def test_wake_flagged_releases_held_groups(tmp_path):
    from dsa110_contimg.config import QueueOptions
    from dsa110_contimg.daemon.queue import GroupQueue

    async with await GroupQueue.open(tmp_path / "q.sqlite", QueueOptions()) as q:
        for gid in ("2026-06-01T00:00:00", "2026-06-01T00:05:00"):
            await q.create_group(gid)
            await q.record_file(gid, 0, tmp_path / f"{gid}_sb00.hdf5", 10, 1.0)
            await q.mark_ready(gid)
        c = await q.claim("w1")
        await q.set_flag(c.group_id, "held", "no calibration yet")
        await q.defer(c.group_id, "w1", until_ts=4e9, reason="no calibration yet")
        c2 = await q.claim("w1")
        assert c2.group_id != c.group_id
        assert await q.claim("w1") is None, "the held group waits"
        assert await q.wake_flagged("held") == [c.group_id]
        again = await q.claim("w1")
        assert again.group_id == c.group_id and "held" not in again.flags
        assert await q.wake_flagged("held") == []


def test_canonical_time_is_the_most_common_stamp_then_the_earliest() -> None:
    from dsa110_contimg.daemon.queue import canonical_time
    from dsa110_contimg.products import group_id_for

    names = [f"/in/2026-06-01T04:46:0{s}_sb{k:02d}.hdf5" for k, s in enumerate([7, 6, 6, 8, 6])]
    assert group_id_for(canonical_time(names)) == "2026-06-01T04:46:06"
    tie = [f"/in/2026-06-01T04:46:0{s}_sb{k:02d}.hdf5" for k, s in enumerate([9, 7, 8])]
    assert group_id_for(canonical_time(tie)) == "2026-06-01T04:46:07"


async def test_a_group_first_named_by_a_jittered_file_is_renamed_to_its_canonical_time(
        queue: GroupQueue) -> None:
    first = "2026-06-01T04:46:09"  # a stray, jittered file arrived first and named the group
    canonical = "2026-06-01T04:46:06"
    await queue.create_group(first)
    await queue.record_file(first, 5, Path(f"/in/{first}_sb05.hdf5"), 10, 1.0)
    for sb in (0, 1, 2):
        await queue.record_file(first, sb, Path(f"/in/{canonical}_sb{sb:02d}.hdf5"), 10, 1.0)
    await queue.set_flag(first, "incomplete", "timed out, processing anyway")
    assert await queue.mark_ready(first) == canonical
    group = await queue.get_group(canonical)
    assert group["state"] == "pending" and len(group["files"]) == 4
    assert group["anchor"] == group_time(canonical).timestamp()
    assert group["flags"]["incomplete"] and group["events"][0]["to_state"] == "collecting"
    assert any("renamed from" in (e["reason"] or "") for e in group["events"])
    assert first not in {g["id"] for g in await queue.list_groups()}
    with sqlite3.connect(queue.path) as raw:
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []


async def test_a_group_stopped_at_ingest_is_named_by_its_canonical_time_too(
        queue: GroupQueue) -> None:
    stray, canonical = "2026-06-01T04:46:08", "2026-06-01T04:46:06"
    await queue.create_group(stray)
    await queue.record_file(stray, 2, Path(f"/in/{stray}_sb02.hdf5"), 10, 1.0)
    for sb in (0, 1, 3):
        await queue.record_file(stray, sb, Path(f"/in/{canonical}_sb{sb:02d}.hdf5"), 10, 1.0)
    assert await queue.quarantine(stray, "duplicate subband sb02") == canonical
    assert await state_of(queue, canonical) == "quarantined"
