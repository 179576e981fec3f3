"""Cheap header-only validation of one group of UVH5 subband files.

Everything here reads headers (pyuvdata ``FastUVH5Meta``, raw HDF5 superblocks) and at most
one visibility per file, so a bad group is refused in well under a second, before any
staging or heavy reading. Each refusal is a :class:`~dsa110_contimg.errors.BadInputError`
naming the offending file and the reason, because the operator's next step is to look at
that file. Quirks that we can convert around are returned as ``notes`` instead.

When subbands disagree, the file that differs from the *majority* is blamed (a group with
one odd subband names that subband, not whichever file happened to be first).
"""

from __future__ import annotations

import struct
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..products import subband_number

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Times of different subbands agree to this (days): 1 ms, far below an integration.
TIME_TOL_DAYS = 1e-3 / 86400.0
#: Antenna positions of different subbands agree to this (m).
ANTPOS_TOL_M = 1e-3
#: Channel widths agree to this fraction.
WIDTH_RTOL = 1e-6


@dataclass(frozen=True, eq=False)
class SubbandFile:
    """One validated subband file and where its channels go in the combined band."""

    path: Path
    subband: int | None
    freqs_hz: np.ndarray  # as stored in the file
    channel_width_hz: float  # signed, as stored (negative: channels run downwards)
    nbytes: int
    out_start: int = 0  # first output channel (ascending grid) this file fills
    origin: Path | None = None  # the file as handed to us, when ``path`` is a staged copy

    @property
    def source(self) -> Path:
        """The path to name in errors: the original, not the staged copy."""
        return self.origin or self.path

    @property
    def nchan(self) -> int:
        return int(self.freqs_hz.size)

    @property
    def descending(self) -> bool:
        return bool(self.nchan > 1 and self.freqs_hz[1] < self.freqs_hz[0]) or (
            self.nchan == 1 and self.channel_width_hz < 0)


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """A validated group: files in ascending frequency and the shared axes."""

    files: tuple[SubbandFile, ...]
    freqs_hz: np.ndarray  # output grid, ascending (gap channels included)
    channel_width_hz: float  # positive
    filled: np.ndarray  # bool per output channel: False where no subband supplied data
    n_blts: int
    n_times: int
    n_bls: int
    n_pols: int
    polarizations: tuple[int, ...]
    pointing_dec_rad: float | None
    input_bytes: int
    notes: tuple[str, ...] = field(default=())

    @property
    def reference(self) -> Path:
        return self.files[0].path


def hdf5_eof_address(path: Path) -> tuple[int, int] | None:
    """(superblock offset, end-of-file address) from the HDF5 superblock, or None if absent.

    HDF5 records the file's end address in its superblock when the file is closed; a file
    shorter than that was truncated (an interrupted copy, or one still being written).
    """
    with open(path, "rb") as fh:
        base = 0
        while True:
            fh.seek(base)
            head = fh.read(64)
            if len(head) < 16:
                return None
            if head[:8] == HDF5_SIGNATURE:
                break
            base = 512 if base == 0 else base * 2
            if base > (1 << 30):
                return None
    version = head[8]
    if version in (0, 1):
        size_off = head[13]
        pos = 24 if version == 0 else 28
    elif version in (2, 3):
        size_off = head[9]
        pos = 12
    else:
        return base, -1
    fmt = {4: "<I", 8: "<Q"}.get(size_off)
    if fmt is None:
        return base, -1
    # base address, then (free-space | superblock extension) address, then end-of-file address
    base_addr = struct.unpack_from(fmt, head, pos)[0]
    eof = struct.unpack_from(fmt, head, pos + 2 * size_off)[0]
    return base, int(base_addr) + int(eof)


