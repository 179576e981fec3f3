"""Time the imaging stage (tclean at a tier, FITS, pbcor, quick-look) on one group.

    python benchmarks/bench_imaging.py --preset full [--tier standard] [--workdir DIR] [--keep]
    python benchmarks/bench_imaging.py --ms PATH [--datacolumn corrected|data] [--tier quick]

``--preset`` simulates one group with 3C286 transiting, converts it with the conversion stage
(in a child process: python-casacore and casatools never share a process) and calibrates it
perfectly from the injected gains (``imaging.simcal``), so imaging is timed and checked on its
own. ``--ms`` images an existing MS as it is (tclean does not modify it: savemodel='none').

Reported: the tclean plan (imsize, cell, gridder/w-planes, threshold), per-step wall times,
tclean's major cycles and stop reason, the products with their sizes, the image QA gate, the
peak RSS of this process and, with ``--preset``, every injected source's recovered flux.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import simulate_and_convert


def _group_id_from_ms(ms: Path) -> str:
    stem = ms.name.removesuffix(".ms")
    return f"{stem[:10]}T{stem[11:13]}:{stem[13:15]}:{stem[15:17]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ms", type=Path, help="an MS to image (left untouched)")
    src.add_argument("--preset", choices=("tiny", "small", "full"))
    ap.add_argument("--field-catalogue", help="survey catalogue CSV whose sources are peeled too")
    ap.add_argument("--tier", default="standard", choices=("quick", "standard", "deep"))
    ap.add_argument("--datacolumn", default="corrected", choices=("corrected", "data"))
    ap.add_argument("--calibrator", default="3C286",
                    help="the group's own calibrator (QA flux check); '' for a group imaged "
                    "with carried-over gains (the daemon then phase-self-calibrates it)")
    ap.add_argument("--max-imsize", type=int, help="override CONTIMG_IMG_MAX_IMSIZE")
    ap.add_argument("--deconvolver", choices=("hogbom", "multiscale", "clark"),
                    help="override CONTIMG_IMG_DECONVOLVER (used by the standard tier)")
    ap.add_argument("--masker", choices=("scipy", "casa"),
                    help="override CONTIMG_IMG_MASKER (who builds the clean mask after peeling)")
    ap.add_argument("--wproj-max-phase", type=float,
                    help="override CONTIMG_IMG_WPROJ_MAX_PHASE_RAD (large: no w-projection)")
    ap.add_argument("--truth", type=Path, help="with --ms: the simulator's truth JSON, to "
                    "compare recovered fluxes")
    ap.add_argument("--workdir", type=Path, help="default: a temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "src"))
    from dsa110_contimg.casa_env import prepare_casa

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_imaging_"))
    work.mkdir(parents=True, exist_ok=True)
    prepare_casa(work / "state")
    from dataclasses import replace

    from dsa110_contimg.imaging.options import ImagingOptions
    from dsa110_contimg.imaging.stage import ImagingInputs, image_group
    from dsa110_contimg.products import product_dir
    from dsa110_contimg.qa.image import Beam, check_image_quality, fit_point_source
    from dsa110_contimg.qa.options import ImageQAThresholds
    from dsa110_contimg.simulate.truthcal import apply_truth_gains

    report: dict = {"workdir": str(work)}
    truth = None
    try:
        if args.preset:
            info = simulate_and_convert(args.preset, work)
            report.update(simulate_s=round(info["simulate_s"], 1),
                          convert_s=round(info["convert_s"], 1))
            ms, gid = Path(info["ms"]), info["group_id"]
            truth = json.loads(Path(info["truth"]).read_text())
            t0 = time.perf_counter()
            apply_truth_gains(ms, truth)
            report["truth_calibration_s"] = round(time.perf_counter() - t0, 1)
        else:
            ms, gid = args.ms.resolve(), _group_id_from_ms(args.ms.resolve())
            if args.truth:
                truth = json.loads(args.truth.read_text())
        options = ImagingOptions(tier=args.tier)
        if args.max_imsize:
            options = replace(options, max_imsize=args.max_imsize)
        if args.deconvolver:
            options = replace(options, deconvolver=args.deconvolver)
        if args.masker:
            options = replace(options, masker=args.masker)
        if args.wproj_max_phase:
            options = replace(options, wproj_max_phase_rad=args.wproj_max_phase)
        inputs = ImagingInputs(gid, ms, product_dir(work / "images", gid), args.datacolumn,
                               args.calibrator or None, args.field_catalogue)
        t0 = time.perf_counter()
        result = image_group(inputs, options)
        report["image_group_s"] = round(time.perf_counter() - t0, 1)
        qa = check_image_quality(result, ImageQAThresholds(), args.calibrator or None)
        report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        _print(result, qa, report, truth, Beam, fit_point_source)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(result, qa, report, truth, Beam, fit_point_source) -> None:
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS

    p = result.plan
    print(f"group {result.group_id}  tier {result.tier}")
    for k, v in report.items():
        print(f"  {k:22s} {v}")
    print(f"  plan: imsize {p['imsize']}  cell {p['cell_arcsec']}\"  gridder {p['gridder']} "
          f"(w-planes {p['wprojplanes']}, w-phase {p['w_phase_rad']:.2f} rad)  "
          f"pb at edge {p['pb_at_edge']:.2f}  expected noise {p['noise_expected_jy']:.3g} Jy "
          f"(Briggs x{p['briggs_factor']:.2f})  threshold {p['threshold_jy']:.3g} Jy")
    print(f"  tclean {result.tclean_s:.1f} s: {result.iterdone} iterations, "
          f"{result.nmajordone} major cycles, stop: {result.stopreason}")
    print("  steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings_s.items()))
    print(f"  beam {result.bmaj_arcsec:.1f}\" x {result.bmin_arcsec:.1f}\" PA {result.bpa_deg:.1f}  "
          f"rms {result.rms_jy * 1e3:.3f} mJy/beam  peak {result.peak_jy:.3f} Jy/beam  "
          f"DR {result.dynamic_range:.0f}")
    print(f"  QA {'passed' if qa.passed else 'FAILED: ' + qa.reason}"
          + (f"  warnings: {'; '.join(qa.warnings)}" if qa.warnings else ""))
    cal = qa.metrics.get("calibrator")
    if cal and "ratio" in cal:
        print(f"  {cal['name']}: {cal['measured_flux_jy']:.3f} Jy vs catalogue "
              f"{cal['catalogue_flux_jy']:.3f} Jy (ratio {cal['ratio']:.4f})")
    print("  products:")
    for path in (result.image_fits, result.pbcor_fits, result.pb_fits, result.residual_fits,
                 result.quicklook_png):
        if path is not None and Path(path).exists():
            print(f"    {path}  ({Path(path).stat().st_size / 2**20:.1f} MiB)")
    if truth is None:
        return
    with fits.open(result.pbcor_fits) as h:
        data, header = np.squeeze(h[0].data).astype(float), h[0].header
    beam, wcs = Beam.from_header(header), WCS(header)
    print("  source       truth_Jy   pb_mean  apparent/rms   fit_Jy   ratio  offset_beams")
    for s in truth["sources"]:
        fit = fit_point_source(data, wcs, s["ra_deg"], s["dec_deg"], beam)
        snr = s["apparent_flux_jy"] / result.rms_jy
        if fit is None:
            print(f"  {s['name']:12s} {s['flux_at_band_centre_jy']:8.4f} {s['pb_mean']:8.3f} "
                  f"{snr:12.1f}   (outside the corrected area)")
            continue
        print(f"  {s['name']:12s} {s['flux_at_band_centre_jy']:8.4f} {s['pb_mean']:8.3f} "
              f"{snr:12.1f} {fit['flux_jy']:8.4f} {fit['flux_jy'] / s['flux_at_band_centre_jy']:7.4f} "
              f"{fit['offset_beams']:12.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
