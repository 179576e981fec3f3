"""Where stage functions run: a local process pool, or a Dask cluster (one setting).

Every task gets a fresh process (a forkserver child locally, a child interpreter on Dask): CASA is not thread-safe, keeps global state, and python-casacore and casatools must
not share a process. A forkserver with the scientific stack preloaded keeps that cheap.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from typing import Any, Protocol

import structlog

from ..cores import claim_threads
from ..errors import StageError
from .worker import TaskUsage, call_stage

log = structlog.get_logger(__name__)

_PRELOAD = ["numpy", "scipy.special", "h5py", "astropy.time", "astropy.coordinates", "pyuvdata",
            "dsa110_contimg.conversion.preload"]


def _worker_init(log_level: str, log_format: str) -> None:
    # The worker is an extension of the entrypoint: same log format, no GUI backends.
    os.environ.setdefault("MPLBACKEND", "Agg")
    from ..logs import configure_logging

    configure_logging(log_level, log_format)
    _stderr_to_casa_logs()


def _stderr_to_casa_logs() -> None:
    """CASA's C++ logger prints WARN/SEVERE lines on stderr; keep them (and any other raw
    stderr) in STATE_DIR/casa/logs so journald holds only our JSON events."""
    site = os.environ.get("CASASITECONFIG")
    if not site:
        return
    logdir = os.path.join(os.path.dirname(site), "logs")
    try:
        os.makedirs(logdir, exist_ok=True)
        fd = os.open(os.path.join(logdir, "worker-stderr.log"),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)


class StageExecutor(Protocol):
    async def run(self, fn: Any, *args: Any, group_id: str | None = None) -> Any: ...
    async def run_measured(self, fn: Any, *args: Any, group_id: str | None = None,
                           nice: int = 0) -> tuple[Any, TaskUsage | None]: ...
    async def shutdown(self, kill: bool = False) -> None: ...
    async def warm(self) -> float | None: ...
    def describe(self) -> str: ...


def _child_main(conn: Any, fn: Any, args: tuple, group_id: str | None, nice: int,
                log_level: str, log_format: str, threads: int = 0) -> None:
    """Worker process body: run one call, send (ok, value, usage), exit without atexit hooks.

    ``os._exit`` because CASA's tools can keep an exiting interpreter alive; the stage has
    already closed its tables and published (or not) by the time it returns.
    """
    import sys

    _die_with_parent()
    claim_threads(threads)  # before CASA's OpenMP runtime loads (nothing loads it earlier)
    _worker_init(log_level, log_format)
    try:
        out: tuple[bool, Any] = (True, call_stage(fn, args, group_id, nice))
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it
        out = (False, exc)
    usage = TaskUsage.of_this_process()
    try:
        conn.send((*out, usage))
    except Exception as exc:  # unpicklable result or exception: send its text
        conn.send((False, RuntimeError(f"{type(out[1]).__name__}: {out[1]} (not picklable: {exc})"),
                   usage))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker if its parent (the forkserver, which exits with the daemon)
    dies, so a crashed daemon leaves no orphan still writing into staging."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalExecutor:
    """A fresh forkserver child per call, at most ``max_workers`` at once.

    A task starts with as many OpenMP threads as this executor leaves cores free
    (:mod:`..cores`): both for a stage that starts alone, one beside a running one.
    """

    def __init__(self, max_workers: int, log_level: str = "INFO", log_format: str = "json") -> None:
        self.max_workers = max_workers
        self.cores = len(os.sched_getaffinity(0))
        self._running = 0
        self._log = (log_level, log_format)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._sem: asyncio.Semaphore | None = None
        self._procs: set[Any] = set()
        self.deaths = 0

    def describe(self) -> str:
        return f"local worker processes (max {self.max_workers})"

    async def run(self, fn: Any, *args: Any, group_id: str | None = None) -> Any:
        return (await self.run_measured(fn, *args, group_id=group_id))[0]

    async def run_measured(self, fn: Any, *args: Any, group_id: str | None = None,
                           nice: int = 0) -> tuple[Any, TaskUsage | None]:
        """The result and the worker's own CPU time and peak RSS (usage is lost on a raise);
        the worker runs ``nice`` steps below the daemon's CPU priority."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_workers)
        async with self._sem:
            threads = max(1, self.cores - self._running)
            self._running += 1
            try:
                return await self._run_one(fn, args, group_id, nice, threads)
            finally:
                self._running -= 1

    async def warm(self) -> float | None:
        """Start the forkserver and run one empty task; the seconds it took.

        The forkserver imports the scientific stack (~4 s on two cores) on first use; done at
        start-up, the first group that arrives does not wait for it. No worker slot is
        taken: a stage started meanwhile waits for the same forkserver, not for this.
        """
        t0 = time.perf_counter()
        await self._run_one(os.getpid, (), None, 0)
        return time.perf_counter() - t0

    async def _run_one(self, fn: Any, args: tuple, group_id: str | None,
                       nice: int, threads: int = 1) -> tuple[Any, TaskUsage]:
        loop = asyncio.get_running_loop()
        parent, child = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_child_main, name=f"contimg-{fn.__name__}",
                                 args=(child, fn, args, group_id, nice, *self._log, threads))
        await asyncio.to_thread(proc.start)
        child.close()
        self._procs.add(proc)
        fut: asyncio.Future = loop.create_future()

        def readable() -> None:
            if fut.done():
                return
            try:
                fut.set_result(parent.recv())
            except EOFError:
                fut.set_exception(EOFError())
            except Exception as exc:  # noqa: BLE001
                fut.set_exception(exc)

        loop.add_reader(parent.fileno(), readable)
        try:
            ok, value, usage = await fut
        except EOFError:
            await asyncio.to_thread(proc.join, 5)
            self.deaths += 1
            log.error("worker_died", function=fn.__name__, exitcode=proc.exitcode)
            raise StageError(f"a worker process died while running {fn.__name__} "
                             f"(exit code {proc.exitcode})") from None
        finally:
            loop.remove_reader(parent.fileno())
            parent.close()
            if proc.is_alive():
                await asyncio.to_thread(proc.join, 2)
            if proc.is_alive():  # cancelled, or an exit that hangs: do not leave it behind
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
            self._procs.discard(proc)
            if not proc.is_alive():
                # the forkserver's two pipes per process are otherwise closed only when the
                # Process is garbage-collected, and a failed task's traceback keeps it alive
                proc.close()
        if ok:
            return value, usage
        raise value

    async def shutdown(self, kill: bool = False) -> None:
        # Abandoned stages: their output only ever lives in staging, never half-published.
        for proc in list(self._procs):
            if proc.is_alive():
                if kill:
                    proc.kill()
                await asyncio.to_thread(proc.join, 10 if kill else None)


