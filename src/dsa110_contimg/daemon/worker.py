"""What runs inside a worker process around every stage call, whichever executor started it
(the local pool, an isolated interpreter, a Dask worker): the call itself and the account of
its CPU time and memory."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Any

import structlog

from ..errors import DiskFull, is_no_space


@dataclass(frozen=True)
class TaskUsage:
    """CPU time and peak resident memory of the process that ran one task.

    Measured by the worker itself just before it reports (a forkserver child is not the
    daemon's child, so the daemon cannot ``wait4`` it); children the stage started and waited
    for are included, since their cost is the stage's cost.
    """

    cpu_s: float
    # MiB; the larger of this process and its largest waited-for child. A forked worker
    # starts from the forkserver's footprint (the preloaded modules), so that is a floor.
    peak_rss_mb: float

    @classmethod
    def of_this_process(cls) -> TaskUsage:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(cpu_s=me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                   peak_rss_mb=max(me.ru_maxrss, kids.ru_maxrss) / 1024.0)  # Linux: KiB

    def __add__(self, other: TaskUsage) -> TaskUsage:
        """Two tasks of one stage, one after the other: CPU adds up, peaks do not."""
        return TaskUsage(self.cpu_s + other.cpu_s, max(self.peak_rss_mb, other.peak_rss_mb))


def call_stage(fn: Any, args: tuple, group_id: str | None, nice: int = 0) -> Any:
    """Body of every task, in the worker process: lower its CPU priority by ``nice`` (the
    process is fresh, so this affects this task only), bind the group id for the logs, call."""
    structlog.contextvars.clear_contextvars()
    if group_id:
        structlog.contextvars.bind_contextvars(group_id=group_id)
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as exc:  # always allowed, unless e.g. a syscall filter denies it:
            # keep going at equal priority, but say so (stages then compete for CPU)
            structlog.get_logger(__name__).warning("worker_nice_failed", nice=nice,
                                                   error=exc.strerror)
    try:
        return fn(*args)
    except DiskFull:
        raise
    except (OSError, RuntimeError) as exc:
        if is_no_space(exc):  # whichever stage and library hit it: the daemon holds the group
            raise DiskFull(f"no space left on device: {exc}") from exc
        raise
