"""QA gate after conversion: is this Measurement Set fit to calibrate and image?

Uses python-casacore (``casacore.tables``), not casatools: the gate runs in the conversion's
worker process (``daemon.tasks``), which already uses python-casacore, reads columns
straight into numpy with row ranges, and needs none of CASA's measures machinery.

Cheap by construction, so that it costs a few percent of the conversion it checks: the
per-row metadata (antennas, times, UVW: a few MB even for a full group) is read whole, and so
is FLAG (its 32 MB of bits, which the publish leaves in the page cache). The conversion flags
every NaN and exact zero it writes, so FLAG shows, for every integration, an antenna or
subband that died during the group. Visibilities are read only for a few whole integrations
(``CONTIMG_QA_MS_SAMPLE_INTEGRATIONS``, by default the middle one: 85 MB for a full group,
which the conversion publishes through the page cache), at a channel stride
(``CONTIMG_QA_MS_SAMPLE_CHANNELS``): enough to see dead and weak antennas, zeroed subbands and
NaNs in DATA itself. In the conversion's tile layout both are read from the mapped storage
files (:mod:`..mstiles`; 0.12-0.15 s for the whole gate at full size, against 0.25-0.35 s
through casacore); any other layout is read through casacore.

Failures block the group, warnings only alert. The zero fraction is judged on live
antennas: antennas whose data are all zero are reported as dead (and count against
``CONTIMG_QA_MS_MIN_ANTENNAS``) instead of making every group look 30 % zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import mstiles
from ..catalogue import angular_separation_deg
from ..mstiles import sample_time_indices
from .options import MSQAThresholds
from .result import GateBuilder, QAResult

GATE = "ms_after_conversion"
TILE_CACHE_BYTES = 4 << 20
FLAG_BLOCK_ROWS = 4096


def check_ms_after_conversion(ms: Path, thresholds: MSQAThresholds,
                              expected: dict[str, Any] | None = None) -> QAResult:
    """Check a converted MS; ``expected`` may carry ConversionResult fields to compare."""
    t0 = time.perf_counter()
    g = GateBuilder(GATE)
    expected = expected or {}
    ms = Path(ms)
    g.metrics["ms"] = str(ms)
    try:
        _check(ms, thresholds, expected, g)
    except Exception as exc:  # an MS we cannot even read fails the gate, with the reason
        g.fail_if(True, f"cannot read the MS: {type(exc).__name__}: {exc}")
    dt = time.perf_counter() - t0
    g.metrics["duration_s"] = round(dt, 4)
    return g.result(dt)


def _check(ms: Path, th: MSQAThresholds, expected: dict[str, Any], g: GateBuilder) -> None:
    from casacore import tables

    if not (ms / "table.dat").exists():
        g.fail_if(True, f"{ms} is not a table (no table.dat)")
        return
    m = g.metrics
    with tables.table(str(ms), ack=False) as t:
        nrows = t.nrows()
        m["n_rows"] = nrows
        if nrows == 0:
            g.fail_if(True, "the MS has no rows")
            return
        a1 = t.getcol("ANTENNA1")
        a2 = t.getcol("ANTENNA2")
        tcol = t.getcol("TIME")
        ddid = t.getcol("DATA_DESC_ID")
        uvw = t.getcol("UVW")
        colnames = set(t.colnames())

        _shape_checks(a1, a2, tcol, expected, th, g)
        _spectral_checks(ms, ddid, expected, g)
        _uvw_check(ms, a1, a2, uvw, th, g)
        _field_check(ms, expected, th, g)
        if "DATA" not in colnames:
            g.fail_if(True, "no DATA column")
            return
        _data_checks(t, a1, a2, tcol, ddid, th, g)


def _shape_checks(a1: np.ndarray, a2: np.ndarray, tcol: np.ndarray, expected: dict[str, Any],
                  th: MSQAThresholds, g: GateBuilder) -> None:
    m = g.metrics
    ants = np.union1d(a1, a2)
    pairs = np.unique(np.minimum(a1, a2).astype(np.int64) * 100_000 + np.maximum(a1, a2))
    times = np.unique(tcol)
    m.update(n_antennas=int(ants.size), n_baselines=int(pairs.size), n_times=int(times.size),
             has_autocorrelations=bool(np.any(a1 == a2)))
    m["rows_expected"] = int(pairs.size * times.size)
    g.fail_if(m["n_rows"] != m["rows_expected"],
              f"rows ({m['n_rows']}) != baselines x times ({pairs.size} x {times.size})")
    g.warn_if(not m["has_autocorrelations"], "no autocorrelations in the MS")
    for key in ("n_antennas", "n_baselines", "n_times"):
        if expected.get(key) is not None:
            g.fail_if(int(expected[key]) != m[key],
                      f"{key} is {m[key]}, expected {int(expected[key])}")
    g.fail_if(ants.size < th.min_antennas,
              f"only {ants.size} antennas have rows (minimum {th.min_antennas})")


def _spectral_checks(ms: Path, ddid: np.ndarray, expected: dict[str, Any], g: GateBuilder) -> None:
    """Frequencies must increase within each spectral window and from one to the next."""
    from casacore import tables

    m = g.metrics
    with tables.table(f"{ms}::DATA_DESCRIPTION", ack=False) as dd:
        dd_spw = dd.getcol("SPECTRAL_WINDOW_ID")
    with tables.table(f"{ms}::SPECTRAL_WINDOW", ack=False) as sw:
        chan_freq = [np.asarray(sw.getcell("CHAN_FREQ", i), dtype=float) for i in range(sw.nrows())]
    used = sorted({int(d) for d in np.unique(ddid)})
    spws = [int(dd_spw[d]) for d in used]
    freqs = {d: chan_freq[s] for d, s in zip(used, spws, strict=True)}
    allf = np.concatenate([chan_freq[s] for s in spws])
    m.update(n_spw=len(spws), n_channels=int(allf.size), freq_min_hz=float(allf.min()),
             freq_max_hz=float(allf.max()))
    inc_within = all(f.size < 2 or np.all(np.diff(f) > 0) for f in freqs.values())
    starts = [chan_freq[s][0] for s in spws]
    inc_across = all(chan_freq[a][-1] < chan_freq[b][0] for a, b in zip(spws, spws[1:], strict=False)) \
        and starts == sorted(starts)
    m["frequencies_increasing"] = bool(inc_within and inc_across)
    g.fail_if(not inc_within, "channel frequencies do not increase within a spectral window")
    g.fail_if(inc_within and not inc_across, "spectral windows are not in increasing frequency")
    if expected.get("n_channels") is not None:
        g.fail_if(int(expected["n_channels"]) != allf.size,
                  f"{allf.size} channels, expected {int(expected['n_channels'])}")
    for key in ("freq_min_hz", "freq_max_hz"):
        if expected.get(key) is not None:
            g.fail_if(abs(float(expected[key]) - m[key]) > 1.0,
                      f"{key} is {m[key]:.1f}, expected {float(expected[key]):.1f}")


def _uvw_check(ms: Path, a1: np.ndarray, a2: np.ndarray, uvw: np.ndarray,
               th: MSQAThresholds, g: GateBuilder) -> None:
    """|UVW| must equal the antenna separation (a rotation keeps lengths)."""
    from casacore import tables

    with tables.table(f"{ms}::ANTENNA", ack=False) as at:
        pos = at.getcol("POSITION")
    if a1.max() >= len(pos) or a2.max() >= len(pos):
        g.fail_if(True, "ANTENNA1/ANTENNA2 index past the ANTENNA table")
        return
    sep = np.linalg.norm(pos[a2] - pos[a1], axis=1)
    err = np.abs(np.linalg.norm(uvw, axis=1) - sep)
    worst = float(err.max()) if err.size else 0.0
    g.metrics["uvw_max_error_m"] = worst
    g.metrics["uvw_median_error_m"] = float(np.median(err)) if err.size else 0.0
    g.fail_if(not np.isfinite(worst) or worst > th.max_uvw_error_m,
              f"|UVW| differs from the antenna separation by up to {worst:.3f} m "
              f"(limit {th.max_uvw_error_m} m)")


def _field_check(ms: Path, expected: dict[str, Any], th: MSQAThresholds, g: GateBuilder) -> None:
    from casacore import tables

    with tables.table(f"{ms}::FIELD", ack=False) as ft:
        n_fields = ft.nrows()
        pdir = ft.getcol("PHASE_DIR") if n_fields else np.zeros((0, 1, 2))
        names = list(ft.getcol("NAME")) if n_fields else []
    m = g.metrics
    m["n_fields"] = n_fields
    g.fail_if(n_fields == 0, "no FIELD rows")
    if n_fields == 0:
        return
    ra = float(np.degrees(pdir[0, 0, 0])) % 360.0
    dec = float(np.degrees(pdir[0, 0, 1]))
    m.update(phase_centre_ra_deg=ra, phase_centre_dec_deg=dec, field_name=str(names[0]))
    g.warn_if(n_fields > 1, f"{n_fields} fields (expected one phase centre per group)")
    if expected.get("phase_centre_ra_deg") is not None and expected.get("phase_centre_dec_deg") is not None:
        off = angular_separation_deg(ra, dec, float(expected["phase_centre_ra_deg"]),
                              float(expected["phase_centre_dec_deg"]))
        m["phase_centre_offset_deg"] = off
        g.fail_if(off > th.max_phase_center_offset_deg,
                  f"phase centre is {off:.4f} deg from where expected "
                  f"(limit {th.max_phase_center_offset_deg} deg)")
    if expected.get("pointing_dec_deg") is not None:
        # the ICRS centre differs from the apparent pointing dec by precession (< ~0.5 deg)
        d = abs(dec - float(expected["pointing_dec_deg"]))
        m["phase_centre_minus_pointing_dec_deg"] = d
        g.warn_if(d > 1.0, f"phase centre dec is {d:.2f} deg from the pointing declination")



def _sample_rows(tcol: np.ndarray, n: int) -> list[np.ndarray]:
    """Row numbers of the sampled integrations (:func:`sample_time_indices`)."""
    times = np.unique(tcol)
    return [np.flatnonzero(tcol == times[i]) for i in sample_time_indices(times.size, n)]


def _read_rows(t: Any, col: str, rows: np.ndarray, chan_stride: int = 1,
               how: list[str] | None = None) -> np.ndarray:
    """A column for the given rows, every ``chan_stride``-th channel; one contiguous read
    when the rows are consecutive, a view of the mapped tiles when their layout allows
    (``how`` collects which: "mapped" or "casacore")."""
    def get(tab: Any, start: int = 0, nrow: int = -1) -> np.ndarray:
        if chan_stride > 1:
            return tab.getcolslice(col, [0, 0], [-1, -1], [chan_stride, 1], start, nrow)
        return tab.getcol(col, startrow=start, nrow=nrow)

    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        view = _mapped_rows(t, col, int(rows[0]), int(rows.size), chan_stride)
        if how is not None:
            how.append("casacore" if view is None else "mapped")
        return get(t, int(rows[0]), int(rows.size)) if view is None else view
    if how is not None:
        how.append("casacore")
    sub = t.selectrows(rows.tolist())
    try:
        return get(sub)
    finally:
        sub.close()


def _mapped_rows(t: Any, col: str, start: int, nrow: int, chan_stride: int) -> np.ndarray | None:
    """Rows ``start`` … ``start + nrow - 1`` of ``col`` as a (row, channel, pol) view of its
    mapped storage file (:mod:`..mstiles`), or None when the layout is not the conversion's.

    casacore's first strided read of a full-size integration took 0.08 s from the page cache
    and 0.13-0.18 s from disk (tile cache set-up, element-wise copy), a third of the gate;
    the view costs its page faults (0.02 s cached). The first and last rows are compared
    with casacore's reading, so a misread layout falls back instead of judging wrong data."""
    tf = mstiles.tile_file(t, col)
    if tf is None or tf.bits:
        return None
    first, last = tf.tiles_of(start, nrow)
    lo = start - first * tf.tile_rows
    tiles = np.frombuffer(tf.map(first, last), dtype=tf.dtype).reshape(-1, tf.nchan, tf.npol)
    view = tiles[lo:lo + nrow, ::chan_stride, :]
    for r in (0, nrow - 1):
        if not np.array_equal(view[r], t.getcell(col, start + r)[::chan_stride], equal_nan=True):
            return None
    return view


