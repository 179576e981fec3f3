"""Read rows of the UVH5 data sets directly with h5py, in blocks of whole integrations.

pyuvdata reads a file into one UVData; for a full group that is the 9 GB peak we are
avoiding. The header (validated by :mod:`.validate`) tells us the layout, so the data sets
can be sliced directly: visdata, flags and nsamples, rows ``[r0, r1)`` of the
baseline-time axis. Flags and nsamples are usually constant (no correlator flags, one
sample each) and LZF-compressed; decompressing them costs as much as reading the
visibilities, so :func:`constant_value` proves them constant from the raw chunk bytes
(identical compressed chunks hold identical data) and skips the decompression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import BadInputError


@dataclass(frozen=True)
class RowPlan:
    """How to fetch the file rows that feed output rows ``[r0, r1)``."""

    r0: int
    r1: int
    source: slice  # rows read from the file (contiguous or strided)
    take: np.ndarray | None  # then reorder/select these rows of what was read


def plan_reads(order: np.ndarray, bounds: list[tuple[int, int]]) -> list[RowPlan]:
    """For output blocks ``bounds`` over ``order`` (file row of each output row), the
    cheapest h5py selection: a slice when the rows are an arithmetic progression (time-major
    files: contiguous; baseline-major: strided), else the covering range plus a take."""
    plans = []
    for r0, r1 in bounds:
        src = order[r0:r1]
        if src.size == 1:
            plans.append(RowPlan(r0, r1, slice(int(src[0]), int(src[0]) + 1), None))
            continue
        step = int(src[1] - src[0])
        if step > 0 and np.all(np.diff(src) == step):
            plans.append(RowPlan(r0, r1, slice(int(src[0]), int(src[-1]) + 1, step), None))
        else:
            lo, hi = int(src.min()), int(src.max()) + 1
            plans.append(RowPlan(r0, r1, slice(lo, hi), src - lo))
    return plans


def open_uvh5(path: Path) -> h5py.File:
    """Open with a chunk cache big enough to keep a chunk row that straddles two blocks
    (chunks wholly inside a read bypass the cache, so this is not a per-file buffer)."""
    try:
        fh = h5py.File(path, "r", rdcc_nbytes=16 << 20, rdcc_nslots=10_007)
        vis = fh["Data/visdata"]
    except Exception as exc:
        raise BadInputError(f"cannot open for reading: {exc}", path=str(path)) from None
    if vis.dtype.names is not None:
        if "r" not in vis.dtype.names or "i" not in vis.dtype.names:
            raise BadInputError(f"visdata has unsupported dtype {vis.dtype}", path=str(path))
    elif vis.dtype.kind != "c":
        raise BadInputError(f"visdata has unsupported dtype {vis.dtype}", path=str(path))
    return fh


def _dataset(fh: h5py.File, name: str) -> h5py.Dataset:
    return fh["Data/" + name]


def _squeeze_spw(a: np.ndarray) -> np.ndarray:
    return a[:, 0] if a.ndim == 4 else a


def read_block(dset: h5py.Dataset, plan: RowPlan, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of a data set as (nrow, nfreq, npol) following ``plan``; complex as complex64."""
    sel = (plan.source,) + (slice(None),) * (dset.ndim - 1)
    if dset.dtype.names is not None:  # compound {r, i} (possibly integers)
        raw = dset[sel]
        arr = np.empty(raw.shape, dtype=np.complex64)
        arr.real = raw["r"]
        arr.imag = raw["i"]
    elif (out is not None and plan.take is None and dset.ndim == 3 and dset.dtype == out.dtype
          and out.shape == (plan.r1 - plan.r0,) + dset.shape[1:]):
        dset.read_direct(out, sel)
        return out
    else:
        arr = dset[sel]
    arr = _squeeze_spw(arr)
    if plan.take is not None:
        arr = arr[plan.take]
    if out is not None:
        out[...] = arr
        return out
    return arr


