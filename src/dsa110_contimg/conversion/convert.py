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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from .. import mstiles
from ..errors import ContimgError, StageError
from ..products import CONVERSION_RECORD, Record, safe_stem
from . import (
    inputcopy,
    msfill,
    mswrite,
    parallel,
    publish,
    reader,
    staging,
    warmfiles,
    workarea,
)
from .msfill import Stopwatch, build_metadata, write_group_ms
from .options import ConversionOptions
from .storage import ms_path_for
from .validate import GroupLayout, validate_group

EarlyStart = Callable[[mstiles.TileFile], "publish.EarlyCopy | None"]

log = structlog.get_logger(__name__)

COMPLETE_KEYWORD = CONVERSION_RECORD


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
        need += parallel.buffer_bytes(max(1, msfill.BLOCK_BYTES // row_bytes) + layout.n_bls,
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
    early: dict[str, publish.EarlyCopy] = {}

    def start_early(tf: mstiles.TileFile) -> publish.EarlyCopy | None:
        ranges = _sampled_ranges(tf, meta.uv.time_array[meta.order], inputs.cache_integrations)
        copy = publish.EarlyCopy.start(tf.path, final, tf.path.stat().st_size, ranges)
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
            copier = (inputcopy.InputCopier([f.path for f in layout.files], stage.root)
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
        with timings.lap("publish"):
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
                published = publish.publish(staged_ms, final, fsync=options.publish_fsync,
                                            direct=options.publish_direct, cached=cached,
                                            early=early)
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
def _closing(early: dict[str, publish.EarlyCopy]) -> Iterator[None]:
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
