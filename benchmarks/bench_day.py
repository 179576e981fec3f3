"""A simulated day at one declination through the daemon: is every group calibrated?

One calibrator transit (3C286 in the first group), then groups spread over 24 h (default one
an hour), gains drifting on an absolute time axis (phase random walk ~25 deg/h, slow
amplitude drift), a sky drawn from 1.4 GHz source counts, and an NVSS-format catalogue of that
sky as a survey would list it (>= 5 mJy, 3 % flux errors, NVSS-like position errors, no
spectral indices), built into the daemon's sky catalogue before it starts.

Per group it prints the calibration mode (solved / field / applied / held) with the seconds
the field model and the solves took, the gain errors against the injected truth (phase rms
after removing the best-fit phase gradient across the array, which is reported as an
astrometric offset in beams; antenna-relative amplitude; overall amplitude scale) and the
primary-beam-corrected flux ratios of the sources with S/N >= 50 at beam gain >= 0.5. Then
the coverage: groups done and calibrated / groups in. A second, short run without any
catalogue shows a field group held with an alert naming the missing catalogue.

    make bench-day                      # small preset, 24 groups, one an hour
    make bench-day BENCH_ARGS="--preset tiny --groups 6"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    count_final,
    daemon_dirs,
    daemon_env,
    drop_group,
    set_name,
)

MJD_JD = 2400000.5
MODES = ("solved", "field", "applied", "uncalibrated")


def simulate_day(out: Path, preset: str, groups: int, every_s: float, seed: int,
                 fresh: bool, min_mjy: float) -> list[dict]:
    truths = sorted(out.glob("*_truth.json"))
    if fresh or len(truths) != groups:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "simulate", str(out),
                        "--preset", preset, "--groups", str(groups), "--every", str(every_s),
                        "--gain-drift", "--sky", "counts", "--sky-min-mjy", str(min_mjy),
                        "--seed", str(seed)], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"simulated {groups} {preset} groups, one every {every_s:.0f} s, in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        truths = sorted(out.glob("*_truth.json"))
    else:
        print(f"reusing the simulated day in {out}", flush=True)
    return [json.loads(p.read_text()) for p in truths]


def run(group_dir: Path, truths: list[dict], work: Path, catalogue: Path | None) -> Path:
    """Drop every group, run ``contimg run --once`` until idle; returns the state DB."""
    dirs = daemon_dirs(work)
    env = daemon_env(dirs, 2)
    env.pop("CONTIMG_CAL_FIELD_CATALOGUE", None)
    if catalogue is not None:
        # only what the survey lists: the simulated sky holds no other VLA calibrators
        subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "catalog", "build",
                        "--no-bundled", str(catalogue)], env=env, check=True)
    for t in truths:
        drop_group(group_dir, dirs["incoming"], t)
    with open(work / "daemon.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "run", "--once"],
                            env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    db = dirs["state"] / "contimg.sqlite"
    print(f"  daemon exited {rc}; {count_final(db)} of {len(truths)} groups final", flush=True)
    return db


def _flags(db: Path) -> dict[str, dict]:
    with sqlite3.connect(db) as con:
        return {gid: json.loads(f or "{}") for gid, f in
                con.execute("SELECT id, flags FROM groups").fetchall()}


def _states(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT id, state FROM groups").fetchall())


def _set_tables(db: Path, name: str) -> tuple[dict[str, Path], str, dict]:
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT refant, params_json FROM cal_sets WHERE name = ?",
                          (name,)).fetchone()
        tables = dict(con.execute("SELECT kind, path FROM cal_tables WHERE set_name = ?",
                                  (name,)).fetchall())
    if row is None:
        raise LookupError(name)
    return {k: Path(v) for k, v in tables.items()}, str(row[0]), json.loads(row[1] or "{}")


def applied_tables(db: Path, cal: dict) -> tuple[dict[str, Path], str]:
    """K, BP and G the group's CORRECTED_DATA was made with, and the refant."""
    if cal.get("new_set"):
        tabs, refant, params = _set_tables(db, set_name(cal["new_set"]))
        if "BP" not in tabs and params.get("bandpass_set"):  # a field solution: G only
            bp, _, _ = _set_tables(db, params["bandpass_set"])
            tabs = {**{k: v for k, v in bp.items() if k in ("K", "BP")}, **tabs}
        return {k: v for k, v in tabs.items() if k in ("K", "BP", "G")}, refant
    bp_name, _, g_name = cal["applied_set"].partition("+")
    bp, refant, _ = _set_tables(db, bp_name)
    tabs = {k: v for k, v in bp.items() if k in ("K", "BP", "G")}
    if g_name:
        g, refant, _ = _set_tables(db, g_name)
        tabs["G"] = g["G"]
    return tabs, refant