def check_hdf5_file(path: Path) -> int:
    """Size in bytes of a complete HDF5 file; BadInputError if missing, not HDF5 or truncated."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadInputError("file does not exist", path=str(path)) from None
    except OSError as exc:
        raise BadInputError(f"cannot stat file: {exc.strerror}", path=str(path)) from None
    if size == 0:
        raise BadInputError("file is empty", path=str(path))
    try:
        sb = hdf5_eof_address(path)
    except OSError as exc:
        raise BadInputError(f"cannot read file: {exc.strerror}", path=str(path)) from None
    if sb is None:
        raise BadInputError("not an HDF5 file (no HDF5 signature)", path=str(path))
    _, eof = sb
    if eof > size:
        raise BadInputError(
            f"truncated: {size} bytes on disk but the HDF5 superblock says {eof} "
            "(interrupted copy, or still being written)", path=str(path))
    return size


def _data_shape_problem(datagrp: Any, n_blts: int, n_freqs: int, n_pols: int,
                        names: Sequence[str]) -> str | None:
    """None when each dataset Data/<name> exists with the header's (Nblts, Nfreqs, Npols)
    shape (pre-3.0 files' spw axis of 1 allowed), else what is wrong."""
    for name in names:
        if name not in datagrp:
            return f"missing dataset Data/{name}"
        shape = tuple(datagrp[name].shape)
        if len(shape) == 4 and shape[1] == 1:
            shape = (shape[0], shape[2], shape[3])
        if shape != (n_blts, n_freqs, n_pols):
            return (f"Data/{name} has shape {shape}, header says "
                    f"({n_blts}, {n_freqs}, {n_pols})")
    return None


def check_uvh5_header(path: Path) -> str | None:
    """None when the UVH5 header opens and agrees with the data shape; else the reason.

    The cheap check ingest makes before a group is queued. HDF5 itself refuses a file
    shorter than the end-of-file its superblock records, which is what a truncated copy looks
    like. ``locking=False`` so that reading never blocks the correlator from reopening the
    file for writing.
    """
    import h5py
    from pyuvdata.uvdata.uvh5 import FastUVH5Meta

    try:
        with h5py.File(path, "r", locking=False) as f:
            meta = FastUVH5Meta(f)
            return _data_shape_problem(meta.datagrp, int(meta.Nblts), int(meta.Nfreqs),
                                       int(meta.Npols), ("visdata",))
    except Exception as exc:  # any failure to read the header is the answer, not a crash
        return f"{type(exc).__name__}: {exc}"


@dataclass
class _Header:
    path: Path
    nbytes: int
    n_blts: int
    n_freqs: int
    n_pols: int
    n_times: int
    n_bls: int
    freqs: np.ndarray
    width: np.ndarray
    pols: tuple[int, ...]
    times: np.ndarray  # per blt
    ant1: np.ndarray
    ant2: np.ndarray
    ant_numbers: np.ndarray
    ant_positions: np.ndarray
    location: tuple[float, float, float]
    pointing_dec: float | None
    cat_types: tuple[str, ...]
    vis_dtype: str


def read_header(path: Path) -> _Header:
    """Read what validation needs from one file's header, translating failures."""
    from pyuvdata.uvdata.uvh5 import FastUVH5Meta

    nbytes = check_hdf5_file(path)
    meta = FastUVH5Meta(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = _Header(
                path=path, nbytes=nbytes,
                n_blts=int(meta.Nblts), n_freqs=int(meta.Nfreqs), n_pols=int(meta.Npols),
                n_times=int(meta.Ntimes), n_bls=int(meta.Nbls),
                freqs=np.asarray(meta.freq_array, dtype=float).ravel(),
                width=np.atleast_1d(np.asarray(meta.channel_width, dtype=float)).ravel(),
                pols=tuple(int(p) for p in np.asarray(meta.polarization_array).ravel()),
                times=np.asarray(meta.time_array, dtype=float),
                ant1=np.asarray(meta.ant_1_array), ant2=np.asarray(meta.ant_2_array),
                ant_numbers=np.asarray(meta.antenna_numbers),
                ant_positions=np.asarray(meta.antenna_positions, dtype=float),
                location=tuple(float(x) for x in meta.telescope_location_lat_lon_alt_degrees),
                pointing_dec=_pointing_dec(meta.extra_keywords),
                cat_types=tuple(sorted({str(c.get("cat_type")) for c in
                                        (meta.phase_center_catalog or {}).values()})),
                vis_dtype="",
            )
            dgrp = meta.datagrp
            problem = _data_shape_problem(dgrp, h.n_blts, h.n_freqs, h.n_pols,
                                          ("visdata", "flags", "nsamples"))
            if problem:
                raise BadInputError(problem, path=str(path))
            vis = dgrp["visdata"]
            h.vis_dtype = str(vis.dtype)
            # Touch the last visibility: catches data missing past the end of a file whose
            # superblock was already rewritten, and unreadable chunks, for one chunk's cost.
            vis[(h.n_blts - 1,) + (0,) * (vis.ndim - 1)]
    except BadInputError:
        raise
    except Exception as exc:  # h5py/pyuvdata raise many kinds for a broken header
        raise BadInputError(f"unreadable UVH5 header or data: {exc}", path=str(path)) from None
    finally:
        meta.close()
    if h.freqs.size != h.n_freqs or h.n_freqs < 1:
        raise BadInputError(f"freq_array has {h.freqs.size} entries, Nfreqs is {h.n_freqs}",
                            path=str(path))
    if h.times.size != h.n_blts or h.ant1.size != h.n_blts:
        raise BadInputError("time/antenna arrays do not have Nblts entries", path=str(path))
    if not np.all(np.isfinite(h.freqs)) or not np.all(np.isfinite(h.times)):
        raise BadInputError("non-finite frequencies or times in the header", path=str(path))
    return h


def _pointing_dec(extra: dict[str, Any]) -> float | None:
    val = extra.get("phase_center_dec") if extra else None
    try:
        out = float(val) if val is not None else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and np.isfinite(out) else None


def _blame_minority(headers: Sequence[_Header], key: Callable[[_Header], Hashable],
                    what: str, describe: Callable[[_Header], str]) -> None:
    """Raise naming the first file whose ``key`` differs from the majority's."""
    keys = [key(h) for h in headers]
    if all(k == keys[0] for k in keys[1:]):
        return  # the usual case; comparing is cheaper than hashing MB-sized keys
    common, _ = Counter(keys).most_common(1)[0]
    ref = next(h for h, k in zip(headers, keys, strict=True) if k == common)
    for h, k in zip(headers, keys, strict=True):
        if k != common:
            odd = [x.path.name for x, kk in zip(headers, keys, strict=True) if kk != common]
            more = f" (also: {', '.join(odd[1:])})" if len(odd) > 1 else ""
            raise BadInputError(f"{what} differ from the rest of the group: {describe(h)}, "
                                f"{ref.path.name} has {describe(ref)}{more}", path=str(h.path))


def _array_key(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def validate_group(paths: Sequence[Path]) -> GroupLayout:
    """Validate a group from headers alone; return the files ordered low → high frequency."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise BadInputError("no subband files in the group")
    notes: list[str] = []
    # Duplicate files / duplicate subband numbers come first: they need no I/O.
    seen: dict[int, Path] = {}
    for p in sorted(paths, key=lambda q: q.name):
        sb = subband_number(p)
        if sb is None:
            notes.append(f"{p.name}: name does not end in _sbNN.hdf5; placed by frequency")
            continue
        if sb in seen:
            raise BadInputError(f"duplicate subband sb{sb:02d} (also {seen[sb].name})",
                                path=str(p))
        seen[sb] = p

    headers = [read_header(p) for p in paths]

    _blame_minority(headers, lambda h: h.pols, "polarisations", lambda h: f"pols {list(h.pols)}")
    _blame_minority(headers, lambda h: h.n_freqs, "channel counts",
                    lambda h: f"{h.n_freqs} channels")
    _blame_minority(headers, lambda h: round(float(np.abs(h.width).mean()), 3), "channel widths",
                    lambda h: f"{np.abs(h.width).mean():.3f} Hz")
    _blame_minority(headers, lambda h: (h.n_blts, h.n_times, h.n_bls), "data shapes",
                    lambda h: f"{h.n_times} times x {h.n_bls} baselines ({h.n_blts} rows)")
    _blame_minority(headers, lambda h: _array_key(np.stack([h.ant1, h.ant2])), "antennas",
                    lambda h: f"antennas {_ant_summary(h)}")
    _blame_minority(headers, lambda h: _array_key(np.round(h.times / TIME_TOL_DAYS)),
                    "times", lambda h: f"times {_time_summary(h)}")
    _blame_minority(headers, lambda h: (_array_key(h.ant_numbers),
                                        _array_key(np.round(h.ant_positions / ANTPOS_TOL_M))),
                    "antenna positions", lambda h: f"{h.ant_numbers.size} antennas in the table")
    _blame_minority(headers, lambda h: tuple(round(x, 6) for x in h.location),
                    "telescope locations", lambda h: f"lat/lon/alt {h.location}")
    _blame_minority(headers, lambda h: None if h.pointing_dec is None else round(h.pointing_dec, 6),
                    "pointing declinations",
                    lambda h: "none" if h.pointing_dec is None else f"{np.degrees(h.pointing_dec):.4f} deg")
    _blame_minority(headers, lambda h: h.cat_types, "phase-centre types",
                    lambda h: ",".join(h.cat_types))

    ref = headers[0]
    if ref.n_blts != ref.n_times * ref.n_bls:
        notes.append(f"baseline-time axis is not rectangular ({ref.n_blts} rows for "
                     f"{ref.n_times} times x {ref.n_bls} baselines)")
    if not np.any(ref.ant1 == ref.ant2):
        notes.append("no autocorrelations in the input")
    if "unprojected" not in ref.cat_types:
        notes.append(f"input already phased (phase-centre type {','.join(ref.cat_types)}); "
                     "rephased to the group's meridian centre")

    files = _order_by_frequency(headers, notes)
    freqs, width, filled, files = _frequency_grid(files, notes)
    pointing = ref.pointing_dec
    return GroupLayout(files=tuple(files), freqs_hz=freqs, channel_width_hz=width, filled=filled,
                       n_blts=ref.n_blts, n_times=ref.n_times, n_bls=ref.n_bls,
                       n_pols=ref.n_pols, polarizations=ref.pols, pointing_dec_rad=pointing,
                       input_bytes=sum(h.nbytes for h in headers), notes=tuple(notes))


def _ant_summary(h: _Header) -> str:
    ants = np.union1d(h.ant1, h.ant2)
    return f"{ants.size} antennas, {h.n_bls} baselines"


def _time_summary(h: _Header) -> str:
    t = np.unique(h.times)
    return f"{t.size} integrations from JD {t.min():.6f} to {t.max():.6f}"


def _order_by_frequency(headers: Sequence[_Header], notes: list[str]) -> list[SubbandFile]:
    files = []
    for h in headers:
        f = h.freqs
        d = np.diff(f)
        if f.size > 1 and not (np.all(d > 0) or np.all(d < 0)):
            raise BadInputError("channel frequencies are not monotonic", path=str(h.path))
        w = float(h.width[0])
        if f.size > 1 and np.sign(w) != np.sign(d[0]):
            # the stored width's sign disagrees with the frequency order: trust the frequencies
            w = float(np.sign(d[0]) * abs(w))
        files.append(SubbandFile(path=h.path, subband=subband_number(h.path), freqs_hz=f,
                                 channel_width_hz=w, nbytes=h.nbytes))
    files.sort(key=lambda s: float(s.freqs_hz.min()))
    if any(s.descending for s in files):
        notes.append("channels descend within subbands (negative channel width); "
                     "written ascending")
    numbered = [s.subband for s in files if s.subband is not None]
    if numbered and numbered != sorted(numbered, reverse=True):
        if numbered == sorted(numbered):
            notes.append("subband numbers increase with frequency (expected sb00 highest)")
        else:
            notes.append("subband numbers are not in frequency order; placed by frequency")
    for a, b in zip(files, files[1:], strict=False):
        if b.freqs_hz.min() <= a.freqs_hz.max():
            raise BadInputError(
                f"frequencies {b.freqs_hz.min() / 1e6:.4f}-{b.freqs_hz.max() / 1e6:.4f} MHz "
                f"overlap {a.path.name} ({a.freqs_hz.min() / 1e6:.4f}-"
                f"{a.freqs_hz.max() / 1e6:.4f} MHz)", path=str(b.path))
    return files


def _frequency_grid(files: list[SubbandFile], notes: list[str]
                    ) -> tuple[np.ndarray, float, np.ndarray, list[SubbandFile]]:
    """The ascending output grid. Gaps between subbands (a missing subband) that are a whole
    number of channels become flagged, zero-filled channels, so every MS of the telescope has
    the same regular grid and calibration tables transfer between groups."""
    width = abs(files[0].channel_width_hz)
    start = float(files[0].freqs_hz.min())
    regular = True
    offsets = []
    for s in files:
        off = (float(s.freqs_hz.min()) - start) / width
        asc = np.sort(s.freqs_hz)
        if (abs(off - round(off)) > 1e-3
                or not np.allclose(asc, start + (round(off) + np.arange(s.nchan)) * width,
                                   rtol=0, atol=1e-3 * width)):
            regular = False
            break
        offsets.append(round(off))
    if not regular:
        notes.append("subbands do not lie on one regular channel grid; channels written as given")
        out, pos = [], 0
        placed = []
        for s in files:
            placed.append(_with_start(s, pos))
            out.append(np.sort(s.freqs_hz))
            pos += s.nchan
        freqs = np.concatenate(out)
        return freqs, width, np.ones(freqs.size, dtype=bool), placed
    nchan = offsets[-1] + files[-1].nchan
    freqs = start + np.arange(nchan) * width
    filled = np.zeros(nchan, dtype=bool)
    placed = []
    for s, off in zip(files, offsets, strict=True):
        filled[off:off + s.nchan] = True
        placed.append(_with_start(s, off))
    if not filled.all():
        gap = int((~filled).sum())
        notes.append(f"{gap} channels missing between subbands (a missing subband?): "
                     "zero-filled and flagged to keep the regular grid")
    return freqs, width, filled, placed


def _with_start(s: SubbandFile, start: int) -> SubbandFile:
    return SubbandFile(path=s.path, subband=s.subband, freqs_hz=s.freqs_hz,
                       channel_width_hz=s.channel_width_hz, nbytes=s.nbytes, out_start=start)
