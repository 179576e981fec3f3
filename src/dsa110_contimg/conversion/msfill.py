"""Building the MS of a validated group: its metadata (pyuvdata, phasing, row order) and the
fill of its columns (one compiled pass per visibility, by fill threads while the main thread
writes)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from .. import mstiles
from ..errors import BadInputError
from ..products import safe_stem
from . import mswrite, parallel, phasing, publish, reader, warmfiles
from .options import ConversionOptions
from .validate import GroupLayout

EarlyStart = Callable[[mstiles.TileFile], "publish.EarlyCopy | None"]

log = structlog.get_logger(__name__)

#: Target size of one block of output rows (visibility bytes); bounds memory.
BLOCK_BYTES = 192 << 20


class Stopwatch(dict[str, float]):
    """Seconds per named step of one conversion (the result's ``timings_s``)."""

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - tick


@dataclass(frozen=True, eq=False)
class GroupMeta:
    """Everything about the output rows that does not need the visibilities."""

    uv: Any  # metadata-only UVData: phased, combined band; feeds the subtable writers
    centre: phasing.PhaseCentre
    times_jd: np.ndarray  # unique
    order: np.ndarray  # file row of each output row
    conj_rows: np.ndarray  # per file row: stored ant1 > ant2
    dw_file: np.ndarray  # per file row: w(new) - w(old) in the file's orientation
    a1: np.ndarray
    a2: np.ndarray
    uvw_out: np.ndarray
    history: tuple[str, ...]


def build_metadata(layout: GroupLayout, group_id: str, options: ConversionOptions,
                   notes: list[str]) -> GroupMeta:
    """The group's metadata from one header (all subbands share it: validated), phased to
    the meridian at mid-time; also notes the geometry quirks of the input."""
    from pyuvdata.uvdata.uvh5 import FastUVH5Meta

    _cache_pyuvdata_numba()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = FastUVH5Meta(layout.files[0].path)
        try:
            uv = meta.to_uvdata()
        finally:
            meta.close()
    tel = uv.telescope

    # geometry checks on the input, before we overwrite it
    disagree = phasing.uvw_discrepancy_m(uv)
    if disagree > options.uvw_note_m:
        notes.append(f"input UVW disagree with antenna positions by up to {disagree:.2f} m; "
                     "UVW recomputed from antenna positions")
    else:
        notes.append("UVW recomputed from antenna positions")
    names = [str(n) for n in tel.antenna_names]
    if all(n.strip().isdigit() for n in names):
        mismatch = sum(int(n) != int(num) for n, num in zip(names, tel.antenna_numbers,
                                                              strict=True))
        notes.append("antenna names are plain numbers" + (
            f" ({mismatch} differ from their antenna numbers)" if mismatch else
            " equal to their antenna numbers (= MS ANTENNA row)"))
    w_before = phasing.old_w(uv)
    conj_rows = uv.ant_1_array > uv.ant_2_array
    if conj_rows.any():
        notes.append(f"{int(conj_rows.sum())} rows stored as ant1 > ant2: conjugated")

    # the phase centre
    times = np.unique(uv.time_array)
    mid_jd = 0.5 * (times.min() + times.max())
    dec_deg, dec_source = phasing.choose_pointing_dec(uv, layout.pointing_dec_rad, notes)
    ra_c, dec_c = phasing.meridian_centre(tel.location, mid_jd, dec_deg)
    stem = safe_stem(group_id)
    centre = phasing.PhaseCentre(ra_c, dec_c, dec_deg, mid_jd, f"MERIDIAN_{stem}", dec_source)
    phasing.phase_metadata(uv, centre)
    dw_file = uv.uvw_array[:, 2] - w_before  # in the file's own orientation and row order

    # the combined band (ascending) on the metadata object the subtable writers read
    nchan = int(layout.freqs_hz.size)
    uv.freq_array = layout.freqs_hz.copy()
    uv.channel_width = np.full(nchan, layout.channel_width_hz)
    uv.Nfreqs = nchan
    uv.flex_spw_id_array = np.zeros(nchan, dtype=int)
    uv.spw_array = np.array([0])
    uv.Nspws = 1
    # output rows: stable sort by time (pyuvdata's and CASA's usual order)
    order = np.argsort(uv.time_array, kind="stable")
    a1 = np.where(conj_rows, uv.ant_2_array, uv.ant_1_array)[order]
    a2 = np.where(conj_rows, uv.ant_1_array, uv.ant_2_array)[order]
    uvw_out = np.where(conj_rows[:, None], -uv.uvw_array, uv.uvw_array)[order]
    history = ["dsa110-contimg conversion of group " + group_id,
               f"phase centre {centre.name}: ICRS RA {ra_c:.6f} deg, Dec {dec_c:.6f} deg "
               f"(meridian at pointing dec {dec_deg:.4f} deg from {dec_source}, mid-time "
               f"JD {mid_jd:.6f})"]
    return GroupMeta(uv=uv, centre=centre, times_jd=times, order=order, conj_rows=conj_rows,
                     dw_file=dw_file, a1=a1, a2=a2, uvw_out=uvw_out, history=tuple(history))


def write_group_ms(layout: GroupLayout, meta: GroupMeta, ms_path: Path, group_id: str,
                   options: ConversionOptions, probe: reader.GroupProbe, notes: list[str],
                   timings: Stopwatch,
                   warm: warmfiles.WarmColumns | None = None,
                   start_early: EarlyStart | None = None) -> dict[str, Any]:
    """Create the MS and stream the data in; return the completion record. With ``warm``,
    the big columns are written into tile files of an earlier MS of the same shape; then
    ``start_early`` (given DATA's tile file) may start copying it to disk as it fills."""
    uv, centre, times, order = meta.uv, meta.centre, meta.times_jd, meta.order
    tel = uv.telescope
    uniform_ns = probe.uniform_nsamples
    # with helper processes the reading happens there
    handles = ([reader.SubbandReader(f.path) for f in layout.files]
               if options.parallel_subbands <= 1 else [])
    try:
        with timings.lap("create_ms"):
            ms = mswrite.create_ms(ms_path, uv, uv.Nblts, weight_spectrum=not uniform_ns)
            try:
                if warm is not None:
                    ms = warm.before_write(ms, ms_path, int(layout.freqs_hz.size),
                                           layout.n_pols)
                _write_row_metadata(ms, uv, order, meta.a1, meta.a2, meta.uvw_out)
            except BaseException:
                ms.close()
                raise
        try:
            with timings.lap("data"):
                nonfinite, zeros = _stream_data(ms, layout, handles, order,
                                                uv.time_array[order], meta.dw_file,
                                                meta.conj_rows, probe, options, ms_path.parent,
                                                timings, start_early)
        finally:
            ms.close()
    finally:
        for h in handles:
            h.close()
    for path, count in nonfinite.items():
        notes.append(f"{Path(path).name}: {count} non-finite visibilities zeroed and flagged")
    if zeros:
        notes.append(f"{zeros} unflagged visibilities exactly zero (dead inputs): flagged")
    with timings.lap("finish"):
        padded = mswrite.fix_padding_antennas(ms_path, tel.antenna_numbers,
                                              tel._location.xyz().reshape(3))
        if padded:
            notes.append(f"ANTENNA table indexed by antenna number: {padded} padding rows "
                         "flagged")
        ra_p, dec_p = phasing.drift_pointing(tel.location, times, centre.pointing_dec_deg)
        mswrite.write_pointing_drift(ms_path, ra_p, dec_p, _mjd_seconds(times))
        mswrite.append_history(ms_path, list(meta.history) + [f"found: {n}" for n in notes])
    ants = np.union1d(uv.ant_1_array, uv.ant_2_array)
    return {
        "group_id": group_id, "n_rows": int(uv.Nblts), "n_antennas": int(ants.size),
        "n_baselines": int(uv.Nbls), "n_times": int(times.size),
        "n_channels": int(layout.freqs_hz.size),
        "freq_min_hz": float(layout.freqs_hz.min()), "freq_max_hz": float(layout.freqs_hz.max()),
        "pointing_dec_deg": float(centre.pointing_dec_deg),
        "phase_centre_ra_deg": float(centre.ra_deg), "phase_centre_dec_deg": float(centre.dec_deg),
        "mid_mjd": float(centre.mid_jd - 2400000.5),
        "field_name": centre.name, "notes": list(notes),
        "weight_spectrum": not uniform_ns, "zeros_flagged": True,
        "warm_columns": [] if warm is None else list(warm.adopted),
        "converted_unix": time.time(), "pid": os.getpid(),
    }


def _mjd_seconds(jd: np.ndarray) -> np.ndarray:
    from astropy.time import Time

    return Time(jd, format="jd", scale="utc").mjd * 86400.0


def _write_row_metadata(ms: Any, uv: Any, order: np.ndarray, a1: np.ndarray, a2: np.ndarray,
                        uvw_out: np.ndarray) -> None:
    """Per-row columns, as ``UVData.write_ms(flip_conj=True)`` writes them."""
    t_unique, t_index = np.unique(uv.time_array, return_inverse=True)
    mjd_s = _mjd_seconds(t_unique)[t_index][order]
    n = order.size
    ms.putcol("ANTENNA1", a1.astype(np.int32))
    ms.putcol("ANTENNA2", a2.astype(np.int32))
    ms.putcol("UVW", -uvw_out)  # flip_conj: CASA's sign convention
    ms.putcol("TIME", mjd_s)
    ms.putcol("TIME_CENTROID", mjd_s)
    ms.putcol("INTERVAL", uv.integration_time[order])
    ms.putcol("EXPOSURE", uv.integration_time[order])
    ms.putcol("DATA_DESC_ID", np.zeros(n, dtype=np.int32))
    ms.putcol("SCAN_NUMBER", np.ones(n, dtype=np.int32))
    ms.putcol("FIELD_ID", np.zeros(n, dtype=np.int32))


def _time_blocks(order_times: np.ndarray, row_bytes: int) -> list[tuple[int, int]]:
    """Output row ranges made of whole integrations, each about BLOCK_BYTES."""
    change = np.flatnonzero(np.diff(order_times)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [order_times.size]])
    bounds, cur0, cur_rows = [], 0, 0
    for s, e in zip(starts, ends, strict=True):
        if cur_rows and (cur_rows + (e - s)) * row_bytes > BLOCK_BYTES:
            bounds.append((cur0, s))
            cur0, cur_rows = s, 0
        cur_rows += e - s
    bounds.append((cur0, int(order_times.size)))
    return bounds