def gain_accuracy(tables: dict[str, Path], refant: str, ms: Path, truth: dict) -> dict[str, float]:
    from dsa110_contimg.calibration.casarun import read_ms_info
    from dsa110_contimg.calibration.solve import total_gains
    from dsa110_contimg.simulate.core import BAND_CENTRE_HZ, BAND_WIDTH_HZ
    from dsa110_contimg.simulate.gains import evaluate_gains
    from dsa110_contimg.simulate.truth import detrend_phase_gradient

    info = read_ms_info(ms)
    index = {info.name_of(i): i for i in info.antennas_in_data}
    stations = list(truth["gains"]["stations"])
    live = [s for s in stations if s not in truth["antennas"]["dead"] and str(s) in index]
    r = live.index(int(refant))
    sol = np.conj(total_gains(tables, [index[str(s)] for s in live], info.times_mjd,
                              info.freqs_hz))
    true = evaluate_gains(truth["gains"], info.freqs_hz, info.times_mjd + MJD_JD,
                          BAND_CENTRE_HZ, BAND_WIDTH_HZ, truth["mid_jd"])
    true = true[[stations.index(s) for s in live]]
    ratio = (sol / sol[r]) / (true / true[r])
    enu = np.asarray(truth["antennas"]["enu_m"])[[stations.index(s) for s in live]]
    d = detrend_phase_gradient(ratio, enu, info.freqs_hz)
    others = np.arange(len(live)) != r
    amp = np.abs(sol[others]) / np.abs(true[others])
    scale = float(np.nanmedian(amp))
    return {**d, "amp_rel_rms": float(np.sqrt(np.nanmean((amp / scale - 1) ** 2))),
            "amp_scale_error": scale - 1.0}


def source_accuracy(pbcor: Path, pb: Path, truth: dict, rms_jy: float) -> dict[str, Any]:
    """Sources with apparent S/N >= 50 at beam gain >= 0.5: fitted pb-corrected flux against
    the truth at the band centre; 'ok' when within max(3 %, 3 sigma)."""
    from astropy.io import fits

    from dsa110_contimg.imaging.pbcor import quiet_wcs
    from dsa110_contimg.qa.image import Beam, fit_point_source

    with fits.open(pbcor) as h:
        data, header = np.squeeze(h[0].data).astype(float), h[0].header
    beam, wcs = Beam.from_header(header), quiet_wcs(header).celestial
    picked = [s for s in truth["sources"] if s["pb_mean"] >= 0.5
              and s["apparent_flux_jy"] / rms_jy >= 50]
    rows = []
    for s in picked:
        fit = fit_point_source(data, wcs, s["ra_deg"], s["dec_deg"], beam)
        if fit is None:
            continue
        want = s["flux_at_band_centre_jy"]
        sigma = rms_jy / s["pb_mean"]
        ratio = fit["flux_jy"] / want
        rows.append({"name": s["name"], "truth_jy": round(want, 4), "ratio": round(ratio, 4),
                     "ok": abs(fit["flux_jy"] - want) <= max(0.03 * want, 3 * sigma)})
    return {"n": len(rows), "ok": sum(r["ok"] for r in rows), "rows": rows}


