"""The input mount's gate: calls off the loop, a timeout, and no new call while one hangs."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from dsa110_contimg.alerting.alert import Severity
from dsa110_contimg.daemon.fsgate import FsGate, MountHung


async def test_a_hung_call_marks_the_mount_hung_until_it_returns(tmp_path: Path):
    alerts = []
    gate = FsGate("input", tmp_path, timeout_s=0.2, emit=alerts.append)
    release = threading.Event()
    started = []

    def hangs():
        started.append(1)
        release.wait(10)
        return "late"

    try:
        assert await gate.call(os.listdir, tmp_path) == []
        loop_beats = 0

        async def beat():
            nonlocal loop_beats
            while True:
                await asyncio.sleep(0.01)
                loop_beats += 1

        beater = asyncio.create_task(beat())
        with pytest.raises(MountHung, match="did not return within"):
            await gate.call(hangs)
        assert loop_beats >= 5, "the event loop kept running while the call hung"
        beater.cancel()
        assert gate.hung and gate.describe()["state"] == "hung"
        with pytest.raises(MountHung, match="call not started"):
            await gate.call(hangs)
        assert len(started) == 1, "no new call is started while one hangs"
        assert [(a.severity, a.category) for a in alerts] == [(Severity.CRITICAL, "input.hung")]
        release.set()
        for _ in range(100):
            if not gate.hung:
                break
            await asyncio.sleep(0.01)
        assert not gate.hung and gate.describe()["state"] == "ok"
        assert alerts[-1].severity == Severity.INFO
        assert await gate.call(os.listdir, tmp_path) == []
    finally:
        release.set()
        gate.close()


async def test_the_gate_uses_threads_of_its_own(tmp_path: Path):
    """A hung input mount must not take the default executor's threads (staging, archiving
    and monitoring use those)."""
    gate = FsGate("input", tmp_path, timeout_s=5)
    try:
        name = await gate.call(lambda: threading.current_thread().name)
    finally:
        gate.close()
    assert name.startswith("contimg-fs-input")
