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

import os
from collections.abc import Iterable, Iterator
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


@dataclass(frozen=True, eq=False)
class BlockGeometry:
    """What turns a block's file rows into MS rows (plain data: crosses process boundaries)."""

    dw: np.ndarray  # per block row: w(new) - w(old), metres, in the file's orientation
    flip: np.ndarray  # per block row: conjugate for CASA's convention
    freqs_hz: np.ndarray  # output channels, ascending
    pol_perm: np.ndarray  # output pol j holds file pol pol_perm[j]


class RawVis:
    """Rows of an uncompressed complex64 visdata read straight from the file with pread.

    h5py copies a chunked data set into a row block element by element (8-byte pieces for
    the usual one-polarisation chunks): ~3 s for a full group. Here whole chunks come into
    a reusable buffer at copy speed and the fused :func:`.kernel.place` scatters them. A
    row of chunks that straddles two blocks is read once and kept for the next block.
    """

    def __init__(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...] | None,
                 offsets: dict[int, list[tuple[int, int, int]]]) -> None:
        self.path, self.shape, self.chunks = path, shape, chunks
        self.offsets = offsets  # first row of a chunk row -> [(chan0, pol0, byte offset)]
        self.fd = os.open(path, os.O_RDONLY)
        self._row: int | None = None  # chunk row held in _buf
        self._buf: np.ndarray | None = None
        self._elements: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(cls, dset: h5py.Dataset) -> RawVis | None:
        """A raw reader when the bytes on disk are exactly complex64 values, else None."""
        if dset.ndim != 3 or dset.size == 0 or not _raw_complex64(dset.dtype):
            return None
        try:
            if dset.id.get_create_plist().get_nfilters():
                return None
            path = dset.file.filename
            if dset.chunks is None:
                offset = dset.id.get_offset()
                return None if offset is None else cls(path, dset.shape, None, {0: [(0, 0, offset)]})
            infos: list[tuple[tuple[int, ...], int, int]] = []
            dset.id.chunk_iter(lambda i: infos.append((i.chunk_offset, i.byte_offset, i.size)))
        except Exception:
            return None
        nbytes = int(np.prod(dset.chunks)) * 8
        n_expected = int(np.prod([-(-s // c) for s, c in zip(dset.shape, dset.chunks,
                                                                 strict=True)]))
        if len(infos) != n_expected or any(size != nbytes for _, _, size in infos):
            return None  # unallocated (fill-value) chunks: leave them to h5py
        offsets: dict[int, list[tuple[int, int, int]]] = {}
        for (r, c, p), byte_offset, _ in sorted(infos):
            offsets.setdefault(r, []).append((c, p, byte_offset))
        return cls(path, dset.shape, dset.chunks, offsets)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _pread(self, buf: np.ndarray, offset: int) -> None:
        view = memoryview(buf).cast("B")
        got = os.preadv(self.fd, [view], offset)
        if got != view.nbytes:
            raise BadInputError(f"file ends inside the visibilities (wanted {view.nbytes} "
                                f"bytes at {offset}, got {got})", path=self.path)

    def pieces(self, a: int, b: int) -> Iterator[Piece]:
        """The chunk rows covering file rows ``[a, b)``."""
        nrow, nchan, npol = self.shape
        if self.chunks is None:
            n = b - a
            if self._buf is None or self._buf.size < n * nchan * npol:
                self._buf = np.empty(n * nchan * npol, dtype=np.complex64)
            self._pread(self._buf[:n * nchan * npol], self.offsets[0][0][2] + a * nchan * npol * 8)
            yield dense_piece(self._buf, nchan, npol, 0, n, a)
            return
        cr, cc, cp = self.chunks
        per_chunk = cr * cc * cp
        for r in range(a - a % cr, b, cr):
            parts = self.offsets[r]
            if self._row != r:
                if self._buf is None:
                    self._buf = np.empty(len(parts) * per_chunk, dtype=np.complex64)
                for m, (_, _, byte_offset) in enumerate(parts):
                    self._pread(self._buf[m * per_chunk:(m + 1) * per_chunk], byte_offset)
                self._row = r
            if self._elements is None:  # every chunk row lists its chunks in the same order
                soff, chans, pols = [], [], []
                for m, (c0, p0, _) in enumerate(parts):
                    for j in range(min(cc, nchan - c0)):
                        for q in range(min(cp, npol - p0)):
                            soff.append(m * per_chunk + j * cp + q)
                            chans.append(c0 + j)
                            pols.append(p0 + q)
                self._elements = (np.asarray(soff, dtype=np.int64),
                                  np.asarray(chans, dtype=np.int64),
                                  np.asarray(pols, dtype=np.int64))
            lo = max(a, r) - r
            yield Piece(self._buf, *self._elements, cc * cp, lo, min(b, r + cr, nrow) - r, r + lo)