def report_day(db: Path, products: Path, truths: list[dict]) -> dict[str, Any]:
    flags, states = _flags(db), _states(db)
    out: list[dict[str, Any]] = []
    for t in truths:
        gid = t["group_id"]
        f = flags.get(gid, {})
        cal = f.get("calibration") or {}
        row: dict[str, Any] = {"group_id": gid, "state": states.get(gid, "missing"),
                               "mode": cal.get("mode") or ("held" if f.get("held") else "-")}
        steps = cal.get("step_durations") or {}
        row["model_s"] = round(steps.get("field_model", 0.0) + steps.get("model", 0.0), 2)
        row["solve_s"] = round(sum(steps.get(k, 0.0) for k in ("K", "Gp", "BP", "G", "Ga",
                                                               "bandpass_check")), 2)
        conv = f.get("conversion") or {}
        ms = Path(conv.get("ms_path", ""))
        if not ms.is_dir():
            ms = products / gid[:10] / gid / ms.name
        if cal.get("mode") in ("solved", "field", "applied") and ms.is_dir():
            try:
                tabs, refant = applied_tables(db, cal)
                row["gains"] = gain_accuracy(tabs, refant, ms, t)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                row["gains_error"] = f"{type(exc).__name__}: {exc}"
        stem = gid.replace(":", "")
        pbcor = products / gid[:10] / gid / f"{stem}.pbcor.fits"
        rec = products / gid[:10] / gid / f"{stem}.imaging.json"
        if pbcor.exists() and rec.exists():
            rms = json.loads(rec.read_text())["result"]["rms_jy"]
            row["sources"] = source_accuracy(pbcor, pbcor.with_name(f"{stem}.pb.fits"), t, rms)
        out.append(row)
    return {"groups": out}


def print_day(rep: dict[str, Any], n_in: int) -> dict[str, Any]:
    print(f"\n{'group':20} {'state':11} {'mode':8} {'model s':>7} {'solve s':>7} "
          f"{'phase deg':>9} {'offset bm':>9} {'amp rel':>7} {'scale':>7} {'sources ok':>10}")
    scales, ok_src, n_src = [], 0, 0
    for r in rep["groups"]:
        g = r.get("gains") or {}
        s = r.get("sources") or {}
        ok_src += s.get("ok", 0)
        n_src += s.get("n", 0)
        if g:
            scales.append(abs(g["amp_scale_error"]))

        def f(key: str, fmt: str, scale: float = 1.0, g: dict = g) -> str:
            return format(g[key] * scale, fmt) if key in g else "-"

        print(f"{r['group_id']:20} {r['state']:11} {r['mode']:8} {r['model_s']:7.1f} "
              f"{r['solve_s']:7.1f} {f('phase_rms_detrended_deg', '9.2f')} "
              f"{f('gradient_offset_beams', '9.3f')} {f('amp_rel_rms', '6.2%')} "
              f"{f('amp_scale_error', '+6.2%')} "
              f"{(str(s.get('ok')) + '/' + str(s.get('n'))) if s else '-':>10}"
              + (f"  ({r['gains_error']})" if r.get("gains_error") else ""))
    calibrated = sum(1 for r in rep["groups"] if r["state"] == "done"
                     and r["mode"] in ("solved", "field", "applied"))
    g_all = [r["gains"] for r in rep["groups"] if r.get("gains")]
    summary = {
        "groups_in": n_in, "done_and_calibrated": calibrated,
        "coverage": calibrated / n_in if n_in else 0.0,
        "modes": {m: sum(1 for r in rep["groups"] if r["mode"] == m)
                  for m in (*MODES, "held", "-")},
        "phase_rms_detrended_deg_max": max((g["phase_rms_detrended_deg"] for g in g_all),
                                           default=None),
        "gradient_offset_beams_max": max((g["gradient_offset_beams"] for g in g_all),
                                         default=None),
        "amp_rel_rms_max": max((g["amp_rel_rms"] for g in g_all), default=None),
        "amp_scale_error_abs_max": max(scales, default=None),
        "amp_scale_error_abs_median": float(np.median(scales)) if scales else None,
        "sources_ok": ok_src, "sources": n_src,
        "sources_ok_fraction": ok_src / n_src if n_src else None,
    }
    print(f"\ncoverage: {calibrated}/{n_in} groups done and calibrated "
          f"({summary['coverage']:.0%}); modes {summary['modes']}")
    if g_all:
        print(f"worst group: phase {summary['phase_rms_detrended_deg_max']:.2f} deg rms "
              f"(target <= 2), gradient {summary['gradient_offset_beams_max']:.3f} beam "
              f"(<= 0.1), antenna amplitude {summary['amp_rel_rms_max']:.2%} (<= 2 %), "
              f"scale {summary['amp_scale_error_abs_max']:.2%} (<= 3 %, median "
              f"{summary['amp_scale_error_abs_median']:.2%} <= 1.5 %)")
    if n_src:
        print(f"sources S/N >= 50, beam >= 0.5: {ok_src}/{n_src} within max(3 %, 3 sigma) "
              f"({ok_src / n_src:.0%}, target >= 95 %)")
    return summary


