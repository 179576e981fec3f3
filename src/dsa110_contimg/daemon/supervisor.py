"""Supervision of the daemon's background tasks (watcher, grouper, monitors, notifier loops).

A task that dies (raises, or returns while the daemon is not stopping) is logged with its
traceback, alerted, and started again after a backoff. One that dies ``max_restarts`` times
within ``window_s`` is given up: a CRITICAL alert goes out and ``on_fatal`` is called, so the
daemon stops and exits non-zero (systemd then restarts it, or its start limit calls for a
human) rather than run on without ingest while ``/health`` says ok.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..alerting.alert import Alert, Severity

log = structlog.get_logger(__name__)

__all__ = ["Supervisor", "TaskStatus"]


@dataclass
class TaskStatus:
    """What ``/health`` reports of one supervised task."""

    state: str = "running"  # running | restarting | failed | stopped
    restarts: int = 0
    last_error: str | None = None
    last_restart: float | None = None
    recent: deque[float] = field(default_factory=deque, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "restarts": self.restarts, "last_error": self.last_error,
                "last_restart": self.last_restart}


class Supervisor:
    """Keeps named coroutine factories running until :meth:`stop`."""

    def __init__(self, emit: Callable[[Alert], None], on_fatal: Callable[[str], None], *,
                 max_restarts: int = 5, window_s: float = 600.0,
                 backoff_s: float = 1.0, backoff_max_s: float = 60.0) -> None:
        self._emit = emit
        self._on_fatal = on_fatal
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.status: dict[str, TaskStatus] = {}
        self.failed: str | None = None  # the task given up, if any
        self._tasks: dict[str, asyncio.Task] = {}
        self._stopping = False

    def start(self, name: str, factory: Callable[[], Awaitable[Any]],
              until: asyncio.Event | None = None) -> None:
        """Run ``factory()`` as task ``name``, restarting it whenever it dies; returning once
        ``until`` is set (the event the task itself stops on) is a normal end."""
        self.status[name] = TaskStatus()
        self._tasks[name] = asyncio.create_task(self._keep(name, factory, until), name=name)

    def tasks(self) -> dict[str, asyncio.Task]:
        return dict(self._tasks)

    def healthy(self) -> bool:
        return all(st.state in ("running", "stopped") for st in self.status.values())

    def report(self) -> dict[str, dict[str, Any]]:
        return {name: st.as_dict() for name, st in self.status.items()}

    async def stop(self) -> None:
        """Cancel every task and wait for them (they should have returned already when their
        stop events were set)."""
        self._stopping = True
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            with suppress(asyncio.CancelledError, Exception):
                await t

    async def _keep(self, name: str, factory: Callable[[], Awaitable[Any]],
                    until: asyncio.Event | None) -> None:
        st = self.status[name]
        while True:
            try:
                await factory()
                if self._stopping or (until is not None and until.is_set()):
                    st.state = "stopped"
                    return
                error = "returned while the daemon is running"
                log.error("task_died", task=name, error=error)
            except asyncio.CancelledError:
                st.state = "stopped"
                raise
            except Exception as exc:  # noqa: BLE001 - every death is logged and restarted
                if self._stopping:
                    st.state = "stopped"
                    return
                error = f"{type(exc).__name__}: {exc}"
                log.error("task_died", task=name, error=error, exc_info=exc)
            now = time.monotonic()
            st.recent.append(now)
            while st.recent and now - st.recent[0] > self.window_s:
                st.recent.popleft()
            st.last_error = error
            if len(st.recent) > self.max_restarts:
                st.state = "failed"
                self.failed = name
                log.critical("task_given_up", task=name, error=error,
                             deaths=len(st.recent), window_s=self.window_s)
                self._alert(Severity.CRITICAL, name, f"Background task {name} keeps dying: "
                            "the daemon stops", f"{len(st.recent)} deaths within "
                            f"{self.window_s:.0f} s; last: {error}")
                self._on_fatal(name)
                return
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (len(st.recent) - 1))
            st.state, st.restarts, st.last_restart = "restarting", st.restarts + 1, time.time()
            self._alert(Severity.ERROR, name, f"Background task {name} died: restarting",
                        f"{error}; restart {st.restarts} in {delay:.0f} s")
            await asyncio.sleep(delay)
            st.state = "running"
            log.warning("task_restarted", task=name, restarts=st.restarts)

    def _alert(self, severity: Severity, name: str, title: str, message: str) -> None:
        try:
            self._emit(Alert(severity, "daemon.task", title, message, {"task": name}))
        except Exception:  # noqa: BLE001 - alerting trouble never stops supervision
            log.exception("task_alert_failed", task=name)
