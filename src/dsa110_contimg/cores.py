"""OpenMP threads for CASA in a stage worker: as many as the rest of the machine leaves free.

CASA's gridding in tclean runs on OpenMP threads. On two cores, two threads cut a full
group's tclean from 163 to 125-128 s when the other core is idle, but spend 19-33 s more
CPU, which a busy second worker needs. The executor gives a task as many threads as cores
are free when it starts (:func:`claim_threads`); between tclean's major cycles the imaging
stage looks again (:class:`CoreShare`), so a clean that started beside another stage takes
the second core once that stage ends. Threads wait passively (``OMP_WAIT_POLICY``): spinning
on a core the other worker needs is pure loss. An operator's ``OMP_NUM_THREADS`` turns all
of this off.
"""

from __future__ import annotations

import ctypes
import os
import resource
import time

_managed = False  # this worker's OpenMP threads are the pipeline's to set (not the operator's)


def claim_threads(threads: int) -> None:
    """In a fresh worker, before CASA loads: start with ``threads`` OpenMP threads."""
    global _managed
    if threads < 1 or "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _managed = True


def managed() -> bool:
    return _managed


def set_omp_threads(n: int) -> bool:
    """Set the thread count of the OpenMP runtime already loaded (CASA's); False if none is."""
    try:
        lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except OSError:
        return False
    lib.omp_set_num_threads(ctypes.c_int(int(n)))
    return True


def _now() -> tuple[float, float, float]:
    """(wall s, CPU s the whole machine was busy, CPU s of this process)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    ticks += [0] * (8 - len(ticks))
    idle = ticks[3] + ticks[4]  # idle, iowait
    busy = (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")
    me = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), busy, me.ru_utime + me.ru_stime


class CoreShare:
    """Cores left free by other processes since the last look (their CPU time over the
    interval: the whole machine's busy time minus this process's own)."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or len(os.sched_getaffinity(0))
        self._mark = _now()

    def free(self) -> tuple[int, float] | None:
        """(whole cores free, cores the others used); None over less than a second."""
        now = _now()
        (t0, b0, o0), self._mark = self._mark, now
        dt = now[0] - t0
        if dt < 1.0:
            return None
        others = max(0.0, (now[1] - b0) - (now[2] - o0)) / dt
        return max(1, min(self.cores, round(self.cores - others))), others