@dataclass(frozen=True, eq=False)
class Piece:
    """Rows ``lo..hi`` of some visibilities in a flat buffer, for :func:`.kernel.place`:
    element e (file channel ``chans[e]``, pol ``pols[e]``) of row t sits at
    ``soff[e] + t * stride``; row ``lo`` is file row ``first``."""

    buf: np.ndarray
    soff: np.ndarray
    chans: np.ndarray
    pols: np.ndarray
    stride: int
    lo: int
    hi: int
    first: int


def dense_piece(buf: np.ndarray, nchan: int, npol: int, lo: int, hi: int, first: int) -> Piece:
    """A piece over a C-ordered (rows, nchan, npol) buffer (flat)."""
    chans, pols = np.divmod(np.arange(nchan * npol, dtype=np.int64), npol)
    return Piece(buf, np.arange(nchan * npol, dtype=np.int64), chans, pols, nchan * npol,
                 lo, hi, first)


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
        if self.raw is not None:
            self.raw.close()
        self.h5.close()


def fill_block(specs: list[FillSpec], readers: list[SubbandReader], plan: RowPlan,
               geom: BlockGeometry, data: np.ndarray, flags: np.ndarray,
               nsam: np.ndarray | None) -> tuple[list[tuple[str, int, int]], int]:
    """Read rows ``plan`` of each file into its channels of ``data``/``flags``/``nsam``
    (channels ascending, CASA pol order), phased and conjugated for the MS. Non-finite
    visibilities become 0 and flagged, exact zeros are flagged; returns (source,
    n_nonfinite, n_visibilities) per file for the caller's verdict, and the zeros flagged."""
    from .kernel import place, regular

    n = plan.r1 - plan.r0
    perm = geom.pol_perm
    pol_out = np.argsort(perm).astype(np.int64)  # file pol -> output pol
    contiguous = plan.take is None and plan.source.step in (None, 1)
    nchan, npol = data.shape[1], data.shape[2]
    flat_data, flat_flags = np.asarray(data).reshape(-1), np.asarray(flags).reshape(-1)
    counts, zeros = [], 0
    for spec, rd in zip(specs, readers, strict=True):
        c0, c1 = spec.out_start, spec.out_start + spec.nchan
        base, step = (c1 - 1, -1) if spec.descending else (c0, 1)
        chans = slice(base, c0 - 1 if c0 else None, -1) if spec.descending else slice(c0, c1)
        fdst = flags[:n, chans, :]
        if spec.flag_const is not None:
            fdst[...] = bool(spec.flag_const)
        else:
            fdst[...] = read_block(rd.h5["Data/flags"], plan)[:, :, perm]
        if nsam is not None:
            if spec.nsam_const is not None:
                nsam[:n, c0:c1, :] = float(spec.nsam_const)
            else:
                ns = read_block(rd.h5["Data/nsamples"], plan).astype(np.float32)[:, :, perm]
                nsam[:n, chans, :] = ns
        freqs = np.ascontiguousarray(geom.freqs_hz[chans], dtype=np.float64)
        even = regular(freqs)
        if rd.raw is not None and contiguous:
            s0 = plan.source.start
            pieces: Iterable[Piece] = rd.raw.pieces(s0, s0 + n)
        else:
            vis = np.ascontiguousarray(read_block(rd.h5["Data/visdata"], plan))
            pieces, s0 = [dense_piece(vis.reshape(-1), spec.nchan, npol, 0, n, 0)], 0
        bad = 0
        for pc in pieces:
            doff = (base + step * pc.chans) * npol + pol_out[pc.pols]
            nb, nz = place(pc.buf, pc.soff, pc.stride, pc.chans, pc.lo, pc.hi, pc.first - s0,
                           flat_data, flat_flags, doff, nchan * npol, freqs, even, geom.dw,
                           geom.flip)
            bad += nb
            zeros += nz
        counts.append((spec.source, bad, n * spec.nchan * npol))
    return counts, zeros
