"""Read subbands in helper processes while the main process phases and writes.

With ``CONTIMG_CONVERT_PROCESSES`` = P > 1, P - 1 spawned helpers read the subband files
(each a share of them) and phase them for block k+1 into one of two shared buffers while
the conversion process writes block k from the other: reading (h5py) and writing (casacore)
both hold the GIL, so overlapping them needs processes. The buffers are ``np.memmap``
files in the staging directory, so they live on tmpfs when staging does and are removed
with it (also by ``clean_stale_staging`` after a crash). Default P = 1: on two cores
shared with calibration and imaging of other groups the extra process competes with them.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..mstiles import TileFile
from .reader import BlockGeometry, FillSpec, RowPlan, Share, SubbandReader, fill_block

Counts = tuple[list[tuple[str, int, int]], int]

_SHARES: dict[tuple[str, ...], Share] = {}  # per helper process: files stay open between blocks


def buffer_bytes(nmax: int, nchan: int, npol: int, want_nsam: bool) -> int:
    """tmpfs taken by the two buffer sets."""
    return 2 * nmax * nchan * npol * (8 + 1 + (4 if want_nsam else 0))


def _buffers(paths: dict[str, str], nmax: int, nchan: int, npol: int, mode: str
             ) -> dict[str, np.ndarray]:
    shapes = {"data": np.complex64, "flags": np.bool_, "nsam": np.float32}
    return {k: np.memmap(p, dtype=shapes[k], mode=mode, shape=(nmax, nchan, npol))
            for k, p in paths.items()}


def _helper_fill(specs: list[FillSpec], plan: RowPlan, geom: BlockGeometry,
                 paths: dict[str, str], nmax: int, nchan: int, npol: int) -> Counts:
    """Runs in a helper: fill this share of the files into the shared buffers."""
    bufs = _buffers(paths, nmax, nchan, npol, "r+")
    key = tuple(s.path for s in specs)
    if key not in _SHARES:
        _SHARES[key] = Share(specs, [SubbandReader(Path(s.path)) for s in specs], nchan, npol,
                             geom.freqs_hz, geom.pol_perm)
    nsam = np.asarray(bufs["nsam"]) if "nsam" in bufs else None
    out = fill_block(_SHARES[key], plan, geom, np.asarray(bufs["data"]),
                     np.asarray(bufs["flags"]), nsam)
    for b in bufs.values():
        b.flush()
    return out


class ParallelFiller:
    """Double-buffered block filling by helper processes."""

    direct: TileFile | None = None  # always fills its shared buffers

    def __init__(self, specs: list[FillSpec], helpers: int, workdir: Path, nmax: int,
                 nchan: int, npol: int, want_nsam: bool, gaps: np.ndarray) -> None:
        self.nmax, self.nchan, self.npol = nmax, nchan, npol
        helpers = max(1, min(helpers, len(specs)))
        self.shares = [specs[i::helpers] for i in range(helpers)]
        self.paths = []
        self.views: list[dict[str, np.ndarray]] = []
        for slot in (0, 1):
            names = ["data", "flags"] + (["nsam"] if want_nsam else [])
            paths = {k: str(workdir / f"block{slot}.{k}") for k in names}
            views = _buffers(paths, nmax, nchan, npol, "w+")
            views["flags"][:, gaps, :] = True  # channels no subband fills stay flagged
            self.paths.append(paths)
            self.views.append(views)
        self.pool = ProcessPoolExecutor(max_workers=helpers, mp_context=mp.get_context("spawn"))

    def submit(self, plan: RowPlan, geom: BlockGeometry, slot: int) -> list[Future]:
        return [self.pool.submit(_helper_fill, share, plan, geom, self.paths[slot], self.nmax,
                                 self.nchan, self.npol) for share in self.shares]

    @staticmethod
    def wait(futures: list[Future]) -> Counts:
        counts, zeros = [], 0
        for f in futures:
            c, z = f.result()
            counts.extend(c)
            zeros += z
        return counts, zeros

    def buffers(self, slot: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        v = self.views[slot]
        return v["data"][:n], v["flags"][:n], (v["nsam"][:n] if "nsam" in v else None)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.views.clear()
        for paths in self.paths:  # free the tmpfs now rather than with the staging dir
            for p in paths.values():
                Path(p).unlink(missing_ok=True)

    def __enter__(self) -> ParallelFiller:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ThreadFiller:
    """Double-buffered block filling by threads of the conversion process.

    A thread fills its whole share of a block in one call of the compiled kernel, which
    reads the memory-mapped files without Python's lock: two threads use both cores, and
    block k+1 fills while the main thread writes block k to the MS (python-casacore holds
    the lock while it writes). Each thread's files are disjoint channels of the buffers.

    With ``direct`` (the MS's DATA tile file, in the conversion's layout) the threads fill
    the block's rows of that file in place, mapped, instead of a buffer that the writer
    would then copy into it: :attr:`direct` tells the writer to leave DATA alone.
    """

    def __init__(self, specs: list[FillSpec], readers: list[SubbandReader], threads: int,
                 nmax: int, nchan: int, npol: int, want_nsam: bool, gaps: np.ndarray,
                 freqs_hz: np.ndarray, pol_perm: np.ndarray,
                 direct: TileFile | None = None) -> None:
        threads = max(1, min(threads, len(specs)))
        self.shares = [Share(specs[i::threads], readers[i::threads], nchan, npol, freqs_hz,
                             pol_perm) for i in range(threads)]
        self.direct, self.gaps = direct, gaps
        self.sets: list[dict[str, np.ndarray | None]] = []
        for _ in (0, 1):  # fresh 100 MB arrays per block would cost page faults: reuse two
            flags = np.zeros((nmax, nchan, npol), dtype=bool)
            flags[:, gaps, :] = True  # channels no subband fills stay flagged and zero
            self.sets.append({
                "data": (None if direct is not None else
                         np.zeros((nmax, nchan, npol), dtype=np.complex64)), "flags": flags,
                "nsam": np.zeros((nmax, nchan, npol), dtype=np.float32) if want_nsam else None})
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="contimg-fill")
        if direct is not None and direct.padded_rows > direct.nrows:
            direct.rows(direct.nrows, direct.padded_rows)[:] = 0  # the last tile's padding

    def submit(self, plan: RowPlan, geom: BlockGeometry, slot: int) -> list[Future]:
        b = self.sets[slot]
        if self.direct is not None:
            b["data"] = self.direct.rows(plan.r0, plan.r1)  # the previous map goes with it
            if self.gaps.any():
                b["data"][:, self.gaps, :] = 0
        return [self.pool.submit(fill_block, share, plan, geom, b["data"], b["flags"], b["nsam"])
                for share in self.shares]

    wait = staticmethod(ParallelFiller.wait)

    def buffers(self, slot: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        b = self.sets[slot]
        nsam, data = b["nsam"], b["data"]
        assert data is not None
        return data[:n], b["flags"][:n], None if nsam is None else nsam[:n]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.sets.clear()

    def __enter__(self) -> ThreadFiller:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
