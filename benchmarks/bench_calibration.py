"""Time each step of the calibration stage on one group.

    python benchmarks/bench_calibration.py --preset full [--workdir DIR] [--keep]
    python benchmarks/bench_calibration.py --ms PATH [--pointing-dec DEG]

``--preset`` simulates one group with 3C286 transiting and converts it with the conversion
stage (both in a child process: python-casacore and casatools never share a process);
``--ms`` takes a converted MS (its conversion record supplies the pointing and mid-time). The
MS is copied into the work directory first, so the original is never modified.

Reported: the solve path as the stage runs it (flagging, copy, model, K, Gp, BP, G,
applycal) and the QA gate; then the apply path every non-calibrator group takes (flagging +
applycal of the new set, G 'nearest') on a fresh copy; peak RSS of this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _common import simulate_and_convert


def ms_facts(ms: Path) -> dict:
    """Group id, pointing and mid-time from the conversion record in the MS's keywords."""
    from dsa110_contimg.calibration.casarun import open_table
    from dsa110_contimg.conversion.convert import COMPLETE_KEYWORD

    with open_table(ms) as tb:
        rec = tb.getkeyword(COMPLETE_KEYWORD) if COMPLETE_KEYWORD in tb.keywordnames() else {}
    stem = ms.name.removesuffix(".ms")
    gid = f"{stem[:10]}T{stem[11:13]}:{stem[13:15]}:{stem[15:17]}"
    return {"group_id": rec.get("group_id", gid), "pointing_dec_deg": rec.get("pointing_dec_deg"),
            "mid_mjd": rec.get("mid_mjd")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ms", type=Path, help="a converted group MS (left untouched)")
    src.add_argument("--preset", choices=("tiny", "small", "full"))
    ap.add_argument("--pointing-dec", type=float, help="pointing declination (deg), if the MS lacks it")
    ap.add_argument("--workdir", type=Path, help="where copies and caltables go (default: a temp dir)")
    ap.add_argument("--uvrange", help="solve uv-range (default: '' for tiny/small, else the setting)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    a = ap.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-cal-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"workdir": str(work)}
    if a.preset:
        facts = simulate_and_convert(a.preset, work)
        report.update(simulate_s=round(facts["simulate_s"], 1), convert_s=round(facts["convert_s"], 1))
        source = Path(facts["ms"])
    from dsa110_contimg.casa_env import prepare_casa

    prepare_casa(work / "state")
    from dsa110_contimg.calibration.apply import apply_calset
    from dsa110_contimg.calibration.casarun import read_ms_info
    from dsa110_contimg.calibration.flagging import flag_ms
    from dsa110_contimg.calibration.options import CalibrationOptions
    from dsa110_contimg.calibration.stage import CalibrationInputs, calibrate_group
    from dsa110_contimg.qa.calibration import check_calibration_quality
    from dsa110_contimg.qa.options import CalQAThresholds

    if a.ms:
        source = a.ms.resolve()
        facts = ms_facts(source)
    dec = a.pointing_dec if a.pointing_dec is not None else facts.get("pointing_dec_deg")
    if dec is None:
        sys.exit("no pointing declination in the MS: pass --pointing-dec")
    info = read_ms_info(source)
    mid = facts.get("mid_mjd") or info.mid_mjd
    options = CalibrationOptions()
    uvrange = a.uvrange if a.uvrange is not None else ("" if a.preset in ("tiny", "small") or
                                                       len(info.antennas_in_data) < 40 else None)
    if uvrange is not None:
        options = replace(options, uvrange=uvrange)

    ms = work / "solve" / source.name
    shutil.rmtree(ms.parent, ignore_errors=True)
    ms.parent.mkdir(parents=True)
    t0 = time.perf_counter()
    shutil.copytree(source, ms)
    report["copy_s"] = round(time.perf_counter() - t0, 1)
    report.update(rows=info.nrows, channels=int(info.freqs_hz.size), antennas=len(info.antennas_in_data),
                  uvrange=options.uvrange)

    inputs = CalibrationInputs(facts["group_id"], ms, work / "solve" / "caltables", float(dec),
                               float(mid), None)
    t0 = time.perf_counter()
    res = calibrate_group(inputs, options)
    stage_s = time.perf_counter() - t0
    qa = check_calibration_quality(res.new_set, ms, CalQAThresholds())
    steps = dict(res.step_durations)
    steps["QA"] = qa.duration_s
    report.update(mode=res.mode, calibrator=res.calibrator, refant=res.refant,
                  solve_path_s=round(stage_s, 2), steps_s={k: round(v, 2) for k, v in steps.items()},
                  qa_passed=qa.passed, qa_failures=list(qa.failures),
                  flag_fractions=res.flag_fractions)

    if res.new_set is not None:
        ms2 = work / "apply" / source.name
        shutil.rmtree(ms2.parent, ignore_errors=True)
        ms2.parent.mkdir(parents=True)
        shutil.copytree(source, ms2)
        t0 = time.perf_counter()
        f = flag_ms(ms2, options)
        took = apply_calset(ms2, res.new_set, same_group=False)
        report["apply_path_s"] = {"flagging": round(f.duration_s, 2), "applycal": round(took, 2),
                                  "total": round(time.perf_counter() - t0, 2)}
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    if a.json:
        print(json.dumps(report))
    else:
        print(f"calibration benchmark: {source}")
        print(f"  {report['antennas']} antennas, {report['rows']} rows, {report['channels']} channels,"
              f" uvrange={report['uvrange']!r}; mode={res.mode} calibrator={res.calibrator} refant={res.refant}")
        if "convert_s" in report:
            print(f"  simulate {report['simulate_s']} s, convert {report['convert_s']} s (not part of the stage)")
        print("  solve path (calibrator group):")
        for k, v in steps.items():
            print(f"    {k:16s} {v:8.2f} s")
        print(f"    {'stage total':16s} {stage_s:8.2f} s   QA {'passed' if qa.passed else 'FAILED: ' + qa.reason}")
        if "apply_path_s" in report:
            ap_ = report["apply_path_s"]
            print(f"  apply path (other groups): flagging {ap_['flagging']} s + applycal {ap_['applycal']} s"
                  f" = {ap_['total']} s")
        print(f"  flagged after each step: {res.flag_fractions}")
        print(f"  peak RSS {report['peak_rss_gb']} GB; work dir {work}")
    if not a.keep and a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if qa.passed else 1


if __name__ == "__main__":
    sys.exit(main())