class DaskExecutor:
    """Runs the same stage functions on a Dask distributed cluster (``dask://host:port``)."""

    def __init__(self, address: str, stage_timeout_s: float | None = None) -> None:
        self.address = "tcp://" + address.split("://", 1)[1] if address.startswith("dask://") else address
        self.stage_timeout_s = stage_timeout_s
        self._client = None

    def describe(self) -> str:
        return f"dask cluster at {self.address}"

    async def start(self) -> None:
        from distributed import Client

        self._client = await Client(self.address, asynchronous=True)

    async def run(self, fn: Any, *args: Any, group_id: str | None = None) -> Any:
        return (await self.run_measured(fn, *args, group_id=group_id))[0]

    async def run_measured(self, fn: Any, *args: Any, group_id: str | None = None,
                           nice: int = 0) -> tuple[Any, TaskUsage | None]:
        """The result and the usage the task's child interpreter reported about itself."""
        from .isolated import run_isolated

        if self._client is None:
            await self.start()
        assert self._client is not None
        fut = self._client.submit(run_isolated, fn, args, group_id, self.stage_timeout_s,
                                  with_usage=True, nice=nice, pure=False)
        return await fut

    async def warm(self) -> float | None:
        """Nothing to warm: the cluster's workers are already running."""
        return None

    async def shutdown(self, kill: bool = False) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


async def make_executor(executor: str, max_workers: int, log_level: str, log_format: str,
                        stage_timeout_s: float | None = None) -> StageExecutor:
    if executor == "local":
        return LocalExecutor(max_workers, log_level, log_format)
    ex = DaskExecutor(executor, stage_timeout_s)
    await ex.start()
    return ex