def _stream_data(ms: Any, layout: GroupLayout, handles: list[Any], order: np.ndarray,
                 time_of_row: np.ndarray, dw_file: np.ndarray, conj_rows: np.ndarray,
                 probe: reader.GroupProbe, options: ConversionOptions, workdir: Path,
                 timings: dict[str, float],
                 start_early: EarlyStart | None = None) -> tuple[dict[str, int], int]:
    """Read, phase, conjugate and write DATA/FLAG/WEIGHT(_SPECTRUM)/SIGMA block by block;
    return the non-finite count per file and the number of zeros flagged."""
    nchan, npol = int(layout.freqs_hz.size), layout.n_pols
    pol_perm = _casa_pol_perm(layout.polarizations)
    freqs, filled = layout.freqs_hz, layout.filled
    gaps = ~filled
    uniform_ns = probe.uniform_nsamples
    ns_value = float(probe.nsamples[0]) if uniform_ns else None
    plans = reader.plan_reads(order, _time_blocks(time_of_row, nchan * npol * 8))
    nmax = max(p.r1 - p.r0 for p in plans)
    specs = [reader.FillSpec(path=str(f.path), source=str(f.source), out_start=f.out_start,
                             nchan=f.nchan, descending=f.descending, flag_const=fc,
                             nsam_const=nc)
             for f, fc, nc in zip(layout.files, probe.flags, probe.nsamples, strict=True)]
    nonfinite: dict[str, int] = {}
    zeros = 0
    limit = options.max_nonfinite_fraction * layout.n_blts * layout.files[0].nchan * npol
    flip = ~conj_rows[order]  # rows conjugated for CASA's convention (all but reversed ones)
    perm = np.arange(npol) if pol_perm is None else pol_perm
    acc = dict.fromkeys(("fill_wait", "write"), 0.0)

    def geometry(plan: reader.RowPlan) -> reader.BlockGeometry:
        return reader.BlockGeometry(dw=dw_file[order[plan.r0:plan.r1]],
                                    flip=flip[plan.r0:plan.r1], freqs_hz=freqs, pol_perm=perm)

    helpers = min(options.parallel_subbands - 1, len(specs))
    filler: parallel.ParallelFiller | parallel.ThreadFiller = (
        parallel.ParallelFiller(specs, helpers, workdir, nmax, nchan, npol, not uniform_ns, gaps)
        if helpers > 0 else
        parallel.ThreadFiller(specs, handles, options.fill_threads, nmax, nchan, npol,
                              not uniform_ns, gaps, freqs, perm, _direct_data(ms, nchan, npol)))
    direct = filler.direct
    early = None if direct is None or start_early is None else start_early(direct)
    row_bytes = 0 if direct is None else direct.npol * direct.nchan * direct.dtype.itemsize
    try:
        # exact zeros are dead inputs, never sky: the fill flags them, where every visibility
        # passes anyway, instead of a flagdata clip pass over the MS (16 s at full size)
        pending = filler.submit(plans[0], geometry(plans[0]), 0)
        for i, plan in enumerate(plans):
            t_a = time.perf_counter()
            n = plan.r1 - plan.r0
            counts, nz = filler.wait(pending)
            if early is not None:  # rows before r1 are final
                early.advance(plan.r1 * row_bytes)
            if i + 1 < len(plans):
                pending = filler.submit(plans[i + 1], geometry(plans[i + 1]), (i + 1) % 2)
            data, flags, nsam = filler.buffers(i % 2, n)
            zeros += nz
            for source, count, size in counts:
                if not count:
                    continue
                nonfinite[source] = nonfinite.get(source, 0) + count
                if nonfinite[source] > limit or count == size:
                    raise BadInputError(
                        f"{'all' if count == size else count} visibilities in a block are "
                        "NaN/Inf (more than CONTIMG_CONVERT_MAX_NONFINITE_FRACTION="
                        f"{options.max_nonfinite_fraction:g} of the file)", path=source)
            t_b = time.perf_counter()
            if filler.direct is None:  # else the fill wrote the rows in place
                ms.putcol("DATA", np.asarray(data), startrow=plan.r0, nrow=n)
            ms.putcol("FLAG", np.asarray(flags), startrow=plan.r0, nrow=n)
            if nsam is not None:
                ms.putcol("WEIGHT_SPECTRUM", np.asarray(nsam), startrow=plan.r0, nrow=n)
                weight = np.median(nsam[:, filled, :], axis=1).astype(np.float32)
            else:
                weight = np.full((n, npol), ns_value, dtype=np.float32)
            sigma = np.zeros_like(weight)
            np.power(weight, -0.5, where=weight != 0, out=sigma)
            ms.putcol("WEIGHT", weight, startrow=plan.r0, nrow=n)
            ms.putcol("SIGMA", sigma, startrow=plan.r0, nrow=n)
            acc["fill_wait"] += t_b - t_a
            acc["write"] += time.perf_counter() - t_b
    finally:
        filler.close()
    tick = time.perf_counter()
    ms.flush()
    acc["write"] += time.perf_counter() - tick
    timings.update({f"data.{k}": v for k, v in acc.items()})
    return nonfinite, zeros


