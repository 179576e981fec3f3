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
from dsa110_contimg.daemon.queue import GroupQueue


async def main(db: Path) -> None:
    q = await GroupQueue.open(db, QueueOptions())
    t0 = 1_780_000_000.0
    ids = ["2026-06-01T04:46:06", "2026-06-01T04:51:15", "2026-06-01T04:56:24",
           "2026-06-01T05:01:33", "2026-06-01T05:06:42"]
    for k, gid in enumerate(ids):
        await q.create_group(gid, now=t0 + k)
        for sb in range(16):
            await q.record_file(gid, sb, f"/data/incoming/{gid}_sb{sb:02d}.hdf5", 1000 + sb, t0 + k)
        await q.mark_ready(gid, "all subbands complete", now=t0 + 10 + k)
    w = "old-host:1:abcd"
    # group 0: done (three stages)
    for stage_k in range(3):
        c = await q.claim(w, now=t0 + 100 + stage_k)
        assert c and c.group_id == ids[0], c
        if stage_k == 0:
            await q.set_flag(ids[0], "conversion", {"ms_path": "/data/products/x.ms", "mid_mjd": 61192.2,
                                                      "pointing_dec_deg": 30.7})
        await q.complete(ids[0], w, 12.5, {"result": {"k": stage_k}, "qa": {"passed": True}})
    # group 1 claimed for conversion; group 2 quarantined at conversion; group 3 claimed
    # (converting) when the old daemon died; then group 1 converted; group 4 stays pending
    c1 = await q.claim(w, now=t0 + 200)
    assert c1.group_id == ids[1], c1
    c2 = await q.claim(w, now=t0 + 201)
    assert c2.group_id == ids[2], c2
    await q.quarantine(ids[2], "BadInputError: truncated file", worker_id=w)
    c3 = await q.claim(w, now=t0 + 202)
    assert c3.group_id == ids[3], c3
    await q.set_flag(ids[1], "conversion", {"ms_path": "/data/products/y.ms", "mid_mjd": 61192.21,
                                            "pointing_dec_deg": 30.7})
    await q.complete(ids[1], w, 11.0, {"result": {}, "qa": {"passed": True}})
    await q.close()
    reg = await CalRegistry.open(db, CalibrationOptions())
    tabs = tuple(CalTable(k, Path(f"/data/products/cal/{k}.tbl"), 61192.0, 61193.0) for k in ("K", "BP", "G"))
    await reg.register(CalSet("2026-06-01T044606_3C286", tabs, "pad3", "3C286", 61192.2, 30.7,
                              {"solint": "inf"}, {"passed": True}))
    await reg.close()
    cat = await ImageCatalog.open(db)
    await cat.close()

try:
    asyncio.run(main(Path(sys.argv[1])))
finally:
    sys.stdout.flush()
    os._exit(0)  # aiosqlite threads of a failed run would otherwise keep it alive
