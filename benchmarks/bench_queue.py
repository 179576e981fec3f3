"""Ingest latency and queue throughput, measured in this run.

    python benchmarks/bench_queue.py [--groups 3] [--subbands 16] [--stable 1.0] [--cycles 400]

1. Event-to-queued latency: another process writes groups of subband files in chunks; for each
   group we measure from the moment it became complete (its last write + ``stable_seconds``)
   to the moment ingest queued it. Goal: <= 1 s.
2. Queue transitions per second: groups walked through every stage (claim/complete) on a
   fresh database file, each transition its own durable transaction. Goal: >= 1000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dsa110_contimg.config import IngestOptions, QueueOptions
from dsa110_contimg.daemon.queue import GroupQueue
from dsa110_contimg.daemon.watcher import run_ingest
from dsa110_contimg.logs import configure_logging

_WRITER = r"""
import json, sys, time
template, outdir, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = open(template, "rb").read()
done = {}
for name in names:
    with open(f"{outdir}/{name}", "wb") as f:
        for i in range(0, len(data), 8192):
            f.write(data[i:i + 8192])
            f.flush()
            time.sleep(0.01)
    done[name] = time.time()
print(json.dumps(done))
"""


def write_template(path: Path) -> None:
    """A minimal valid UVH5 (3 antennas, 1 time, 2 channels) made with pyuvdata."""
    import astropy.units as u
    from astropy.coordinates import EarthLocation
    from pyuvdata import Telescope, UVData

    loc = EarthLocation.from_geodetic(lon=-118.2825 * u.deg, lat=37.2339 * u.deg,
                                      height=1222 * u.m)
    tel = Telescope.new(name="OVRO_DSA", location=loc, instrument="DSA-110", mount_type="fixed",
                        antenna_positions={1: np.zeros(3), 2: np.array([10.0, 0, 0]),
                                           3: np.array([0, 20.0, 0])},
                        x_orientation="east", feeds=["x", "y"])
    uv = UVData.new(freq_array=np.array([1.4e9, 1.4e9 + 244140.625]),
                    polarization_array=["xx", "yy"], times=np.array([2460676.5]), telescope=tel,
                    antpairs=[(1, 2), (1, 3), (2, 3)], integration_time=12.884902,
                    channel_width=244140.625, empty=True)
    uv.write_uvh5(str(path), clobber=True)


async def ingest_latency(tmp: Path, groups: int, subbands: int, stable: float) -> list[float]:
    template = tmp / "template.hdf5"
    write_template(template)
    incoming = tmp / "incoming"
    incoming.mkdir()
    options = IngestOptions(expected_subbands=subbands, stable_seconds=stable)
    names = [f"2025-06-01T{10 + g:02d}:00:{sb % 5:02d}_sb{sb:02d}.hdf5"
             for g in range(groups) for sb in range(subbands)]
    ready: dict[str, float] = {}
    async with await GroupQueue.open(tmp / "ingest.sqlite", QueueOptions()) as queue:
        stop = asyncio.Event()
        task = asyncio.create_task(run_ingest(
            incoming, queue, options, stop, on_ready=lambda g: ready.setdefault(g, time.time())))
        await asyncio.sleep(0.3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, str(template), str(incoming), json.dumps(names),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        finished = json.loads(out)
        deadline = time.monotonic() + stable + 30
        while len(ready) < groups and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await task
    latencies = []
    for group_id, t_ready in sorted(ready.items()):
        complete_at = max(t for n, t in finished.items() if n.startswith(group_id[:13])) + stable
        latencies.append(t_ready - complete_at)
    if len(ready) < groups:
        raise SystemExit(f"only {len(ready)} of {groups} groups were queued")
    return latencies


async def transitions_per_second(tmp: Path, cycles: int) -> tuple[float, int, float]:
    async with await GroupQueue.open(tmp / "throughput.sqlite", QueueOptions()) as queue:
        ids = [f"2025-01-{1 + i // 288:02d}T{i % 288 * 5 // 60:02d}:{i % 288 * 5 % 60:02d}:00"
               for i in range(cycles)]
        for gid in ids:
            await queue.create_group(gid)
            for sb in range(16):
                await queue.record_file(gid, sb, f"/data/{gid}_sb{sb:02d}.hdf5", 1, 1.0)
        n = 0
        t0 = time.perf_counter()
        for gid in ids:
            await queue.mark_ready(gid)
            n += 1
        while (claim := await queue.claim("bench")) is not None:
            await queue.complete(claim.group_id, "bench", 0.1, {"rms_jy": 1e-3})
            n += 2
        elapsed = time.perf_counter() - t0
        assert (await queue.counts())["done"] == cycles
    return n / elapsed, n, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--subbands", type=int, default=16)
    parser.add_argument("--stable", type=float, default=1.0, help="stable_seconds")
    parser.add_argument("--cycles", type=int, default=400, help="groups walked to done")
    args = parser.parse_args()
    configure_logging("WARNING")  # this script is an entrypoint; keep per-group logs quiet
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as d:
        tmp = Path(d)
        lat = asyncio.run(ingest_latency(tmp, args.groups, args.subbands, args.stable))
        rate, n, elapsed = asyncio.run(transitions_per_second(tmp, args.cycles))
    print(f"event-to-queued latency beyond stable_seconds={args.stable:g} s "
          f"({args.groups} groups x {args.subbands} subbands): "
          f"median {statistics.median(lat):.3f} s, max {max(lat):.3f} s "
          f"[goal <= 1 s: {'met' if max(lat) <= 1.0 else 'NOT met'}]")
    print(f"queue transitions: {n} in {elapsed:.2f} s = {rate:.0f}/s "
          f"[goal >= 1000/s: {'met' if rate >= 1000 else 'NOT met'}]")


if __name__ == "__main__":
    main()