def constant_value(dset: h5py.Dataset) -> Any | None:
    """The single value of a data set that is provably constant, else None.

    Cheap: reads the raw (compressed) bytes of every chunk — a few kB for a constant data
    set — and decompresses only one representative chunk per distinct byte string. A chunk
    lying wholly inside the data set that decompresses to one value proves every chunk with
    the same bytes holds that value; edge chunks with other bytes are read and checked.
    """
    if dset.chunks is None or dset.size == 0:
        return None
    infos: list[tuple[tuple[int, ...], int, int]] = []
    try:
        dset.id.chunk_iter(lambda i: infos.append((i.chunk_offset, i.byte_offset, i.size)))
    except Exception:
        return None
    n_expected = int(np.prod([-(-s // c) for s, c in zip(dset.shape, dset.chunks, strict=True)]))
    if len(infos) != n_expected:  # unallocated chunks hold the fill value; keep it simple
        return None
    groups: dict[bytes, list[tuple[int, ...]]] = {}
    with open(dset.file.filename, "rb") as fh:
        for offset, byte_offset, size in infos:
            fh.seek(byte_offset)
            groups.setdefault(fh.read(size), []).append(offset)
    if len(groups) > 8:
        return None
    value = None
    for offsets in groups.values():
        inner = next((o for o in offsets if all(
            oo + c <= s for oo, c, s in zip(o, dset.chunks, dset.shape, strict=True))), None)
        check = [inner] if inner is not None else offsets
        for o in check:
            sel = tuple(slice(oo, min(oo + c, s)) for oo, c, s in
                        zip(o, dset.chunks, dset.shape, strict=True))
            block = dset[sel]
            first = block.flat[0]
            if not np.all(block == first):
                return None
            if value is None:
                value = first
            elif first != value:
                return None
    return value


@dataclass(frozen=True)
class GroupProbe:
    """Which flags/nsamples data sets are constant (and their values), per file."""

    flags: list[Any]
    nsamples: list[Any]

    @property
    def uniform_nsamples(self) -> bool:
        """One nsamples value everywhere: WEIGHT_SPECTRUM adds nothing over WEIGHT."""
        vals = self.nsamples
        return all(v is not None for v in vals) and len({float(v) for v in vals}) == 1


def probe_group(paths: list[Path]) -> GroupProbe:
    flags, nsam = [], []
    for p in paths:
        with open_uvh5(p) as fh:
            flags.append(constant_value(fh["Data/flags"]))
            nsam.append(constant_value(fh["Data/nsamples"]))
    return GroupProbe(flags, nsam)


@dataclass(frozen=True)
class FillSpec:
    """One subband file's part of a block (plain data: crosses process boundaries)."""

    path: str  # where to read (maybe a staged copy)
    source: str  # what to name in errors (the original file)
    out_start: int  # first output channel
    nchan: int
    descending: bool
    flag_const: Any  # None: read the flags
    nsam_const: Any  # None: read the nsamples


def fill_block(specs: list[FillSpec], handles: list[h5py.File], plan: RowPlan,
               data: np.ndarray, flags: np.ndarray, nsam: np.ndarray | None,
               buf: np.ndarray) -> list[tuple[str, int, int]]:
    """Read rows ``plan`` of each file into its channels of ``data``/``flags``/``nsam``
    (channels ascending). Non-finite visibilities become 0 and flagged; returns
    (source, n_nonfinite, n_visibilities) per file for the caller's verdict."""
    npol = data.shape[2]
    void = np.dtype((np.void, data.itemsize * npol))  # one channel, all pols
    counts = []
    for spec, h in zip(specs, handles, strict=True):
        c0, c1 = spec.out_start, spec.out_start + spec.nchan
        vis = read_block(h["Data/visdata"], plan, out=buf[:, :spec.nchan])
        bad = None
        if not np.isfinite(vis.view(np.float32).sum()):
            bad = ~np.isfinite(vis)
            vis[bad] = 0
        counts.append((spec.source, 0 if bad is None else int(bad.sum()), int(vis.size)))
        dst = data[:, c0:c1, :]
        if spec.descending:  # reverse whole channels (all pols at once): a 16-byte copy
            dst.view(void)[..., 0] = vis.view(void)[:, ::-1, 0]
        else:
            dst[...] = vis
        fdst = flags[:, c0:c1, :]
        if spec.flag_const is not None:
            fdst[...] = bool(spec.flag_const)
        else:
            fl = read_block(h["Data/flags"], plan)
            fdst[...] = fl[:, ::-1, :] if spec.descending else fl
        if bad is not None:
            fdst |= bad[:, ::-1, :] if spec.descending else bad
        if nsam is not None:
            if spec.nsam_const is not None:
                nsam[:, c0:c1, :] = float(spec.nsam_const)
            else:
                ns = read_block(h["Data/nsamples"], plan).astype(np.float32)
                nsam[:, c0:c1, :] = ns[:, ::-1, :] if spec.descending else ns
    return counts
