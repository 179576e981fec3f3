"""Read rows of the UVH5 data sets directly, in blocks of whole integrations.

pyuvdata reads a file into one UVData; for a full group that is the 9 GB peak we are
avoiding. The header (validated by :mod:`.validate`) tells us the layout, so the data sets
can be sliced directly: visdata, flags and nsamples, rows ``[r0, r1)`` of the
baseline-time axis. Uncompressed complex64 visibilities (the usual case) are read in place
from a memory map of the file by the compiled :mod:`.kernel` (:class:`RawVis`); anything
else (compressed, integer, baseline-major rows) goes through h5py into the same kernel. Flags and nsamples are usually constant (no correlator flags, one
sample each) and LZF-compressed; decompressing them costs as much as reading the
visibilities, so :func:`constant_value` proves them constant from the raw chunk bytes
(identical compressed chunks hold identical data) and skips the decompression.
"""

from __future__ import annotations

import mmap
import os
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


def _squeeze_spw(a: np.ndarray) -> np.ndarray:
    return a[:, 0] if a.ndim == 4 else a


def read_block(dset: h5py.Dataset, plan: RowPlan) -> np.ndarray:
    """Rows of a data set as (nrow, nfreq, npol) following ``plan``; complex as complex64."""
    sel = (plan.source,) + (slice(None),) * (dset.ndim - 1)
    if dset.dtype.names is not None:  # compound {r, i} (possibly integers)
        raw = dset[sel]
        arr = np.empty(raw.shape, dtype=np.complex64)
        arr.real = raw["r"]
        arr.imag = raw["i"]
    else:
        arr = dset[sel]
    arr = _squeeze_spw(arr)
    return arr if plan.take is None else arr[plan.take]


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


@dataclass(frozen=True, eq=False)
class BlockGeometry:
    """What turns a block's file rows into MS rows (plain data: crosses process boundaries)."""

    dw: np.ndarray  # per block row: w(new) - w(old), metres, in the file's orientation
    flip: np.ndarray  # per block row: conjugate for CASA's convention
    freqs_hz: np.ndarray  # output channels, ascending
    pol_perm: np.ndarray  # output pol j holds file pol pol_perm[j]


