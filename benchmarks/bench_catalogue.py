"""Sky catalogue at NVSS size: build time, and cone-search latency against the 50 ms budget.

Writes a synthetic NVSS (uniform on the sphere north of dec -40, 1.8 M sources by default)
in HEASARC's TDAT format to a temporary directory, builds the catalogue from it through
``build_catalogue`` (the operator's path), then times random cone searches of radius 3 deg.

Usage: python benchmarks/bench_catalogue.py [--rows N] [--cones 50] [--radius 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dsa110_contimg.catalogue import SkyCatalogue, build_catalogue  # noqa: E402

BUDGET_MS = 50.0
TDAT_HEADER = """\
<HEADER>
#
#         TABLE: heasarc_nvss (synthetic, for bench_catalogue.py)
#
table_name = nvss
table_description = "Synthetic NRAO VLA Sky Survey catalog"
#
# Table Parameters
#
field[name] = char14  [meta.id;meta.main] (index) // NVSS Source Designation
field[ra] = float8:.4f_degree [pos.eq.ra;meta.main] (key) // Right Ascension
field[dec] = float8:.4f_degree [pos.eq.dec;meta.main] (key) // Declination
field[flux_20_cm] = float4:8.1f_mJy [phot.flux.density;em.radio] (index) // Flux Density at 1.4 GHz
field[flux_20_cm_error] = float4:6.1f_mJy [stat.error] // Error in Flux Density
field[limit_major_axis] = char1 // Limit on Major Axis
field[major_axis] = float4:5.1f_arcsec [phys.angSize.smajAxis] // Fitted Major Axis
field[limit_minor_axis] = char1 // Limit on Minor Axis
field[minor_axis] = float4:5.1f_arcsec [phys.angSize.sminAxis] // Fitted Minor Axis
#
# Data Format Specification
#
line[1] = name ra dec flux_20_cm flux_20_cm_error limit_major_axis major_axis limit_minor_axis minor_axis
#
<DATA>
"""


def write_synthetic_nvss(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` sources uniform on the sphere above dec -40, NVSS-like fluxes (2.5 mJy up, power law)."""
    rng = np.random.default_rng(seed)
    ra = rng.uniform(0.0, 360.0, rows)
    dec = np.degrees(np.arcsin(rng.uniform(math.sin(math.radians(-40.0)), 1.0, rows)))
    flux = 2.5 * (1.0 - rng.uniform(0.0, 1.0, rows)) ** (-1.0 / 0.8)  # mJy, N(>S) ~ S^-0.8
    major = rng.uniform(0.0, 60.0, rows)
    resolved = rng.uniform(0.0, 1.0, rows) < 0.3
    with open(path, "w", encoding="ascii") as fh:
        fh.write(TDAT_HEADER)
        chunk = []
        for i in range(rows):
            if resolved[i]:
                size = f"|{major[i]:.1f}||{0.6 * major[i]:.1f}|"
            else:
                size = "|<|19.0|<|15.0|"
            chunk.append(f"NVSS {i:09d}|{ra[i]:.4f}|{dec[i]:.4f}|{flux[i]:.1f}|0.5{size}\n")
            if len(chunk) == 100_000:
                fh.writelines(chunk)
                chunk.clear()
        fh.writelines(chunk)
        fh.write("<END>\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_800_000)
    ap.add_argument("--cones", type=int, default=50)
    ap.add_argument("--radius", type=float, default=3.0)
    ap.add_argument("--keep", type=Path, help="write the TDAT and catalogue here and keep them")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-catalogue-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tdat, db = work / "nvss_synthetic.tdat", work / "catalogue.sqlite"
        t0 = time.perf_counter()
        write_synthetic_nvss(tdat, args.rows)
        print(f"wrote {args.rows} synthetic NVSS rows ({tdat.stat().st_size / 1e6:.0f} MB TDAT) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        report = build_catalogue(db, [tdat])
        print(f"build_catalogue: {report.rows} rows in {report.seconds:.1f} s, "
              f"{db.stat().st_size / 1e6:.0f} MB", flush=True)

        rng = np.random.default_rng(1)
        times_ms, found = [], []
        with SkyCatalogue.open(db) as cat:
            cat.cone(0.0, 0.0, args.radius)  # first touch of the file, not counted
            for _ in range(args.cones):
                ra = rng.uniform(0.0, 360.0)
                dec = math.degrees(math.asin(rng.uniform(math.sin(math.radians(-40.0)), 1.0)))
                t = time.perf_counter()
                found.append(len(cat.cone(ra, dec, args.radius)))
                times_ms.append((time.perf_counter() - t) * 1e3)
        median, worst = statistics.median(times_ms), max(times_ms)
        print(f"{args.cones} cones of radius {args.radius:g} deg: median {median:.1f} ms, "
              f"max {worst:.1f} ms, median {statistics.median(found):.0f} sources returned")
        verdict = "PASS" if median <= BUDGET_MS else "FAIL"
        print(f"{verdict}: median cone {median:.1f} ms vs budget {BUDGET_MS:.0f} ms")
        return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
