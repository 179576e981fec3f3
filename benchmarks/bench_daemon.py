"""The whole chain through the real daemon: per group and stage wall time, real-time factor.

    python benchmarks/bench_daemon.py [--preset full] [--groups 3] [--arrival burst|realtime]

Simulates N consecutive groups (the first with 3C286 transiting) once into --group-dir,
then runs the daemon on them in a fresh state/output directory: ``burst`` drops all groups in
at the start (back-to-back, ``contimg run --once``), ``realtime`` drops group k in at k x the
group length as the correlator would. Stage durations come from the queue's own stage history.
RTF = wall time / seconds of data; the sustained RTF is (last stage end - first stage start) /
(N x group length) for burst arrival. ``bench_e2e.py`` adds the plain-chain reference,
accuracy against the truth and the issue's verdicts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import ROOT, group_seconds, queue_records, run_daemon, simulate


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
    group_s = group_seconds(truths[0])  # seconds of data per group
    (ROOT / ".bench").mkdir(exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="contimg-bench-", dir=ROOT / ".bench"))
    run = run_daemon(group_dir, truths, work, args.arrival, group_s, args.max_workers)
    rows, states, _ = queue_records(run.dirs["state"] / "contimg.sqlite")

    print(f"\n{args.groups} x {args.preset} groups, arrival={args.arrival}, daemon exit "
          f"{run.exit_code}, wall {run.wall_s:.0f} s")
    print(f"{'group':<21} {'state':<11} {'conversion':>10} {'calibration':>11} {'imaging':>8} "
          f"{'sum':>7} {'RTF':>6}")
    first = min((r["started"] for r in rows), default=run.t_start)
    last = max((r["finished"] or 0 for r in rows), default=run.t_start)
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
    peaks = [r.get("peak_rss_mb") for r in rows if r.get("peak_rss_mb") is not None]
    if peaks:
        print(f"peak RSS of any stage worker: {max(peaks) / 1024:.2f} GiB")
    print(f"products: {run.dirs['products']}")
    return 0 if all(states.get(t["group_id"]) == "done" for t in truths) else 1


if __name__ == "__main__":
    sys.exit(main())
