"""The systemd notify protocol, spoken directly on ``NOTIFY_SOCKET`` (no libsystemd needed).

READY=1 once the daemon is serving, STATUS= with queue counts, WATCHDOG=1 pings sent from
the event loop itself, so a stuck loop stops pinging and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    def __init__(self, socket_path: str | None = None) -> None:
        self.path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        if self.path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        if self._sock is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        addr = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        try:
            self._sock.sendto(msg, addr)
            return True
        except OSError as exc:  # systemd gone or socket full: never fatal
            log.debug("sd_notify_failed", error=str(exc))
            return False

    def ready(self, status: str = "") -> None:
        self.send(ready=1, status=status) if status else self.send(ready=1)

    def status(self, text: str) -> None:
        self.send(status=text)

    def stopping(self) -> None:
        self.send(stopping=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """Half the WatchdogSec systemd gave us (WATCHDOG_USEC), or None when not supervised."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None


async def watchdog_loop(notifier: Notifier, interval_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        notifier.send(watchdog=1)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            pass
