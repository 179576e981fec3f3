"""Filesystem calls on one mount (the input directory), off the event loop and with a timeout.

A hung NFS mount blocks ``stat`` in the kernel, uninterruptibly. Called on the loop thread it
would stop heartbeats and watchdog pings (systemd then restarts the daemon); called on
asyncio's default executor it would take, one by one, the threads that staging, archiving and
monitoring share. So each call on the input mount runs on a thread of its own. A call that
exceeds the timeout marks the mount hung: no new call is started until that one returns (they
fail at once with :class:`MountHung`), an alert goes out, ``/health`` says so, and when the
call finally returns the mount is usable again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ..alerting.alert import Alert, Severity

log = structlog.get_logger(__name__)

T = TypeVar("T")

__all__ = ["FsGate", "MountHung"]


class MountHung(OSError):
    """A filesystem call did not return in time, or was refused because an earlier one still
    has not."""


class FsGate:
    """Runs blocking calls on ``path``'s filesystem, each on a daemon thread of its own.

    Daemon threads, not a pool: a call stuck in the kernel on a dead mount can never be
    joined, and a pool's threads would hold the daemon's exit until it returns."""

    def __init__(self, name: str, path: Path, timeout_s: float = 30.0,
                 emit: Callable[[Alert], None] | None = None) -> None:
        self.name = name
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._emit = emit
        self._hung: set[asyncio.Future[Any]] = set()
        self.hung_since: float | None = None  # wall time, for the status API
        self._hung_what = ""
        self._closed = False

    @property
    def hung(self) -> bool:
        return bool(self._hung)

    def describe(self) -> dict[str, Any]:
        """For ``/health``: ``ok``, or ``hung`` with since when and on what call."""
        if not self.hung:
            return {"state": "ok", "path": str(self.path)}
        return {"state": "hung", "path": str(self.path), "since": self.hung_since,
                "call": self._hung_what}

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the gate's threads; MountHung when it takes longer than the
        timeout or while an earlier call is hung."""
        if self._hung:
            raise MountHung(f"{self.path}: filesystem not answering since "
                            f"{time.time() - (self.hung_since or time.time()):.0f} s "
                            f"({self._hung_what}); call not started")
        if self._closed:
            raise MountHung(f"{self.path}: the daemon is stopping")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(value: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)

        def run() -> None:
            try:
                value, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                value, error = None, exc
            try:
                loop.call_soon_threadsafe(settle, value, error)
            except RuntimeError:  # the loop closed while this call hung: nobody waits
                pass

        threading.Thread(target=run, name=f"contimg-fs-{self.name}", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            self._hang(fut, f"{getattr(fn, '__name__', fn)}({', '.join(map(str, args))[:200]})")
            raise MountHung(f"{self.path}: {getattr(fn, '__name__', 'call')} did not return "
                            f"within {self.timeout_s:.0f} s") from None

    def _hang(self, fut: asyncio.Future[Any], what: str) -> None:
        first = not self._hung
        self._hung.add(fut)
        fut.add_done_callback(self._returned)
        if not first:
            return
        self.hung_since, self._hung_what = time.time(), what
        log.error("mount_hung", mount=self.name, path=str(self.path), call=what,
                  timeout_s=self.timeout_s)
        self._alert(Severity.CRITICAL, f"{self.name} filesystem hung: {self.path}",
                    f"{what} has not returned within {self.timeout_s:.0f} s. Ingest from it "
                    "is paused; nothing is timed out or quarantined meanwhile.")

    def _returned(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled():
            fut.exception()  # retrieved: the caller gave up on it long ago
        self._hung.discard(fut)
        if self._hung:
            return
        lasted = time.time() - (self.hung_since or time.time())
        log.warning("mount_answering", mount=self.name, path=str(self.path),
                    hung_s=round(lasted, 1))
        self._alert(Severity.INFO, f"{self.name} filesystem answering again: {self.path}",
                    f"It did not answer for {lasted:.0f} s.")
        self.hung_since = None

    def _alert(self, severity: Severity, title: str, message: str) -> None:
        if self._emit is None:
            return
        try:
            self._emit(Alert(severity, f"{self.name}.hung", title, message,
                             {"path": str(self.path)}))
        except Exception:  # noqa: BLE001 - alerting trouble never stops ingest
            log.exception("mount_alert_failed", mount=self.name)

    def close(self) -> None:
        """Stop accepting calls; a hung thread is left to the kernel (never joined)."""
        self._closed = True
