"""The conversion stage: one group of UVH5 subband files → one Measurement Set.

Steps: skip if a valid MS is already in the work area or published → validate headers (cheap, :mod:`.validate`)
→ choose staging (tmpfs when it has room; with ``CONTIMG_STAGE_INPUTS`` the inputs are copied
there in a background thread) → build the group's metadata with pyuvdata and phase it to the
meridian at mid-time (:mod:`.phasing`) → create the MS with pyuvdata's schema and stream the
visibilities into it block by block (:mod:`.reader`, :mod:`.kernel`, :mod:`.mswrite`,
:mod:`.parallel`), flagging NaN/Inf and exact zeros on the way → mark it complete → publish
it atomically to its product directory (:mod:`.staging`), or, with the optional tmpfs work
area on and memory to spare, rename it into the work area where later stages use it
(:mod:`.workarea`). Memory stays near two blocks (a couple of integrations of the whole band
each) whatever the group size: ~0.7 GB peak for a full group.

The MS follows ``UVData.write_ms`` conventions (checked against it in the tests), which
CASA's ``ft`` reproduces: DATA = conj(g_p) g_q x model for the simulator's gains g, i.e.
CASA solves the complex conjugate of the simulator's antenna gains.

Runs in a fresh worker process; uses python-casacore, never casatools.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from .. import mstiles
from ..errors import BadInputError, ContimgError, StageError
from ..products import CONVERSION_RECORD, Record, safe_stem
from . import mswrite, parallel, phasing, reader, staging, warmfiles, workarea
from .options import ConversionOptions
from .storage import ms_path_for
from .validate import GroupLayout, validate_group

EarlyStart = Callable[[mstiles.TileFile], "staging.EarlyCopy | None"]

log = structlog.get_logger(__name__)

COMPLETE_KEYWORD = CONVERSION_RECORD
#: Target size of one block of output rows (visibility bytes); bounds memory.
BLOCK_BYTES = 192 << 20


@dataclass(frozen=True)
class ConversionInputs:
    group_id: str
    files: tuple[Path, ...]  # subband files, any order
    output_dir: Path  # OUTPUT_DIR root
    scratch_dir: Path
    tmpfs_path: Path
    work_dir: Path | None = None  # tmpfs work area to keep the MS in (None: always publish)
    # integrations the MS gate will read (mstiles.sample_time_indices): their DATA is published
    # through the page cache, the rest with O_DIRECT
    cache_integrations: int = 0


@dataclass(frozen=True)
class ConversionResult(Record):
    group_id: str
    ms_path: Path  # published
    n_antennas: int
    n_baselines: int
    n_times: int
    n_channels: int
    freq_min_hz: float
    freq_max_hz: float
    pointing_dec_deg: float
    phase_centre_ra_deg: float
    phase_centre_dec_deg: float
    mid_mjd: float
    staged_on: str  # 'tmpfs' | 'disk'
    input_bytes: int
    duration_s: float
    notes: tuple[str, ...] = ()
    skipped: bool = False
    timings_s: tuple[tuple[str, float], ...] = field(default=())
    warm_columns: tuple[str, ...] = ()  # columns written into kept tile files (warmfiles)


def convert_group(inputs: ConversionInputs, options: ConversionOptions) -> ConversionResult:
    """Convert one group; see the module docstring.

    Raises BadInputError (the data are unusable: quarantine) or StageError (may pass:
    retry); any other failure is reported as a StageError after logging its traceback.
    """
    t0 = time.perf_counter()
    group_id = inputs.group_id
    final = ms_path_for(inputs.output_dir, group_id)
    blog = log.bind(group_id=group_id)
    found = _converted(_work_ms(inputs), final)
    if found is not None:
        blog.info("MS already converted; skipping conversion", ms=str(found[0]))
        return _result_from_record(group_id, *found, time.perf_counter() - t0)
    try:
        return _convert(inputs, options, final, t0, blog)
    except ContimgError:
        raise
    except Exception as exc:
        if staging.is_no_space(exc):
            raise staging.disk_error(exc, _where_full(exc, inputs, final)) from exc
        blog.exception("conversion failed unexpectedly")
        raise StageError(f"conversion of {group_id} failed: {type(exc).__name__}: {exc}") from exc


class Stopwatch(dict[str, float]):
    """Seconds per named step of one conversion (the result's ``timings_s``)."""

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - tick


@dataclass(frozen=True)
class _StagingPlan:
    root: Path
    kind: str  # 'tmpfs' | 'disk'
    reason: str
    warm: warmfiles.WarmColumns | None


def _plan_staging(inputs: ConversionInputs, options: ConversionOptions, layout: GroupLayout,
                  probe: reader.GroupProbe, notes: list[str], blog: Any) -> _StagingPlan:
    """Where to build the MS (tmpfs, else the scratch disk) with room for it, its staged
    inputs and the parallel fill's buffers; and whether to reuse warm tile files."""
    ms_bytes = mswrite.estimate_ms_bytes(layout.n_blts, int(layout.freqs_hz.size),
                                         layout.n_pols, not probe.uniform_nsamples)
    need = ms_bytes + (layout.input_bytes if options.stage_inputs else 0)
    if options.parallel_subbands > 1:
        row_bytes = int(layout.freqs_hz.size) * layout.n_pols * 8
        need += parallel.buffer_bytes(max(1, BLOCK_BYTES // row_bytes) + layout.n_bls,
                                      int(layout.freqs_hz.size), layout.n_pols,
                                      not probe.uniform_nsamples)
    if inputs.work_dir is not None and options.stage_to_tmpfs:  # staging before warm pages
        warmfiles.make_room(warmfiles.pool_dir(inputs.work_dir),
                            staging.free_bytes(Path(inputs.tmpfs_path)),
                            max(need, int(options.tmpfs_headroom * layout.input_bytes)))
    root, kind, reason = staging.choose_staging(
        layout.input_bytes, options.stage_to_tmpfs, options.tmpfs_headroom,
        Path(inputs.tmpfs_path), Path(inputs.scratch_dir), need_bytes=need)
    if kind == "disk":
        blog.warning("staging on disk", reason=reason)
        notes.append(reason)
    staging.require_space(root, need, "staging")
    warm = (warmfiles.WarmColumns(warmfiles.pool_dir(inputs.work_dir))
            if kind == "tmpfs" and inputs.work_dir is not None and options.warm_column_sets > 0
            and staging.same_filesystem(root, Path(inputs.work_dir).parent) else None)
    return _StagingPlan(root, kind, reason, warm)


def _keep_in_work_area(options: ConversionOptions, work: Path | None, kind: str,
                       staged_ms: Path, notes: list[str], blog: Any) -> bool:
    """Keep the MS in the tmpfs work area (instead of publishing it now) when memory allows."""
    if not (options.keep_in_tmpfs and work is not None and kind == "tmpfs"):
        return False
    keep, why = workarea.room_to_keep(work.parent, staging.tree_bytes(staged_ms),
                                      int(options.tmpfs_reserve_gb * 1e9))
    if not keep:
        blog.warning("MS published to disk at conversion: tmpfs too full to keep it", reason=why)
        notes.append(f"published to disk at conversion, not kept in tmpfs: {why}")
    return keep


def _convert(inputs: ConversionInputs, options: ConversionOptions, final: Path, t0: float,
             blog: Any) -> ConversionResult:
    group_id = inputs.group_id
    timings = Stopwatch()
    with timings.lap("validate"):
        layout = validate_group(list(inputs.files))
    notes = list(layout.notes)
    with timings.lap("probe"):
        probe = reader.probe_group([f.path for f in layout.files])
    plan = _plan_staging(inputs, options, layout, probe, notes, blog)
    root, kind, reason, warm = plan.root, plan.kind, plan.reason, plan.warm
    staging.remove_stale_partials(final.parent)
    stem = safe_stem(group_id)
    work = _work_ms(inputs)
    # DATA filled in place (warm files) is copied to disk block by block while it fills
    early: dict[str, staging.EarlyCopy] = {}

    def start_early(tf: mstiles.TileFile) -> staging.EarlyCopy | None:
        ranges = _sampled_ranges(tf, meta.uv.time_array[meta.order], inputs.cache_integrations)
        copy = staging.EarlyCopy.start(tf.path, final, tf.path.stat().st_size, ranges)
        if copy is not None:
            early[tf.path.name] = copy
        return copy

    early_ok = (warm is not None and options.publish_direct and options.publish_early
                and not (options.keep_in_tmpfs and work is not None)
                and not staging.same_filesystem(root, final.parent))
    with staging.staging_dir(root, stem, kind, reason) as stage, _closing(early):
        # The input copy is kernel-side (sendfile, no GIL): it runs on the other core while
        # the metadata (pyuvdata, numba, erfa: CPU-bound Python) is built from the header.
        with timings.lap("metadata"):
            copier = (staging.InputCopier([f.path for f in layout.files], stage.root)
                      if options.stage_inputs else None)
            try:
                meta = build_metadata(layout, group_id, options, notes)
            except BaseException:
                if copier is not None:
                    copier.join()  # before the staging directory is removed
                raise
        with timings.lap("stage_inputs_wait"):
            if copier is not None:
                layout = _relocate(layout, copier.wait())
        staged_ms = stage.root / (stem + ".ms")
        record = write_group_ms(layout, meta, staged_ms, group_id, options, probe, notes,
                                timings, warm, start_early if early_ok else None)
        publish_started = time.perf_counter()
        keep = _keep_in_work_area(options, work, kind, staged_ms, notes, blog)
        record.update(staged_on=kind, input_bytes=layout.input_bytes, kept_in_tmpfs=keep,
                      published_early=sorted(early), notes=list(notes))
        mark_complete(staged_ms, record)
        found = _converted(work, final)
        if found is not None:  # converted meanwhile by another worker: keep theirs
            blog.warning("MS was converted by another process meanwhile; keeping it",
                         ms=str(found[0]))
            return _result_from_record(group_id, *found, time.perf_counter() - t0)
        if keep and work is not None:
            work.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged_ms, work)  # same tmpfs: the MS appears complete or not at all
            published = work
        else:
            cached = (_sampled_data_ranges(staged_ms, meta.uv.time_array[meta.order],
                                           inputs.cache_integrations)
                      if options.publish_direct and inputs.cache_integrations and not early
                      else {})
            published = staging.publish(staged_ms, final, fsync=options.publish_fsync,
                                        direct=options.publish_direct, cached=cached,
                                        early=early)
        timings["publish"] = time.perf_counter() - publish_started
        if warm is not None and not keep:
            with timings.lap("warm_keep"):
                try:
                    warm.after_publish(staged_ms, options.warm_column_sets,
                                       int(options.tmpfs_reserve_gb * 1e9))
                except Exception as exc:  # noqa: BLE001 - a cache: the MS is published already
                    blog.warning("warm_columns_not_kept", error=f"{type(exc).__name__}: {exc}")
    duration = time.perf_counter() - t0
    blog.info("converted group", ms=str(published), staged_on=kind, seconds=round(duration, 2),
              input_mb=round(layout.input_bytes / 1e6, 1), notes=notes)
    return _result_from_record(group_id, published, record, duration, skipped=False,
                               timings=timings)


def _sampled_data_ranges(ms: Path, row_times: np.ndarray,
                         n: int) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the DATA file holding the integrations the MS gate reads, by file
    name within the MS (none when DATA is not in the conversion's tile layout)."""
    from casacore import tables

    with tables.table(str(ms), ack=False) as t:
        tf = mstiles.tile_file(t, "DATA")
    return {} if tf is None else {tf.path.name: _sampled_ranges(tf, row_times, n)}


def _sampled_ranges(tf: mstiles.TileFile, row_times: np.ndarray,
                    n: int) -> list[tuple[int, int]]:
    if n <= 0 or np.any(np.diff(row_times) < 0):
        return []  # rows not in time order: integrations are not contiguous
    times, first = np.unique(row_times, return_index=True)
    bounds = np.append(first, row_times.size)
    return [tf.byte_range(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
            for i in mstiles.sample_time_indices(times.size, n)]


@contextmanager
def _closing(early: dict[str, staging.EarlyCopy]) -> Iterator[None]:
    try:
        yield
    finally:
        for copy in early.values():
            copy.close()


def _work_ms(inputs: ConversionInputs) -> Path | None:
    """Where the MS is kept in the tmpfs work area, if the stage was given one."""
    return workarea.work_ms_path(inputs.work_dir, inputs.group_id) if inputs.work_dir else None


def _converted(work: Path | None, final: Path) -> tuple[Path, dict[str, Any]] | None:
    """A valid MS of this group already there, kept or published, with its record."""
    for ms in (work, final):
        if ms is None:
            continue
        rec = read_completion(ms)
        if rec is not None:
            return ms, rec
    return None


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


def _where_full(exc: BaseException, inputs: ConversionInputs, final: Path) -> Path:
    """The path to name for a full disk: the failing file if known, else whichever of our
    directories the error message mentions."""
    filename = getattr(exc, "filename", None)
    if filename:
        return Path(filename)
    text = str(exc)
    for candidate in (final.parent, Path(inputs.tmpfs_path), Path(inputs.scratch_dir)):
        if str(candidate) in text:
            return candidate
    return Path(inputs.scratch_dir)


def _relocate(layout: GroupLayout, files: list[Path]) -> GroupLayout:
    from dataclasses import replace

    by_name = {p.name: p for p in files}
    return replace(layout, files=tuple(replace(f, path=by_name[f.path.name], origin=f.path)
                                       for f in layout.files))


def _result_from_record(group_id: str, ms: Path, rec: dict[str, Any], duration: float,
                        skipped: bool = True, timings: dict[str, float] | None = None
                        ) -> ConversionResult:
    return ConversionResult(
        group_id=group_id, ms_path=ms, n_antennas=int(rec["n_antennas"]),
        n_baselines=int(rec["n_baselines"]), n_times=int(rec["n_times"]),
        n_channels=int(rec["n_channels"]), freq_min_hz=float(rec["freq_min_hz"]),
        freq_max_hz=float(rec["freq_max_hz"]), pointing_dec_deg=float(rec["pointing_dec_deg"]),
        phase_centre_ra_deg=float(rec["phase_centre_ra_deg"]),
        phase_centre_dec_deg=float(rec["phase_centre_dec_deg"]), mid_mjd=float(rec["mid_mjd"]),
        staged_on=str(rec.get("staged_on", "disk")), input_bytes=int(rec.get("input_bytes", 0)),
        duration_s=duration, notes=tuple(rec.get("notes", ())), skipped=skipped,
        timings_s=tuple((k, round(v, 4)) for k, v in (timings or {}).items()),
        warm_columns=tuple(rec.get("warm_columns", ())))


# --------------------------------------------------------------------------- completion


def mark_complete(ms: Path, record: dict[str, Any]) -> None:
    """Write the completion record as the MS's last act; its presence means 'finished'."""
    from casacore import tables

    with tables.table(str(ms), readonly=False, ack=False) as t:
        t.putkeyword(COMPLETE_KEYWORD, _casacore_record(record))


def _casacore_record(rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if isinstance(v, list | tuple):
            out[k] = np.asarray([str(x) for x in v]) if v else np.asarray([""])
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def read_completion(ms: Path) -> dict[str, Any] | None:
    """The completion record of a published, valid MS; None when absent or unusable.

    Valid means: it opens, carries our completion keyword, and its row and channel counts
    agree with the record (a torn copy or a foreign MS fails one of these).
    """
    if not (ms / "table.dat").exists():
        return None
    try:
        from casacore import tables

        with tables.table(str(ms), ack=False) as t:
            if COMPLETE_KEYWORD not in t.getkeywords():
                return None
            rec = dict(t.getkeyword(COMPLETE_KEYWORD))
            nrows = t.nrows()
            if nrows != int(rec["n_rows"]) or nrows == 0:
                return None
            shape = t.getcell("DATA", nrows - 1).shape
        with tables.table(f"{ms}::SPECTRAL_WINDOW", ack=False) as spw:
            if int(spw.getcol("NUM_CHAN").sum()) != int(rec["n_channels"]):
                return None
        if shape[0] != int(rec["n_channels"]):
            return None
    except Exception:
        return None
    notes = [str(n) for n in np.atleast_1d(rec.get("notes", [])) if str(n)]
    rec["notes"] = notes
    return rec


# --------------------------------------------------------------------------- the write


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