def _mapped_flag_counts(t: Any) -> np.ndarray | None:
    """Set FLAG bits of every row, counted in the mapped storage file, or None.

    casacore unpacks a full group's 32 MB of flag bits into 254 MB of booleans (0.06 s with
    the counting); popcounts on the mapped bits take 0.015 s."""
    tf = mstiles.tile_file(t, "FLAG")
    if tf is None or not tf.bits:
        return None
    n_tiles = tf.tiles_of(0, tf.nrows)[1] + 1
    row_bytes = tf.npol * tf.nchan // 8
    raw = np.frombuffer(tf.map(0, n_tiles - 1), dtype=np.uint8).reshape(n_tiles, tf.bucket)
    rows = raw[:, :tf.tile_rows * row_bytes].reshape(-1, row_bytes)[:tf.nrows]
    words = rows.view(np.uint64) if row_bytes % 8 == 0 else rows
    counts = np.bitwise_count(words).sum(axis=1, dtype=np.int64)
    for r in (0, tf.nrows - 1):
        if counts[r] != int(np.count_nonzero(t.getcell("FLAG", r))):
            return None
    return counts


def _limit_tile_cache(t: Any, col: str) -> None:
    """Let casacore cache only a few tiles of ``col``.

    By default it sizes the cache for the whole slice asked for: 85 MB per full-size
    integration, allocated afresh (fresh pages are dear on a VM). The gate reads whole
    integrations in row order, so each tile is used once and a few suffice. Any other layout
    keeps casacore's default."""
    try:
        cubes = t.getdminfo(col)["SPEC"]["HYPERCUBES"]
        bucket = max(int(c["BucketSize"]) for c in cubes.values())
        t.setmaxcachesize(col, max(TILE_CACHE_BYTES, 2 * bucket))
    except Exception:  # noqa: BLE001 - not a tiled column: nothing to limit
        pass


