"""The plain CASA chain of measured-baseline.md, nothing clever: the reference to beat.

    python benchmarks/plain_chain.py GROUP_DIR GROUP_ID WORKDIR [--json OUT]

1. pyuvdata: read the 16 subbands as one UVData, phase to the calibrator, write_ms
   (python-casacore, in its own process);
2. casatasks (another process): componentlist + ft, K (solint inf), BP (solint inf, solnorm),
   G (per integration, amp+phase), applycal;
3. tclean 2048 x 2048, 3 arcsec, Briggs 0.5, niter 1000, threshold 1 mJy, then exportfits.
Each step is timed (wall and CPU) and the peak RSS of each process is reported.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path


def _clock() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), ru.ru_utime + ru.ru_stime


def _step(times: dict, name: str, t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clock()
    times[name] = {"wall_s": round(t1[0] - t0[0], 2), "cpu_s": round(t1[1] - t0[1], 2)}
    print(f"  {name:<10} wall {times[name]['wall_s']:7.1f} s  cpu {times[name]['cpu_s']:7.1f} s",
          flush=True)
    return t1


def convert(group_dir: str, group_id: str, ms: str, out) -> None:
    import warnings

    import numpy as np
    from pyuvdata import UVData

    warnings.filterwarnings("ignore")
    truth = json.loads((Path(group_dir) / f"{group_id}_truth.json").read_text())
    cal = next(s for s in truth["sources"] if s.get("transits_in_group"))
    files = sorted(str(Path(group_dir) / n) for n in truth["files"])
    times: dict = {}
    t = _clock()
    uv = UVData()
    uv.read(files, file_type="uvh5", run_check=False, run_check_acceptability=False,
            strict_uvw_antpos_check=False)
    t = _step(times, "read", t)
    uv.phase(lon=np.radians(cal["ra_deg"]), lat=np.radians(cal["dec_deg"]), epoch="J2000",
             cat_name=cal["name"])
    t = _step(times, "phase", t)
    uv.write_ms(ms, clobber=True, run_check=False)
    _step(times, "write_ms", t)
    out.put({"times": times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
             "calibrator": cal})


def calibrate_and_image(ms: str, work: str, cal: dict, out) -> None:
    from dsa110_contimg.casa_env import prepare_casa

    prepare_casa(Path(work) / "state")
    import casatasks as ct
    import casatools

    times: dict = {}
    cl_path = str(Path(work) / "cal.cl")
    cl = casatools.componentlist()
    cl.addcomponent(flux=cal["apparent_flux_jy"], fluxunit="Jy", shape="point",
                    dir=f"J2000 {cal['ra_deg']}deg {cal['dec_deg']}deg",
                    spectrumtype="spectral index", index=cal["spectral_index"],
                    freq="1.4GHz")
    cl.rename(cl_path)
    cl.close()
    tabs = {k: str(Path(work) / f"plain.{k}") for k in ("K", "B", "G")}
    t = _clock()
    ct.ft(vis=ms, complist=cl_path, usescratch=True)
    t = _step(times, "ft", t)
    ct.gaincal(vis=ms, caltable=tabs["K"], gaintype="K", solint="inf", refant="24", minsnr=3)
    t = _step(times, "K", t)
    ct.bandpass(vis=ms, caltable=tabs["B"], solint="inf", solnorm=True, refant="24",
                gaintable=[tabs["K"]], minsnr=3)
    t = _step(times, "BP", t)
    ct.gaincal(vis=ms, caltable=tabs["G"], gaintype="G", calmode="ap", solint="int",
               refant="24", gaintable=[tabs["K"], tabs["B"]], minsnr=3)
    t = _step(times, "G", t)
    ct.applycal(vis=ms, gaintable=[tabs["K"], tabs["B"], tabs["G"]], calwt=False)
    t = _step(times, "applycal", t)
    image = str(Path(work) / "plain")
    ct.tclean(vis=ms, imagename=image, imsize=[2048, 2048], cell="3arcsec", specmode="mfs",
              stokes="I", weighting="briggs", robust=0.5, niter=1000, threshold="1mJy",
              datacolumn="corrected", deconvolver="hogbom", gridder="standard")
    t = _step(times, "tclean", t)
    ct.exportfits(imagename=image + ".image", fitsimage=image + ".image.fits", overwrite=True)
    _step(times, "exportfits", t)
    out.put({"times": times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
             "caltables": tabs, "image_fits": image + ".image.fits"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("group_dir")
    ap.add_argument("group_id")
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ms = str(args.workdir / "plain.ms")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    print(f"plain chain on {args.group_id}", flush=True)
    t0 = time.perf_counter()
    p = ctx.Process(target=convert, args=(args.group_dir, args.group_id, ms, q))
    p.start()
    conv = q.get()
    p.join()
    p = ctx.Process(target=calibrate_and_image, args=(ms, str(args.workdir), conv["calibrator"], q))
    p.start()
    rest = q.get()
    p.join()
    total = time.perf_counter() - t0
    report = {"group_id": args.group_id, "wall_s": round(total, 1),
              "steps": {**conv["times"], **rest["times"]},
              "peak_rss_gb": {"convert": round(conv["peak_rss_gb"], 2),
                              "calibrate+image": round(rest["peak_rss_gb"], 2)},
              "ms": ms, "caltables": rest["caltables"], "image_fits": rest["image_fits"]}
    print(f"plain chain total {total:.0f} s; peak RSS convert {conv['peak_rss_gb']:.1f} GB, "
          f"calibrate+image {rest['peak_rss_gb']:.1f} GB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
