"""Conversion throughput against a plain copy of the same bytes into tmpfs, in one run.

    python benchmarks/bench_conversion.py [--preset tiny|small|full] [--group-dir DIR]

Simulates one group (or reuses the group in ``--group-dir``), reads it once so both
contenders start from a warm page cache, times a plain copy of the UVH5 files into tmpfs
(best of ``--copies``), then converts the group in a fresh worker process as the daemon
does (a forkserver child with the daemon's preloaded modules, one task per child; or
``--context spawn`` for a cold interpreter) and runs the MS QA gate in another. Prints MB/s of both, their ratio, the conversion's own step timings and the
peak RSS of the conversion worker (``getrusage`` in the worker: itself, and the largest
of its helper processes when ``--processes`` > 1).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import read_once, timed_copies

ROOT = Path(__file__).resolve().parent.parent


def _find_group(d: Path) -> tuple[str, list[Path]] | None:
    files = sorted(d.glob("*_sb??.hdf5"))
    if not files:
        return None
    truth = sorted(d.glob("*_truth.json"))
    if truth:
        t = json.loads(truth[0].read_text())
        return t["group_id"], sorted(d / n for n in t["files"])
    return files[0].name.split("_sb")[0], files


def _copy_rate(files: list[Path], tmpfs: Path, repeats: int) -> tuple[float, float]:
    """(best, first) MB/s: on a VM that hands freed memory back to its host the first copy
    pays for fresh tmpfs pages, as the conversion does, and later ones reuse them."""
    total = sum(f.stat().st_size for f in files)
    walls = timed_copies(files, tmpfs, repeats)
    return total / min(walls) / 1e6, total / walls[0] / 1e6


def _convert(inputs, options):
    """In the worker: convert, then report the worker's own peak RSS and its helpers'."""
    from dsa110_contimg.conversion.convert import convert_group

    result = convert_group(inputs, options)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB
    helpers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result, own, helpers


def _qa(ms, expected):
    from dsa110_contimg.qa.ms import check_ms_after_conversion
    from dsa110_contimg.qa.options import MSQAThresholds

    return check_ms_after_conversion(ms, MSQAThresholds(), expected)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=("tiny", "small", "full"))
    p.add_argument("--group-dir", type=Path, help="reuse (or simulate into) this directory")
    p.add_argument("--work-dir", type=Path, help="products and scratch (default: a temp dir on disk)")
    p.add_argument("--tmpfs", type=Path, default=Path("/dev/shm"))
    p.add_argument("--copies", type=int, default=2, help="plain-copy repetitions (best is kept)")
    p.add_argument("--no-stage-inputs", action="store_true", help="read inputs in place")
    p.add_argument("--no-fsync", action="store_true",
                   help="do not fsync the MS before publishing (default: the daemon's default)")
    p.add_argument("--no-direct", action="store_true",
                   help="publish with buffered copies, not O_DIRECT (CONTIMG_PUBLISH_DIRECT=false)")
    p.add_argument("--context", default="forkserver", choices=("forkserver", "spawn"))
    p.add_argument("--no-iers-preload", action="store_true",
                   help="forkserver without dsa110_contimg.conversion.preload (IERS parsed "
                        "in every worker, ~1-2 s)")
    p.add_argument("--processes", type=int, default=1,
                   help="CONTIMG_CONVERT_PROCESSES (helper processes read subbands)")
    p.add_argument("--work-area", action="store_true",
                   help="keep the MS in the tmpfs work area (CONTIMG_TMPFS_KEEP_MS=true) instead "
                        "of publishing it to disk (the default)")
    p.add_argument("--runs", type=int, default=2,
                   help="conversions of the group in a row (MS removed in between): the first "
                        "writes fresh tmpfs pages, later ones the kept tile files of the one "
                        "before, as the daemon does in steady state (CONTIMG_WARM_COLUMN_SETS); "
                        "the last is reported, all are listed")
    p.add_argument("--pause-s", type=float, default=0.0,
                   help="idle this long between runs (309: groups as the telescope spaces them; "
                        "on a VM whose host reclaims idle memory, shows what that costs)")
    p.add_argument("--no-warm", action="store_true",
                   help="no warm tile files (CONTIMG_WARM_COLUMN_SETS=0)")
    p.add_argument("--keep", action="store_true", help="keep the MS and work directory")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from dsa110_contimg.casa_env import prepare_casa
    from dsa110_contimg.conversion.convert import ConversionInputs
    from dsa110_contimg.conversion.options import ConversionOptions
    from dsa110_contimg.qa.options import MSQAThresholds

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-conversion-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare_casa(work / "state")
    group_dir = args.group_dir or work / "group"
    found = _find_group(group_dir) if group_dir.exists() else None
    if found is None:
        from dsa110_contimg.simulate import simulate_groups

        t0 = time.perf_counter()
        simulate_groups(group_dir, preset=args.preset, groups=1, seed=7)
        print(f"simulated a {args.preset} group in {time.perf_counter() - t0:.1f} s")
        found = _find_group(group_dir)
    assert found is not None
    group_id, files = found
    total = sum(f.stat().st_size for f in files)
    print(f"group {group_id}: {len(files)} files, {total / 1e6:.1f} MB in {group_dir}")

    read_once(files)
    copy_mbs, first_mbs = _copy_rate(files, args.tmpfs, args.copies)

    out = work / "products"
    if out.exists():
        shutil.rmtree(out)
    from dsa110_contimg.conversion.workarea import work_dir, work_ms_path

    kept = work_dir(args.tmpfs, work / "state")  # also holds the warm tile files
    shutil.rmtree(kept, ignore_errors=True)
    inputs = ConversionInputs(group_id=group_id, files=tuple(files), output_dir=out,
                              scratch_dir=work / "scratch", tmpfs_path=args.tmpfs, work_dir=kept,
                              cache_integrations=MSQAThresholds().sample_integrations)
    defaults = ConversionOptions()
    options = ConversionOptions(stage_inputs=defaults.stage_inputs and not args.no_stage_inputs,
                                publish_fsync=defaults.publish_fsync and not args.no_fsync,
                                publish_direct=defaults.publish_direct and not args.no_direct,
                                parallel_subbands=args.processes, keep_in_tmpfs=args.work_area,
                                warm_column_sets=0 if args.no_warm else defaults.warm_column_sets)
    ctx = mp.get_context(args.context)
    if args.context == "forkserver":
        try:
            from dsa110_contimg.daemon.executor import _PRELOAD as preload
        except ImportError:
            preload = ["numpy", "h5py", "astropy.time", "pyuvdata"]
        preload = list(preload)
        if not args.no_iers_preload:
            preload.append("dsa110_contimg.conversion.preload")
        ctx.set_forkserver_preload(preload)
    runs = []
    for i in range(max(1, args.runs)):
        if i and args.pause_s > 0:
            time.sleep(args.pause_s)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work_ms_path(kept, group_id), ignore_errors=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as ex:
            result, rss_worker, rss_helpers = ex.submit(_convert, inputs, options).result()
        wall = time.perf_counter() - t0
        runs.append({"duration_s": result.duration_s, "warm_columns": list(result.warm_columns),
                     "timings_s": dict(result.timings_s), "peak_rss_mb": rss_worker})
        print(f"run {len(runs)}: {result.duration_s:.2f} s, warm columns "
              f"{list(result.warm_columns) or 'none'}; "
              + ", ".join(f"{k} {v:.2f}" for k, v in result.timings_s), flush=True)
    conv_mbs = total / result.duration_s / 1e6
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as ex:
        qa = ex.submit(_qa, result.ms_path, {"n_channels": result.n_channels,
                                             "phase_centre_ra_deg": result.phase_centre_ra_deg,
                                             "phase_centre_dec_deg": result.phase_centre_dec_deg}
                       ).result()
    ms_bytes = sum(p.stat().st_size for p in result.ms_path.rglob("*") if p.is_file())

    print(f"plain copy into {args.tmpfs}: {copy_mbs:8.1f} MB/s (best of {args.copies})")
    print(f"conversion (convert_group):  {conv_mbs:8.1f} MB/s  ({result.duration_s:.2f} s; "
          f"{wall:.2f} s with worker start-up)")
    print(f"ratio conversion / copy:     {conv_mbs / copy_mbs:8.3f}")
    print(f"peak RSS of the worker:      {rss_worker:8.0f} MB"
          + (f" (+ helper processes, largest: {rss_helpers:.0f} MB)" if rss_helpers else ""))
    print(f"options: stage_inputs={options.stage_inputs} fsync={options.publish_fsync} "
          f"direct={options.publish_direct} early={options.publish_early} "
          f"kept in tmpfs={result.ms_path.parent == kept} warm columns={list(result.warm_columns)} "
          f"processes={options.parallel_subbands} worker={args.context}"
          + ("" if args.context != "forkserver" else
             f" (IERS preloaded: {not args.no_iers_preload})"))
    print(f"MS: {result.ms_path} ({ms_bytes / 1e6:.0f} MB), staged on {result.staged_on}, "
          f"{result.n_antennas} antennas, {result.n_times} times, {result.n_channels} channels")
    print("steps (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings_s))
    print(f"QA gate: {'passed' if qa.passed else 'FAILED: ' + qa.reason} in {qa.duration_s:.2f} s"
          + (f"; warnings: {'; '.join(qa.warnings)}" if qa.warnings else ""))
    print(f"load average during run: {os.getloadavg()[0]:.2f} (2 cores shared)")
    if args.json:
        args.json.write_text(json.dumps({
            "group_id": group_id, "bytes": total, "copy_mb_s": copy_mbs,
            "first_copy_mb_s": first_mbs, "mb_s": conv_mbs,
            "ratio": conv_mbs / copy_mbs, "duration_s": result.duration_s, "wall_s": wall,
            "peak_rss_mb": rss_worker, "timings_s": dict(result.timings_s),
            "qa_s": qa.duration_s, "qa_passed": qa.passed, "work_area": args.work_area,
            "publish_direct": options.publish_direct,
            "warm_columns": list(result.warm_columns), "runs": runs,
            "load_average": os.getloadavg()[0]}, indent=1))
    if not args.keep:
        shutil.rmtree(kept, ignore_errors=True)  # the tmpfs work area (RAM)
    if not args.keep and args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