def _channel_stride(t: Any, row: int, sample_channels: int) -> int:
    nchan = int(t.getcell("FLAG", row).shape[0])
    return max(1, -(-nchan // sample_channels)) if sample_channels > 0 else 1


@dataclass
class _DataSample:
    """What a few whole integrations of DATA say, accumulated per antenna and channel."""

    ants: np.ndarray  # sorted antenna numbers in the MS
    stride: int  # every stride-th channel was read
    batches: list[np.ndarray]  # rows of each sampled integration
    n_vis: int = 0
    n_nonfinite: int = 0
    cross_zero: np.ndarray = field(default_factory=lambda: np.zeros(0))  # zero cross vis per antenna
    cross_all: np.ndarray = field(default_factory=lambda: np.zeros(0))
    auto_amp: dict[int, list[float]] = field(default_factory=dict)  # median |auto| per read
    chan_zero: dict[int, np.ndarray] = field(default_factory=dict)  # per ddid: live zeros
    chan_all: dict[int, np.ndarray] = field(default_factory=dict)
    # per sampled batch of cross rows: (ANTENNA1, ANTENNA2, all-pols-zero per row and channel)
    stash: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    how: list[str] = field(default_factory=list)


def _sample_data(t: Any, a1: np.ndarray, a2: np.ndarray, tcol: np.ndarray, ddid: np.ndarray,
                 th: MSQAThresholds) -> _DataSample:
    ants = np.union1d(a1, a2)
    batches = _sample_rows(tcol, th.sample_integrations)
    _limit_tile_cache(t, "DATA")
    sm = _DataSample(ants, _channel_stride(t, int(batches[0][0]), th.sample_channels), batches,
                     cross_zero=np.zeros(ants.size), cross_all=np.zeros(ants.size))
    for rows in batches:
        for d in np.unique(ddid[rows]):
            r = rows[ddid[rows] == d]
            data = _read_rows(t, "DATA", r, sm.stride, sm.how)  # (nrow, nchan/stride, npol)
            finite = np.isfinite(data)
            sm.n_vis += data.size
            sm.n_nonfinite += int(data.size - finite.sum())
            zero = (data == 0) & finite
            r1, r2 = a1[r], a2[r]
            cross = r1 != r2
            zrow = _all_pols(zero)  # (nrow, nchan): both/all pols zero
            zcount = zrow.sum(axis=1)
            nch = zrow.shape[1]
            for side in (r1, r2):
                idx = np.searchsorted(ants, side[cross])
                sm.cross_zero += np.bincount(idx, weights=zcount[cross], minlength=ants.size)
                sm.cross_all += np.bincount(idx, minlength=ants.size) * nch
            autos = np.flatnonzero(~cross)
            if autos.size:
                amp = np.abs(np.where(finite[autos], data[autos], 0))
                for j, row in enumerate(autos):
                    sm.auto_amp.setdefault(int(r1[row]), []).append(float(np.median(amp[j])))
            sm.stash.append((r1[cross], r2[cross], zrow[cross]))
            sm.chan_zero.setdefault(int(d), np.zeros(nch))
            sm.chan_all.setdefault(int(d), np.zeros(nch))
            del data, finite, zero
    return sm


def _dead_antennas(sm: _DataSample) -> list[int]:
    """Antennas whose every sampled visibility is zero (autocorrelations too, if present)."""
    dead = []
    for i, a in enumerate(int(x) for x in sm.ants):  # ants is sorted (union1d)
        cross_dead = sm.cross_all[i] > 0 and sm.cross_zero[i] == sm.cross_all[i]
        auto_dead = a in sm.auto_amp and max(sm.auto_amp[a]) == 0.0
        if ((cross_dead and (a not in sm.auto_amp or auto_dead))
                or (sm.cross_all[i] == 0 and auto_dead)):
            dead.append(a)
    return dead


def _live_zero_fraction(sm: _DataSample, ddid: np.ndarray, dead: set[int]) -> float:
    """The zero fraction of cross visibilities between live antennas (and, as a side effect,
    the per-channel zero counts of live baselines in ``sm.chan_zero``/``chan_all``)."""
    z_live = n_live = 0
    for (r1, r2, zrow), d in zip(sm.stash, _ddids_of(sm.batches, ddid), strict=True):
        live = ~(np.isin(r1, list(dead)) | np.isin(r2, list(dead)))
        if live.any():
            z_live += int(zrow[live].sum())
            n_live += int(zrow[live].size)
            sm.chan_zero[d] += zrow[live].sum(axis=0)
            sm.chan_all[d] += live.sum()
    return float(z_live / max(n_live, 1)) if n_live else 1.0


def _data_checks(t: Any, a1: np.ndarray, a2: np.ndarray, tcol: np.ndarray, ddid: np.ndarray,
                 th: MSQAThresholds, g: GateBuilder) -> None:
    """Zeros, NaN/Inf, dead and weak antennas from a few whole integrations; flags from all.

    The flagged fraction leaves out antennas found dead (their zeros are flagged at
    conversion and must not make every group look heavily flagged, as they must not look
    zero)."""
    m = g.metrics
    sm = _sample_data(t, a1, a2, tcol, ddid, th)
    ants, stride = sm.ants, sm.stride
    m["sampled_integrations"] = len(sm.batches)
    m["channel_stride"] = stride
    m["data_read"] = "+".join(sorted(set(sm.how)))  # mapped tiles, casacore, or both
    dead = _dead_antennas(sm)
    dead_set = set(dead)
    zero_live = _live_zero_fraction(sm, ddid, dead_set)
    zero_all = float(sm.cross_zero.sum() / max(sm.cross_all.sum(), 1))
    nonfinite = sm.n_nonfinite / max(sm.n_vis, 1)
    nflag, ncell = _flag_counts(t, ddid)
    live_rows = ~(np.isin(a1, list(dead_set)) | np.isin(a2, list(dead_set)))
    if not live_rows.any():  # every antenna dead: the fraction over all rows
        live_rows[:] = True
    flagged = float(nflag[live_rows].sum() / max(int(ncell[live_rows].sum()), 1))
    times, tix = np.unique(tcol, return_inverse=True)
    n_times = int(times.size)
    lost = _flagged_out(nflag == ncell, a1, a2, tix, n_times, ants)
    flagged_out = sorted(a for a, k in lost.items() if k == n_times and a not in dead_set)
    lost_during = {a: k for a, k in sorted(lost.items()) if k < n_times}
    # sampled channels stand for the ``stride`` channels each: an estimate when stride > 1
    zero_chans = stride * int(sum(int(np.sum((sm.chan_all[d] > 0)
                                             & (sm.chan_zero[d] == sm.chan_all[d])))
                                  for d in sm.chan_all))
    alive = int(ants.size - len(dead) - len(flagged_out))
    med = {a: float(np.median(v)) for a, v in sorted(sm.auto_amp.items())}
    live_levels = [v for a, v in med.items() if a not in dead_set and v > 0]
    array_level = float(np.median(live_levels)) if live_levels else 0.0
    weak = sorted(a for a, v in med.items() if a not in dead_set and array_level > 0
                  and v < 0.1 * array_level)
    m.update(nonfinite_fraction=nonfinite, flagged_fraction=flagged,
             zero_fraction=zero_all, zero_fraction_live=zero_live, zero_channels=zero_chans,
             dead_antennas=sorted(dead), n_dead_antennas=len(dead), n_alive_antennas=alive,
             flagged_antennas=flagged_out, antennas_flagged_in_some_integrations=lost_during,
             auto_median_amplitude=med, auto_array_median=array_level, weak_antennas=weak)
    g.fail_if(nonfinite > th.max_nonfinite_fraction,
              f"{nonfinite:.2%} of sampled visibilities are NaN/Inf "
              f"(limit {th.max_nonfinite_fraction:.2%})")
    g.fail_if(zero_live > th.max_zero_fraction,
              f"{zero_live:.1%} of live cross-correlations are exactly zero "
              f"(limit {th.max_zero_fraction:.0%})")
    g.warn_if(th.warn_zero_fraction < zero_live <= th.max_zero_fraction,
              f"{zero_live:.1%} of live cross-correlations are exactly zero")
    g.fail_if(flagged > th.max_flagged_fraction,
              f"{flagged:.1%} of the visibilities are flagged (limit {th.max_flagged_fraction:.0%})")
    g.warn_if(th.warn_flagged_fraction < flagged <= th.max_flagged_fraction,
              f"{flagged:.1%} of the visibilities are flagged")
    g.fail_if(alive < th.min_antennas,
              f"only {alive} antennas carry data (minimum {th.min_antennas}); dead: {sorted(dead)}"
              + (f", flagged throughout: {flagged_out}" if flagged_out else ""))
    g.warn_if(bool(lost_during),
              "antennas with every cross-correlation flagged in some integrations (lost during "
              "the group?): " + ", ".join(f"{a} ({k} of {n_times})" for a, k in lost_during.items()))
    g.warn_if(ants.size > 0 and len(dead) / ants.size > th.warn_dead_fraction,
              f"{len(dead)} of {ants.size} antennas are dead (all zero): {sorted(dead)}")
    g.warn_if(zero_chans > 0 and zero_live <= th.max_zero_fraction,
              f"{zero_chans} channels are zero on every live baseline (a dead subband?)")
    g.warn_if(bool(weak), f"antennas with autocorrelations < 10% of the array median: {weak}")


def _flag_counts(t: Any, ddid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flagged and total visibilities of every row: counted in the mapped FLAG bits when
    there is one data description in the conversion's layout, else FLAG read in blocks of
    consecutive rows of one data description into one reused buffer (fresh pages are dear
    here)."""
    nflag = np.zeros(t.nrows(), np.int64)
    ncell = np.zeros(t.nrows(), np.int64)
    if ddid.size and np.all(ddid == ddid[0]):
        counts = _mapped_flag_counts(t)
        if counts is not None:
            ncell[:] = t.getcell("FLAG", 0).size
            return counts, ncell
    for d in np.unique(ddid):
        rows = np.flatnonzero(ddid == d)
        shape = tuple(t.getcell("FLAG", int(rows[0])).shape)
        buf = np.empty((min(FLAG_BLOCK_ROWS, rows.size), *shape), dtype=bool)
        for run in np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1):
            for i in range(0, run.size, buf.shape[0]):
                start, n = int(run[i]), min(buf.shape[0], run.size - i)
                t.getcolnp("FLAG", buf[:n], start, n)
                nflag[start:start + n] = _row_counts(buf[:n].reshape(n, -1))
                ncell[start:start + n] = buf[0].size
    return nflag, ncell


def _row_counts(flags: np.ndarray) -> np.ndarray:
    """True values per row of a (rows, k) boolean array, 4-5x faster than
    ``np.count_nonzero(axis=1)``: eight booleans are one uint64 whose byte lanes add up
    separately (a lane holds 255, so at most 255 words are summed at once)."""
    n, k = flags.shape
    if k % 8:
        return np.count_nonzero(flags, axis=1)
    words = flags.view(np.uint64)
    out = np.zeros(n, np.uint64)
    for j in range(0, words.shape[1], 255):
        lanes = words[:, j:j + 255].sum(axis=1, dtype=np.uint64)
        out += lanes.view(np.uint8).reshape(n, 8).sum(axis=1, dtype=np.uint64)
    return out.astype(np.int64)


def _flagged_out(full: np.ndarray, a1: np.ndarray, a2: np.ndarray, tix: np.ndarray,
                 n_times: int, ants: np.ndarray) -> dict[int, int]:
    """For each antenna, in how many integrations (``tix``: each row's) every
    cross-correlation row touching it is wholly flagged (only antennas where that happens
    at least once)."""
    cross = a1 != a2
    n_ant = ants.size
    n_bins = n_times * n_ant
    rows = np.zeros(n_bins)
    gone = np.zeros(n_bins)
    for side in (a1, a2):
        key = tix[cross] * n_ant + np.searchsorted(ants, side[cross])
        rows += np.bincount(key, minlength=n_bins)
        gone += np.bincount(key, weights=full[cross], minlength=n_bins)
    out = ((rows > 0) & (gone == rows)).reshape(-1, n_ant).sum(axis=0)
    return {int(ants[i]): int(k) for i, k in enumerate(out) if k}


def _all_pols(a: np.ndarray) -> np.ndarray:
    """``a.all(axis=2)`` for (row, chan, pol) booleans, ~10x faster: numpy reduces a short
    last axis element by element; combining the polarisation planes stays vectorised."""
    out = a[..., 0].copy()
    for p in range(1, a.shape[2]):
        out &= a[..., p]
    return out


def _ddids_of(batches: list[np.ndarray], ddid: np.ndarray) -> list[int]:
    out = []
    for rows in batches:
        out.extend(int(d) for d in np.unique(ddid[rows]))
    return out
