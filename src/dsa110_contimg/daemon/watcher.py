"""Watching the input directory for subband files.

Filesystem events are a hint, not a record: inotify can overflow, network filesystems drop
events, and files present before start-up produce none. So the watcher scans the directory at
start, again shortly after the OS watch is live (closing the gap between the first scan and the
watch), and every ``rescan_interval_s`` after that. Each path is forwarded only when its
(inode, size, mtime) differs from what was last forwarded, so repeated events and rescans cost
nothing downstream, while a file replaced in place (new inode, size or mtime) is noticed.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from watchfiles import awatch

from ..alerting.alert import Alert
from ..config import IngestOptions
from ..products import InvalidName, parse_subband_name
from .grouping import Grouper
from .queue import GroupQueue

log = structlog.get_logger(__name__)

__all__ = ["Watcher", "run_ingest"]

_Signature = tuple[int, int, int]
_MAX_IGNORED = 10_000
_FIRST_RESCAN_S = 1.0


class Watcher:
    """Forwards new, changed and vanished ``*_sbNN.hdf5`` paths of one directory."""

    def __init__(self, input_dir: Path, on_path: Callable[[Path], None], *,
                 rescan_interval_s: float = 60.0, debounce_ms: int = 200,
                 force_polling: bool | None = None) -> None:
        # awatch reports paths under the directory exactly as given, so keep one spelling.
        self.input_dir = Path(os.path.abspath(input_dir))
        self._on_path = on_path
        self._rescan_s = max(_FIRST_RESCAN_S, rescan_interval_s)
        self._debounce_ms = debounce_ms
        self._force_polling = force_polling
        self._known: dict[str, _Signature] = {}
        self._ignored: set[str] = set()
        self.forwarded = 0

    def consider(self, path: Path) -> None:
        """Forward ``path`` if it is a subband file whose signature is new to us."""
        path = Path(os.path.abspath(path))
        name = path.name
        if path.parent != self.input_dir:
            return  # non-recursive: a subdirectory is someone else's business
        try:
            parse_subband_name(name)
        except InvalidName as exc:
            if name not in self._ignored:
                if len(self._ignored) >= _MAX_IGNORED:
                    self._ignored.clear()
                self._ignored.add(name)
                log.debug("watcher.ignored", path=str(path), reason=exc.reason)
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            if self._known.pop(name, None) is not None:
                self._forward(path)  # let the grouper see it vanish
            return
        except OSError as exc:
            log.warning("watcher.stat_failed", path=str(path), error=str(exc))
            return
        if not stat.S_ISREG(st.st_mode):
            return
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._known.get(name) == sig:
            return
        self._known[name] = sig
        self._forward(path)

    def _forward(self, path: Path) -> None:
        self.forwarded += 1
        self._on_path(path)

    def scan(self) -> None:
        """Consider every entry of the directory, and forget files that are gone."""
        present: set[str] = set()
        try:
            with os.scandir(self.input_dir) as entries:
                for entry in entries:
                    present.add(entry.name)
                    self.consider(self.input_dir / entry.name)
        except OSError as exc:
            log.error("watcher.scan_failed", path=str(self.input_dir), error=str(exc))
            return
        for name in [n for n in self._known if n not in present]:
            self.consider(self.input_dir / name)

    async def run(self, stop_event: asyncio.Event) -> None:
        """Scan, then follow events (with periodic rescans) until ``stop_event`` is set."""
        self.scan()
        log.info("watcher.started", path=str(self.input_dir), files=len(self._known))
        next_scan = time.monotonic() + _FIRST_RESCAN_S
        async for changes in awatch(
                self.input_dir, watch_filter=None, debounce=self._debounce_ms, step=50,
                stop_event=stop_event, rust_timeout=int(_FIRST_RESCAN_S * 1000),
                yield_on_timeout=True, recursive=False, force_polling=self._force_polling):
            for _change, raw in changes:
                self.consider(Path(raw))
            if time.monotonic() >= next_scan:
                self.scan()
                next_scan = time.monotonic() + self._rescan_s
        log.info("watcher.stopped", path=str(self.input_dir))


async def run_ingest(input_dir: Path, queue: GroupQueue, options: IngestOptions,
                     stop_event: asyncio.Event, emit: Callable[[Alert], None] | None = None,
                     on_ready: Callable[[str], None] | None = None,
                     rescan_interval_s: float = 60.0) -> None:
    """Watcher and grouper together, returning once both have stopped."""
    grouper = Grouper(queue, options, emit=emit, on_ready=on_ready)
    watcher = Watcher(Path(input_dir), grouper.submit, rescan_interval_s=rescan_interval_s)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(grouper.run(stop_event), name="ingest-grouper")
        tg.create_task(watcher.run(stop_event), name="ingest-watcher")