class RawVis:
    """The visibilities of an uncompressed complex64 data set, read in place.

    h5py copies a chunked data set into a row block element by element (8-byte pieces for
    the usual one-polarisation chunks): ~3 s for a full group. Here the file is memory-mapped
    (read-only; its pages are the page cache's) and :func:`.kernel.fill_files` reads every
    chunk where it lies, so a fill thread does a whole block in one call without Python's
    lock and in step with the MS writer. :meth:`release` drops the mapped pages after a
    block, so they do not pile up in the worker's resident memory.
    """

    def __init__(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...] | None,
                 offsets: dict[int, list[tuple[int, int, int]]]) -> None:
        nrow, nchan, npol = shape
        fd = os.open(path, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.src = np.frombuffer(self.mm, dtype=np.complex64, count=len(self.mm) // 8)
        cr, cc, cp = (nrow, nchan, npol) if chunks is None else chunks
        rows = sorted(offsets)
        self.chunk_rows, self.stride = cr, cc * cp
        # element index of chunk m of chunk row r (chunks in the same (channel, pol) order)
        self.starts = np.array([[b // 8 for _, _, b in offsets[r]] for r in rows], dtype=np.int64)
        m_of, inner, chans, pols = [], [], [], []
        for m, (c0, p0, _) in enumerate(offsets[rows[0]]):
            for j in range(min(cc, nchan - c0)):
                for q in range(min(cp, npol - p0)):
                    m_of.append(m)
                    inner.append(j * cp + q)
                    chans.append(c0 + j)
                    pols.append(p0 + q)
        self.m_of, self.inner, self.chans, self.pols = (
            np.asarray(x, dtype=np.int64) for x in (m_of, inner, chans, pols))

    @classmethod
    def open(cls, dset: h5py.Dataset) -> RawVis | None:
        """A raw reader when the bytes on disk are exactly aligned complex64 values, else None."""
        if dset.ndim != 3 or dset.size == 0 or not _raw_complex64(dset.dtype):
            return None
        try:
            if dset.id.get_create_plist().get_nfilters():
                return None
            path = dset.file.filename
            if dset.chunks is None:
                offset = dset.id.get_offset()
                if offset is None or offset % 8:
                    return None
                return cls(path, dset.shape, None, {0: [(0, 0, offset)]})
            infos: list[tuple[tuple[int, ...], int, int]] = []
            dset.id.chunk_iter(lambda i: infos.append((i.chunk_offset, i.byte_offset, i.size)))
        except Exception:
            return None
        nbytes = int(np.prod(dset.chunks)) * 8
        n_expected = int(np.prod([-(-s // c) for s, c in zip(dset.shape, dset.chunks,
                                                                 strict=True)]))
        if (len(infos) != n_expected or any(size != nbytes or off % 8 for _, off, size in infos)):
            return None  # unallocated (fill-value) or unaligned chunks: leave them to h5py
        offsets: dict[int, list[tuple[int, int, int]]] = {}
        for (r, c, p), byte_offset, _ in sorted(infos):
            offsets.setdefault(r // dset.chunks[0], []).append((c, p, byte_offset))
        return cls(path, dset.shape, dset.chunks, offsets)

    def release(self) -> None:
        """Unmap the pages read so far (they stay in the page cache)."""
        self.mm.madvise(mmap.MADV_DONTNEED)


def _raw_complex64(dtype: np.dtype) -> bool:
    """Native little-endian complex64, or a compound {r, i} of float32 laid out the same."""
    native = np.dtype("<c8")
    if dtype.names is None:
        return dtype == native and native.isnative
    if dtype.names != ("r", "i") or dtype.itemsize != 8:
        return False
    fields = dtype.fields
    return (native.isnative and fields["r"][0] == np.dtype("<f4") and fields["r"][1] == 0
            and fields["i"][0] == np.dtype("<f4") and fields["i"][1] == 4)


class SubbandReader:
    """An open subband file: h5py for everything, plus :class:`RawVis` when possible."""

    def __init__(self, path: Path) -> None:
        self.h5 = open_uvh5(path)
        self.raw = RawVis.open(self.h5["Data/visdata"])

    def close(self) -> None:
        self.raw = None  # the map goes with the last reference to it
        self.h5.close()


class Share:
    """The files one fill thread (or helper process) handles, set up once for the kernel."""

    def __init__(self, specs: list[FillSpec], readers: list[SubbandReader], nchan: int,
                 npol: int, freqs_hz: np.ndarray, pol_perm: np.ndarray) -> None:
        from numba.typed import List

        from .kernel import regular

        self.specs, self.readers, self.nchan, self.npol = specs, readers, nchan, npol
        self.pol_perm = pol_perm
        self.pol_out = np.argsort(pol_perm).astype(np.int64)  # file pol -> output pol
        self.chans: list[slice] = []
        self.layout: list[tuple[int, int, np.ndarray, bool]] = []  # base, step, freqs, even
        for spec in specs:
            c0, c1 = spec.out_start, spec.out_start + spec.nchan
            base, step = (c1 - 1, -1) if spec.descending else (c0, 1)
            chans = slice(base, c0 - 1 if c0 else None, -1) if spec.descending else slice(c0, c1)
            freqs = np.ascontiguousarray(freqs_hz[chans], dtype=np.float64)
            self.chans.append(chans)
            self.layout.append((base, step, freqs, regular(freqs)))
        self.raw = [i for i, rd in enumerate(readers) if rd.raw is not None]
        raws = [readers[i].raw for i in self.raw]
        doffs = [(self.layout[i][0] + self.layout[i][1] * rv.chans) * npol
                 + self.pol_out[rv.pols] for i, rv in zip(self.raw, raws, strict=True)]

        def typed(items: list[np.ndarray]) -> Any:  # numba cannot type an empty List
            return List(items) if items else None

        self.srcs = typed([rv.src for rv in raws])
        self.starts = typed([rv.starts for rv in raws])
        self.m_of = typed([rv.m_of for rv in raws])
        self.inner = typed([rv.inner for rv in raws])
        self.chan_of = typed([rv.chans for rv in raws])
        self.doffs = typed(doffs)
        self.freqs = typed([self.layout[i][2] for i in self.raw])
        self.crs = np.array([rv.chunk_rows for rv in raws], dtype=np.int64)
        self.strides = np.array([rv.stride for rv in raws], dtype=np.int64)
        self.regular = np.array([self.layout[i][3] for i in self.raw], dtype=np.bool_)
        self.flag_const = np.array([_flag_code(specs[i].flag_const) for i in self.raw],
                                   dtype=np.int8)


def _flag_code(value: Any) -> int:
    """The kernel's view of a constant flag: -1 read from the file, else 0 or 1."""
    return -1 if value is None else int(bool(value))


def fill_block(share: Share, plan: RowPlan, geom: BlockGeometry, data: np.ndarray,
               flags: np.ndarray, nsam: np.ndarray | None) -> tuple[list[tuple[str, int, int]], int]:
    """Read rows ``plan`` of each file of ``share`` into its channels of ``data``/``flags``/
    ``nsam`` (channels ascending, CASA pol order), phased and conjugated for the MS. NaN/Inf
    become 0 and flagged, exact zeros are flagged; returns (source, n_nonfinite,
    n_visibilities) per file for the caller's verdict, and the zeros flagged."""
    from numba.typed import List

    from .kernel import fill_files

    n = plan.r1 - plan.r0
    nchan, npol, perm = share.nchan, share.npol, share.pol_perm
    if not (data.flags.c_contiguous and flags.flags.c_contiguous):
        raise ValueError("block buffers must be C-contiguous")
    flat_data, flat_flags = data.reshape(-1), flags.reshape(-1)
    for spec, rd, chans in zip(share.specs, share.readers, share.chans, strict=True):
        if spec.flag_const is None:  # constant flags are set by the kernel
            flags[:n, chans, :] = read_block(rd.h5["Data/flags"], plan)[:, :, perm]
        if nsam is not None:
            if spec.nsam_const is not None:
                nsam[:n, chans, :] = float(spec.nsam_const)
            else:
                ns = read_block(rd.h5["Data/nsamples"], plan).astype(np.float32)
                nsam[:n, chans, :] = ns[:, :, perm]
    bad = dict.fromkeys(range(len(share.specs)), 0)
    zeros = 0
    contiguous = plan.take is None and plan.source.step in (None, 1)
    if contiguous and share.raw:
        counts = np.zeros(len(share.raw), dtype=np.int64)
        zeros += fill_files(share.srcs, share.starts, share.crs, share.strides, share.m_of,
                            share.inner, share.chan_of, share.doffs, share.freqs, share.regular,
                            share.flag_const, plan.source.start, n, flat_data, flat_flags,
                            nchan * npol, geom.dw, geom.flip, counts)
        for i, c in zip(share.raw, counts, strict=True):
            bad[i] = int(c)
            share.readers[i].raw.release()
    for i, (spec, rd) in enumerate(zip(share.specs, share.readers, strict=True)):
        if contiguous and i in share.raw:
            continue
        base, step, freqs, even = share.layout[i]
        vis = np.ascontiguousarray(read_block(rd.h5["Data/visdata"], plan)).reshape(-1)
        vis.setflags(write=False)  # the same array type as the memory maps
        nelem = spec.nchan * npol
        chans, pols = np.divmod(np.arange(nelem, dtype=np.int64), npol)
        doff = (base + step * chans) * npol + share.pol_out[pols]
        counts = np.zeros(1, dtype=np.int64)
        zeros += fill_files(List([vis]), List([np.zeros((1, 1), dtype=np.int64)]),
                            np.array([n], dtype=np.int64), np.array([nelem], dtype=np.int64),
                            List([np.zeros(nelem, dtype=np.int64)]),
                            List([np.arange(nelem, dtype=np.int64)]), List([chans]), List([doff]),
                            List([freqs]), np.array([even]),
                            np.array([_flag_code(spec.flag_const)], dtype=np.int8), 0, n,
                            flat_data, flat_flags, nchan * npol, geom.dw, geom.flip, counts)
        bad[i] = int(counts[0])
    return [(spec.source, bad[i], n * spec.nchan * npol)
            for i, spec in enumerate(share.specs)], zeros
