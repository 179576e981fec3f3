"""OpenMP threads for stage workers: claimed from the free cores, re-measured between cycles."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dsa110_contimg import cores


def test_claim_threads_sets_the_count_unless_the_operator_did(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):  # recorded, so restored afterwards
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(cores, "_managed", False)
    cores.claim_threads(2)
    assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cores.managed()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(cores, "_managed", False)
    cores.claim_threads(1)
    assert os.environ["OMP_NUM_THREADS"] == "3" and not cores.managed(), "the operator's wins"


def test_core_share_sees_another_process_keep_a_core_busy():
    share = cores.CoreShare(cores=2)
    assert share.free() is None, "under a second: no estimate"
    share = cores.CoreShare(cores=2)
    hog = subprocess.Popen([sys.executable, "-c",
                            "import time\nt = time.time()\nwhile time.time() - t < 1.6: pass"])
    hog.wait()
    threads, others = share.free()
    assert others >= 0.5, others  # the spinning child, whatever else the machine runs
    assert threads == 1
    time.sleep(1.1)
    threads, others = share.free()
    assert 1 <= threads <= 2 and others >= 0
