"""`make bench`: every benchmark in one run, on this machine, printing ratios measured here.

Set BENCH_PRESET=small for a quick pass; the default is the real DSA-110 size (full), which
takes the better part of an hour on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(name: str, *args: str) -> int:
    print(f"\n===== {name} {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, str(HERE / name), *args])
    print(f"===== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


def main() -> int:
    preset = os.environ.get("BENCH_PRESET", "full")
    codes = [
        run("bench_queue.py"),
        run("bench_conversion.py", "--preset", preset),
        run("bench_calibration.py", "--preset", preset),
        run("bench_imaging.py", "--preset", preset),
        run("bench_daemon.py", "--preset", preset, "--groups", "3"),
    ]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
