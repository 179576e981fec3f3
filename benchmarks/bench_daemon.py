"""The whole chain through the real daemon: per group and stage wall time, real-time factor.

    python benchmarks/bench_daemon.py [--preset full] [--groups 3] [--arrival burst|realtime]

Simulates N consecutive groups (the first with 3C286 transiting) once into --group-dir,
then runs ``contimg run --once`` on them in a fresh state/output directory: ``burst`` drops
all groups in at the start (back-to-back), ``realtime`` moves group k in at k x 309 s as the
correlator would. Stage durations come from the queue's own stage history. RTF = wall time /
309.24 s of data; the sustained RTF is (last group done - first group started) / (N x 309.24 s)
for burst arrival.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUP_S = 24 * 12.884902
ROOT = Path(__file__).resolve().parent.parent


def simulate(group_dir: Path, preset: str, groups: int) -> list[dict]:
    truths = sorted(group_dir.glob("*_truth.json"))
    if len(truths) < groups:
        shutil.rmtree(group_dir, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "simulate", str(group_dir),
                        "--preset", preset, "--groups", str(groups)], check=True)
        print(f"simulated {groups} {preset} group(s) in {time.perf_counter() - t0:.0f} s")
        truths = sorted(group_dir.glob("*_truth.json"))
    return [json.loads(p.read_text()) for p in truths[:groups]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="full", choices=("tiny", "small", "full"))
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--group-dir", type=Path, default=ROOT / ".bench" / "groups")
    ap.add_argument("--workdir", type=Path, help="daemon dirs (default: a temp dir on disk)")
    ap.add_argument("--arrival", choices=("burst", "realtime"), default="burst")
    ap.add_argument("--max-workers", type=int, default=2)
    args = ap.parse_args()

    group_dir = args.group_dir / f"{args.preset}-{args.groups}"
    truths = simulate(group_dir, args.preset, args.groups)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="contimg-bench-", dir=ROOT / ".bench"))
    dirs = {k: work / k for k in ("incoming", "products", "state", "scratch")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    env = {**os.environ, "CONTIMG_INPUT_DIR": str(dirs["incoming"]),
           "CONTIMG_OUTPUT_DIR": str(dirs["products"]), "CONTIMG_STATE_DIR": str(dirs["state"]),
           "CONTIMG_SCRATCH_DIR": str(dirs["scratch"]), "CONTIMG_FILE_STABLE_S": "1",
           "CONTIMG_API_ENABLED": "false", "CONTIMG_CAL_HOLD_RETRY_S": "5",
           "CONTIMG_MAX_WORKERS": str(args.max_workers), "CONTIMG_LOG_FORMAT": "json",
           "CONTIMG_DISK_WARN_GB": "1", "CONTIMG_DISK_CRIT_GB": "0.5"}

    def drop(t: dict) -> None:
        for name in t["files"]:  # same filesystem: a rename, as a finished correlator file appears
            os.link(group_dir / name, dirs["incoming"] / name)

    if args.arrival == "burst":
        for t in truths:
            drop(t)
    t_start = time.time()
    log = open(work / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dsa110_contimg.cli", "run",
                             *(["--once"] if args.arrival == "burst" else [])],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    if args.arrival == "realtime":
        for k, t in enumerate(truths):
            time.sleep(max(0.0, t_start + k * GROUP_S - time.time()))
            drop(t)
        db = dirs["state"] / "contimg.sqlite"
        while True:
            time.sleep(2)
            with sqlite3.connect(db) as con:
                n = con.execute("SELECT count(*) FROM groups WHERE state IN "
                                "('done','failed','quarantined')").fetchone()[0]
            if n >= len(truths):
                break
        proc.terminate()
    rc = proc.wait()
    wall = time.time() - t_start
    log.close()
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

    con = sqlite3.connect(dirs["state"] / "contimg.sqlite")
    con.row_factory = sqlite3.Row
    rows = con.execute("SELECT group_id, stage, started, finished, duration_s, outcome "
                       "FROM stage_runs ORDER BY id").fetchall()
    states = dict(con.execute("SELECT id, state FROM groups").fetchall())
    print(f"\n{args.groups} x {args.preset} groups, arrival={args.arrival}, daemon exit {rc}, "
          f"wall {wall:.0f} s")
    print(f"{'group':<21} {'state':<11} {'conversion':>10} {'calibration':>11} {'imaging':>8} "
          f"{'sum':>7} {'RTF':>6}")
    group_s = len(truths[0]["times_jd"]) * truths[0]["integration_s"]  # seconds of data per group
    first = min((r["started"] for r in rows), default=t_start)
    last = max((r["finished"] or 0 for r in rows), default=t_start)
    for t in truths:
        gid = t["group_id"]
        d = {r["stage"]: r["duration_s"] for r in rows if r["group_id"] == gid and r["outcome"] == "ok"}
        total = sum(d.values())
        print(f"{gid:<21} {states.get(gid, '?'):<11} {d.get('conversion', 0):>10.1f} "
              f"{d.get('calibration', 0):>11.1f} {d.get('imaging', 0):>8.1f} {total:>7.1f} "
              f"{total / group_s:>6.2f}")
    span = last - first
    print(f"sustained RTF (first stage start -> last stage end) / data: "
          f"{span:.0f} s / {len(truths) * group_s:.0f} s = {span / (len(truths) * group_s):.2f}")
    print(f"peak RSS of any worker: {peak_kb / 1e6:.2f} GB")
    print(f"products: {dirs['products']}")
    return 0 if all(states.get(t["group_id"]) == "done" for t in truths) else 1


if __name__ == "__main__":
    sys.exit(main())
