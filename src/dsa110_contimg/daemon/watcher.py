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
from .fsgate import FsGate, MountHung
from .grouping import Grouper
from .queue import GroupQueue

log = structlog.get_logger(__name__)

__all__ = ["Watcher", "run_ingest"]

_Signature = tuple[int, int, int]
_MAX_IGNORED = 10_000
_FIRST_RESCAN_S = 1.0
_GONE_POLL_S = 1.0  # how often a directory that cannot be listed is looked for again


def _stat(path: Path) -> _Signature | str | None:
    """(inode, size, mtime_ns) of a regular file; None when it is gone; else why not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return str(exc)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _stat_all(paths: list[Path]) -> list[_Signature | str | None]:
    return [_stat(p) for p in paths]


def _listing(directory: Path) -> tuple[tuple[int, int], list[str]] | str:
    """The directory's identity (device, inode) and its entries' names, or why not."""
    try:
        st = directory.stat()
        with os.scandir(directory) as entries:
            return (st.st_dev, st.st_ino), [e.name for e in entries]
    except OSError as exc:
        return str(exc)


class Watcher:
    """Forwards new, changed and vanished ``*_sbNN.hdf5`` paths of one directory.

    Every filesystem call goes through ``fs`` (the input mount's :class:`FsGate`): a hung
    mount pauses the watcher instead of the event loop. When the directory itself goes away
    or is replaced (a mount coming or going), the OS watch is started again on what is there
    now; until then the rescans carry on by path.
    """

    def __init__(self, input_dir: Path, on_path: Callable[[Path], None], *,
                 rescan_interval_s: float = 60.0, debounce_ms: int = 200,
                 force_polling: bool | None = None, fs: FsGate | None = None) -> None:
        # awatch reports paths under the directory exactly as given, so keep one spelling.
        self.input_dir = Path(os.path.abspath(input_dir))
        self._on_path = on_path
        self._rescan_s = max(_FIRST_RESCAN_S, rescan_interval_s)
        self._debounce_ms = debounce_ms
        self._force_polling = force_polling
        self._fs = fs or FsGate("input", self.input_dir)
        self._known: dict[str, _Signature] = {}
        self._ignored: set[str] = set()
        self._identity: tuple[int, int] | None = None
        self._scan_error: str | None = None
        self.forwarded = 0

    def _wanted(self, path: Path) -> bool:
        """A subband file directly in the input directory (others are remembered as ignored)."""
        name = path.name
        if path.parent != self.input_dir:
            return False  # non-recursive: a subdirectory is someone else's business
        try:
            parse_subband_name(name)
        except InvalidName as exc:
            if name not in self._ignored:
                if len(self._ignored) >= _MAX_IGNORED:
                    self._ignored.clear()
                self._ignored.add(name)
                log.debug("watcher.ignored", path=str(path), reason=exc.reason)
            return False
        return True

    async def consider(self, *paths: Path) -> None:
        """Forward each subband file among ``paths`` whose signature is new to us."""
        todo = list(dict.fromkeys(p for p in (Path(os.path.abspath(p)) for p in paths)
                                  if self._wanted(p)))
        if not todo:
            return
        try:
            sigs = await self._fs.call(_stat_all, todo)
        except MountHung as exc:
            log.warning("watcher.stat_skipped", path=str(self.input_dir), error=str(exc))
            return
        for path, sig in zip(todo, sigs, strict=True):
            name = path.name
            if sig is None:
                if self._known.pop(name, None) is not None:
                    self._forward(path)  # let the grouper see it vanish
            elif isinstance(sig, str):
                if sig != "not a regular file":
                    log.warning("watcher.stat_failed", path=str(path), error=sig)
            elif self._known.get(name) != sig:
                self._known[name] = sig
                self._forward(path)

    def _forward(self, path: Path) -> None:
        self.forwarded += 1
        self._on_path(path)

    async def scan(self) -> bool:
        """Consider every entry of the directory, and the files known before that are gone;
        False (and nothing forwarded) when the directory cannot be listed."""
        try:
            got = await self._fs.call(_listing, self.input_dir)
        except MountHung as exc:
            got = str(exc)
        if isinstance(got, str):
            if got != self._scan_error:
                log.error("watcher.scan_failed", path=str(self.input_dir), error=got)
                self._scan_error = got
            return False
        if self._scan_error is not None:
            log.warning("watcher.scan_ok_again", path=str(self.input_dir), was=self._scan_error)
            self._scan_error = None
        self._identity, names = got
        present = set(names)
        await self.consider(*(self.input_dir / n for n in names),
                            *(self.input_dir / n for n in self._known if n not in present))
        return True

    async def run(self, stop_event: asyncio.Event) -> None:
        """Scan, then follow events (with periodic rescans) until ``stop_event`` is set; the
        OS watch is renewed whenever the directory is replaced (or comes back)."""
        while not await self.scan():
            if await _wait(stop_event, _GONE_POLL_S):
                return
        log.info("watcher.started", path=str(self.input_dir), files=len(self._known))
        while not stop_event.is_set():
            watched = self._identity
            await self._follow(stop_event, watched)
            if stop_event.is_set():
                break
            log.warning("watcher.directory_replaced", path=str(self.input_dir),
                        reason="gone, remounted or replaced: watching it anew")
            while not await self.scan() and not stop_event.is_set():
                await _wait(stop_event, _GONE_POLL_S)
        log.info("watcher.stopped", path=str(self.input_dir))

    async def _follow(self, stop_event: asyncio.Event, watched: tuple[int, int] | None) -> None:
        """One OS watch on the directory as it is now, until it stops or is replaced."""
        next_scan = time.monotonic() + _FIRST_RESCAN_S
        next_look = time.monotonic() + _GONE_POLL_S
        async for changes in awatch(
                self.input_dir, watch_filter=None, debounce=self._debounce_ms, step=50,
                stop_event=stop_event, rust_timeout=int(_FIRST_RESCAN_S * 1000),
                yield_on_timeout=True, recursive=False, force_polling=self._force_polling):
            gone = any(Path(raw) == self.input_dir for _, raw in changes)
            await self.consider(*(Path(raw) for _, raw in changes))
            if time.monotonic() >= next_look:  # an unmount or remount sends no event
                next_look = time.monotonic() + _GONE_POLL_S
                gone |= await self._replaced(watched)
            if gone or time.monotonic() >= next_scan:
                listed = await self.scan()
                next_scan = time.monotonic() + self._rescan_s
                if not listed or self._identity != watched:
                    return


    async def _replaced(self, watched: tuple[int, int] | None) -> bool:
        """Whether the directory is no longer the one watched (gone, mounted over or
        unmounted); a hung mount is not a replacement."""
        try:
            st = await self._fs.call(os.stat, self.input_dir)
        except MountHung:
            return False
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != watched


async def _wait(stop_event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop_event`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop_event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def run_ingest(input_dir: Path, queue: GroupQueue, options: IngestOptions,
                     stop_event: asyncio.Event, emit: Callable[[Alert], None] | None = None,
                     on_ready: Callable[[str], None] | None = None,
                     rescan_interval_s: float = 60.0) -> None:
    """Watcher and grouper together, returning once both have stopped."""
    fs = FsGate("input", Path(input_dir), options.fs_timeout_s, emit=emit)
    grouper = Grouper(queue, options, emit=emit, on_ready=on_ready, fs=fs)
    watcher = Watcher(Path(input_dir), grouper.submit, rescan_interval_s=rescan_interval_s, fs=fs)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(grouper.run(stop_event), name="ingest-grouper")
        tg.create_task(watcher.run(stop_event), name="ingest-watcher")
