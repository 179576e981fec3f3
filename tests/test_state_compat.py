"""A state database written by an older release opens and carries on under this code.

``data/state-0648e33.sqlite`` was written by the code at commit 0648e33 (the 0.1 layout:
queue schema 3, calibration registry 1, image catalogue 1) with
``data/make_state_0648e33.py``: one group done, one calibrated, one converted, one quarantined, one
claimed for conversion when the daemon died, one pending, and a registered calibrator set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dsa110_contimg.calibration.options import CalibrationOptions
from dsa110_contimg.config import QueueOptions
from dsa110_contimg.daemon.calregistry import CalRegistry
from dsa110_contimg.daemon.imagecatalog import ImageCatalog
from dsa110_contimg.daemon.queue import GroupQueue
from dsa110_contimg.daemon.stages import CALIBRATION, CONVERSION

OLD_DB = Path(__file__).parent / "data" / "state-0648e33.sqlite"
GIDS = ["2026-06-01T04:46:06", "2026-06-01T04:51:15", "2026-06-01T04:56:24",
        "2026-06-01T05:01:33", "2026-06-01T05:06:42", "2026-06-01T05:11:51"]


@pytest.fixture
def old_db(tmp_path) -> Path:
    db = tmp_path / "contimg.sqlite"
    shutil.copy(OLD_DB, db)
    return db


async def test_an_old_state_database_opens_and_carries_on(old_db):
    queue = await GroupQueue.open(old_db, QueueOptions())
    registry = await CalRegistry.open(old_db, CalibrationOptions())
    images = await ImageCatalog.open(old_db)
    try:
        states = {g["id"]: g["state"] for g in await queue.list_groups(limit=10)}
        assert states == dict(zip(GIDS, ["done", "calibrated", "converted", "quarantined",
                                         "converting", "pending"], strict=True))
        done = await queue.get_group(GIDS[0])
        assert [r["stage"] for r in done["stage_runs"]] == ["conversion", "calibration",
                                                            "imaging"]

        # a restart recovers the group the old daemon held, as it always did
        assert await queue.recover_stale(all_active=True) == [GIDS[4]]
        # the stored state names still drive the stages, and the stored results are read as
        # the stages' typed records: imaging of the calibrated group first ...
        first = await queue.claim("new-worker")
        assert (first.group_id, first.stage) == (GIDS[1], "imaging")
        cal = CALIBRATION.handoff(first.flags)
        assert (cal.mode, cal.calibrator, cal.group_id) == ("solved", "3C286", GIDS[1])
        conv = CONVERSION.handoff(first.flags)
        assert conv.mid_mjd == pytest.approx(61192.2026) and conv.n_antennas == 96
        # ... then calibration of the converted one, then the oldest pending conversion
        second = await queue.claim("new-worker")
        assert (second.group_id, second.stage) == (GIDS[2], "calibration")
        third = await queue.claim("new-worker")
        assert (third.group_id, third.stage) == (GIDS[4], "conversion")
        assert await queue.complete(GIDS[2], "new-worker", 3.0, {"qa": {"passed": True}}) \
            == "calibrated"
        assert await queue.complete(GIDS[1], "new-worker", 3.0, {"qa": {"passed": True}}) \
            == "done"
        await queue.requeue(GIDS[3])
        assert await queue.group_state(GIDS[3]) == "pending"

        found = await registry.find_valid(61192.2026, 30.7)
        assert found is not None and found.name == "2026-06-01T045115_3C286"
        assert {t.kind for t in found.tables} == {"K", "BP", "G"}
        assert await images.list_images() == []
    finally:
        await images.close()
        await registry.close()
        await queue.close()
