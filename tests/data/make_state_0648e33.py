"""Write the state database tests/test_state_compat.py opens, with the code at 0648e33.

    git worktree add /tmp/old 0648e33
    PYTHONPATH=/tmp/old/src python tests/data/make_state_0648e33.py tests/data/state-0648e33.sqlite

It imports that release's module layout, so it runs only against that checkout.
"""

import asyncio
import os
import sys
from pathlib import Path

from dsa110_contimg.calibration.registry import CalRegistry
from dsa110_contimg.daemon.options import QueueOptions
from dsa110_contimg.imaging.catalog import ImageCatalog

from dsa110_contimg.calibration.calset import CalSet, CalTable
from dsa110_contimg.calibration.options import CalibrationOptions
from dsa110_contimg.conversion.convert import ConversionResult
from dsa110_contimg.daemon.queue import GroupQueue
from dsa110_contimg.daemon.scheduler import _asdict


def conversion_flag(gid: str, mid_mjd: float) -> dict:
    """The conversion record as that release's scheduler stored it (_asdict of its result)."""
    res = ConversionResult(gid, Path(f"/data/products/{gid[:10]}/{gid}/x.ms"), 96, 4560, 24,
                           768, 1.311e9, 1.499e9, 30.7, 197.1, 30.7, mid_mjd, "tmpfs",
                           2_300_000_000, 41.5, ("note",), False, (("read", 3.2),), ("DATA",))
    return _asdict(res)


# what that release's scheduler stored of a calibration (a summary naming the new set)
CALIBRATION_FLAG = {"mode": "solved", "calibrator": "3C286", "applied_set": None,
                    "new_set": "2026-06-01T045115_3C286", "refant": "pad3",
                    "flag_fractions": {"final": 0.05}, "step_durations": {"G": 9.1},
                    "notes": [], "skipped": False}


async def main(db: Path) -> None:
    q = await GroupQueue.open(db, QueueOptions())
    t0 = 1_780_000_000.0
    ids = ["2026-06-01T04:46:06", "2026-06-01T04:51:15", "2026-06-01T04:56:24",
           "2026-06-01T05:01:33", "2026-06-01T05:06:42", "2026-06-01T05:11:51"]
    for k, gid in enumerate(ids):
        await q.create_group(gid, now=t0 + k)
        for sb in range(16):
            await q.record_file(gid, sb, f"/data/incoming/{gid}_sb{sb:02d}.hdf5", 1000 + sb, t0 + k)
        await q.mark_ready(gid, "all subbands complete", now=t0 + 10 + k)
    w = "old-host:1:abcd"
    now = t0 + 100

    async def claim(expect: str, stage: str):
        nonlocal now
        now += 1
        c = await q.claim(w, now=now)
        assert c and (c.group_id, c.stage) == (expect, stage), c
        return c

    # ids[0]: done
    for stage in ("conversion", "calibration", "imaging"):
        await claim(ids[0], stage)
        if stage == "conversion":
            await q.set_flag(ids[0], "conversion", conversion_flag(ids[0], 61192.199))
        await q.complete(ids[0], w, 12.5, {"result": {"stage": stage}, "qa": {"passed": True}})
    # ids[1]: calibrated (waits for imaging)
    await claim(ids[1], "conversion")
    await q.set_flag(ids[1], "conversion", conversion_flag(ids[1], 61192.2026))
    await q.complete(ids[1], w, 11.0, {"result": {}, "qa": {"passed": True}})
    await claim(ids[1], "calibration")
    await q.set_flag(ids[1], "calibration", CALIBRATION_FLAG)
    await q.complete(ids[1], w, 30.0, {"result": CALIBRATION_FLAG, "qa": {"passed": True}})
    await claim(ids[1], "imaging")  # released below: back to calibrated
    # ids[2]: converted (waits for calibration)
    await claim(ids[2], "conversion")
    await q.set_flag(ids[2], "conversion", conversion_flag(ids[2], 61192.2062))
    await q.complete(ids[2], w, 11.0, {"result": {}, "qa": {"passed": True}})
    await claim(ids[2], "calibration")  # released below: back to converted
    # ids[3]: quarantined at conversion
    await claim(ids[3], "conversion")
    await q.quarantine(ids[3], "BadInputError: truncated file", worker_id=w)
    # ids[4]: converting when the old daemon died; ids[5] stays pending
    await claim(ids[4], "conversion")
    await q.release(ids[1], w, now=now + 1)
    await q.release(ids[2], w, now=now + 2)
    await q.close()
    reg = await CalRegistry.open(db, CalibrationOptions())
    tabs = tuple(CalTable(k, Path(f"/data/products/cal/{k}.tbl"), 61192.0, 61193.0)
                 for k in ("K", "BP", "G"))
    await reg.register(CalSet("2026-06-01T045115_3C286", tabs, "pad3", "3C286", 61192.2026, 30.7,
                              {"solint": "inf"}, {"passed": True}))
    await reg.close()
    cat = await ImageCatalog.open(db)
    await cat.close()


try:
    asyncio.run(main(Path(sys.argv[1])))
finally:
    sys.stdout.flush()
    os._exit(0)  # aiosqlite threads of a failed run would otherwise keep it alive
