"""Read subbands in helper processes while the main process phases and writes.

With ``CONTIMG_CONVERT_PROCESSES`` = P > 1, P - 1 spawned helpers read the subband files
(each a share of them) for block k+1 into one of two shared buffers while the conversion
process phases and writes block k from the other: reading (h5py) and writing (casacore)
both hold the GIL, so overlapping them needs processes. The buffers are ``np.memmap``
files in the staging directory, so they live on tmpfs when staging does and are removed
with it (also by ``clean_stale_staging`` after a crash). Default P = 1: on two cores
shared with calibration and imaging of other groups the extra process competes with them.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .reader import FillSpec, RowPlan, fill_block, open_uvh5

_HANDLES: dict[str, h5py.File] = {}  # per helper process: files stay open between blocks


def buffer_bytes(nmax: int, nchan: int, npol: int, want_nsam: bool) -> int:
    """tmpfs taken by the two buffer sets."""
    return 2 * nmax * nchan * npol * (8 + 1 + (4 if want_nsam else 0))


def _buffers(paths: dict[str, str], nmax: int, nchan: int, npol: int, mode: str
             ) -> dict[str, np.ndarray]:
    shapes = {"data": np.complex64, "flags": np.bool_, "nsam": np.float32}
    return {k: np.memmap(p, dtype=shapes[k], mode=mode, shape=(nmax, nchan, npol))
            for k, p in paths.items()}


def _helper_fill(specs: list[FillSpec], plan: RowPlan, paths: dict[str, str], nmax: int,
                 nchan: int, npol: int) -> list[tuple[str, int, int]]:
    """Runs in a helper: fill this share of the files into the shared buffers."""
    bufs = _buffers(paths, nmax, nchan, npol, "r+")
    handles = []
    for s in specs:
        if s.path not in _HANDLES:
            _HANDLES[s.path] = open_uvh5(Path(s.path))
        handles.append(_HANDLES[s.path])
    n = plan.r1 - plan.r0
    buf = np.empty((n, max(s.nchan for s in specs), npol), dtype=np.complex64)
    nsam = bufs["nsam"][:n] if "nsam" in bufs else None
    counts = fill_block(specs, handles, plan, bufs["data"][:n], bufs["flags"][:n], nsam, buf)
    for b in bufs.values():
        b.flush()
    return counts


class ParallelFiller:
    """Double-buffered block filling by helper processes."""

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

    def submit(self, plan: RowPlan, slot: int) -> list[Future]:
        return [self.pool.submit(_helper_fill, share, plan, self.paths[slot], self.nmax,
                                 self.nchan, self.npol) for share in self.shares]

    @staticmethod
    def wait(futures: list[Future]) -> list[tuple[str, int, int]]:
        out = []
        for f in futures:
            out.extend(f.result())
        return out

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