def hold_run(group_dir: Path, truths: list[dict], work: Path) -> dict[str, Any]:
    """The calibrator group and one field group, no catalogue: the field group is held."""
    pick = [truths[0], truths[len(truths) // 2]]
    db = run(group_dir, pick, work, None)
    flags = _flags(db)
    held = flags.get(pick[1]["group_id"], {}).get("held")
    alerts = [line for line in (work / "daemon.log").read_text().splitlines()
              if "calibration.stale" in line and pick[1]["group_id"] in line]
    names_catalogue = any("no sky catalogue" in a for a in alerts)
    print(f"\nwithout a catalogue: {pick[1]['group_id']} "
          f"{'held' if held else 'NOT held'}; alert names the catalogue: {names_catalogue}")
    if held:
        print(f"  reason: {held}")
    return {"held": bool(held), "alert_names_catalogue": names_catalogue}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small", "full"))
    ap.add_argument("--groups", type=int, default=24)
    ap.add_argument("--every", type=float, default=3600.0, help="seconds between groups")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "day")
    ap.add_argument("--fresh", action="store_true", help="simulate again even if present")
    ap.add_argument("--no-hold-run", action="store_true")
    ap.add_argument("--min-mjy", type=float, default=2.0,
                    help="faintest simulated source (mJy): at full size 2 mJy means ~2000 "
                         "sources a field and ~15 min of simulation per group")
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = args.work / args.preset
    group_dir = work / "groups"
    truths = simulate_day(group_dir, args.preset, args.groups, args.every, args.seed, args.fresh,
                          args.min_mjy)
    t_run = time.perf_counter()
    db = run(group_dir, truths, work / "run", group_dir / "sky_nvss.tdat")
    daemon_s = time.perf_counter() - t_run
    from dsa110_contimg.casa_env import prepare_casa

    prepare_casa(work / "casa-state")
    rep = report_day(db, work / "run" / "products", truths)
    summary = print_day(rep, len(truths))
    summary["daemon_wall_s"] = daemon_s
    if not args.no_hold_run:
        summary["hold_run"] = hold_run(group_dir, truths, work / "hold")
    summary["wall_s"] = time.perf_counter() - t0
    print(f"\ndaemon {daemon_s:.0f} s for {len(truths)} groups; bench wall time "
          f"{summary['wall_s']:.0f} s")
    (work / "report.json").write_text(json.dumps({"summary": summary, **rep}, indent=1,
                                                 default=str))
    print(f"report: {work / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