def _direct_data(ms: Any, nchan: int, npol: int) -> mstiles.TileFile | None:
    """DATA's tile file when the fill can write it in place: it exists at its full size
    (adopted warm, :mod:`.warmfiles`), in the conversion's layout and native byte order."""
    tf = mstiles.tile_file(ms, "DATA")
    if tf is None or tf.dtype != np.dtype(np.complex64) or (tf.nchan, tf.npol) != (nchan, npol):
        return None
    return tf


def _casa_pol_perm(pols: tuple[int, ...]) -> np.ndarray | None:
    from pyuvdata import utils

    order = np.asarray(utils.pol.determine_pol_order(np.asarray(pols), order="CASA"))
    return None if np.array_equal(order, np.arange(len(pols))) else order


def _cache_pyuvdata_numba() -> None:
    """Let numba cache pyuvdata's jit helpers on disk (best effort).

    pyuvdata compiles a few numba functions (baseline numbers) at first use without
    caching: ~2 s in every fresh worker process, i.e. every group. With caching on, later
    workers load the compiled code. If no cache directory is writable, numba refuses and we
    simply compile as before.
    """
    try:
        from numba.core.dispatcher import Dispatcher
        from pyuvdata.utils import bls_numba
    except Exception:
        return
    for name in dir(bls_numba):
        fn = getattr(bls_numba, name)
        if isinstance(fn, Dispatcher) and getattr(fn, "_cache", None) is not None:
            if type(fn._cache).__name__ == "NullCache":
                try:
                    fn.enable_caching()
                except Exception:
                    return
