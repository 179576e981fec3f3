"""Same products from two versions of the code? Run the daemon on fixed simulated groups, then
compare what it wrote: FITS pixel data, calibration-table solutions and qa.json metrics.

The pipeline is deterministic, so a change that is meant to leave behaviour alone (a refactor)
must reproduce the products to 1e-6 relative. Timings differ run to run and are not compared.

    # products of the code on PYTHONPATH (default: this checkout) into OUT
    python scripts/compare_products.py run OUT [--preset tiny|small]
    # compare two such runs; exit 1 on any difference
    python scripts/compare_products.py compare OUT_A OUT_B

``run`` simulates (seed 3) two consecutive groups with a calibrator transit and, for ``tiny``,
one group three hours later with none (field calibration against the simulated survey
catalogue), then runs ``contimg run --once`` over them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

RTOL = 1e-6
ATOL = 1e-6  # for metrics near zero (e.g. an offset in degrees that is 0 to rounding)
# metrics that measure time or the machine, not the data
_UNCOMPARED = re.compile(r"(duration|seconds|elapsed|wall|cpu|rss|_s$|_ms$|created|updated|"
                         r"path|dir$|host|pid)", re.IGNORECASE)


def _cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> None:
    subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", *args], check=True, env=env, **kw)


def run(out: Path, preset: str) -> None:
    from _common import daemon_dirs, daemon_env, drop_group

    out = out.resolve()
    groups = out / "groups"
    if not any(groups.glob("*_truth.json")):
        _cli("simulate", str(groups / "cal"), "--preset", preset, "--groups", "2", "--seed", "3",
             "--gain-drift")
        if preset == "tiny":
            first = json.loads(sorted((groups / "cal").glob("*_truth.json"))[0].read_text())
            start = (datetime.fromisoformat(first["group_id"]).replace(tzinfo=UTC)
                     + timedelta(hours=3))
            _cli("simulate", str(groups / "field"), "--preset", preset, "--groups", "1",
                 "--seed", "3", "--gain-drift", "--calibrator", "none",
                 "--start", start.isoformat(), "--dec", str(first["pointing"]["dec_deg"]))
    dirs = daemon_dirs(out / "run")
    env = daemon_env(dirs, 2)
    env.pop("CONTIMG_CAL_FIELD_CATALOGUE", None)
    survey = sorted(groups.glob("*/sky_nvss.tdat"))
    if survey:
        _cli("catalog", "build", "--no-bundled", str(survey[-1]), env=env,
             stdout=subprocess.DEVNULL)
    for sub in sorted(p for p in groups.iterdir() if p.is_dir()):
        for t in sorted(sub.glob("*_truth.json")):
            drop_group(sub, dirs["incoming"], json.loads(t.read_text()))
    with open(out / "daemon.log", "w") as log:
        subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "run", "--once"], env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=False)
    print(f"products in {dirs['products']}")


# ------------------------------------------------------------------------------ comparing
def _products(out: Path) -> Path:
    return out / "run" / "products"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the larger array's peak (NaN where both are NaN: equal)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return math.inf
    both_nan = np.isnan(a) & np.isnan(b) if np.iscomplexobj(a) or a.dtype.kind == "f" else False
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    scale = max(float(np.nanmax(np.abs(a))) if a.size else 0.0, 1e-30)
    return float(np.nanmax(diff) / scale) if diff.size else 0.0


def _fits(path: Path) -> np.ndarray:
    from astropy.io import fits

    with fits.open(path) as h:
        return np.asarray(h[0].data, dtype=np.float64)


def _caltable(path: Path) -> dict[str, np.ndarray]:
    from casacore.tables import table

    with table(str(path), ack=False) as t:
        cols = [c for c in ("CPARAM", "FPARAM", "FLAG", "SNR") if c in t.colnames()]
        return {c: np.asarray(t.getcol(c)) for c in cols}


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def compare(a: Path, b: Path) -> int:
    pa, pb = _products(a), _products(b)
    files_a = {p.relative_to(pa) for p in pa.rglob("*")}
    files_b = {p.relative_to(pb) for p in pb.rglob("*")}
    problems: list[str] = []
    worst: dict[str, float] = {"fits": 0.0, "caltable": 0.0, "qa": 0.0}
    counts = {"fits": 0, "caltable": 0, "qa": 0}
    fits_a = {f for f in files_a if f.suffix == ".fits"}
    tables_a = {f.parent for f in files_a if f.name == "table.dat" and "caltables" in f.parts}
    qa_a = {f for f in files_a if f.name == "qa.json"}
    for kind, names in (("fits", fits_a), ("caltable", tables_a), ("qa", qa_a)):
        for name in sorted(names):
            if name not in files_b:
                problems.append(f"{name}: only in {a}")
                continue
            counts[kind] += 1
            if kind == "fits":
                r = _rel(_fits(pa / name), _fits(pb / name))
            elif kind == "caltable":
                ta, tb = _caltable(pa / name), _caltable(pb / name)
                r = max((_rel(ta[c].astype(float) if c == "FLAG" else ta[c],
                              tb.get(c, np.array([])).astype(float) if c == "FLAG"
                              else tb.get(c, np.array([]))) for c in ta), default=0.0)
            else:
                la = _leaves(json.loads((pa / name).read_text()))
                lb = _leaves(json.loads((pb / name).read_text()))
                r = 0.0
                for key, va in la.items():
                    if _UNCOMPARED.search(key.rsplit(".", 1)[-1]):
                        continue
                    vb = lb.get(key)
                    if isinstance(va, int | float) and not isinstance(va, bool):
                        if not isinstance(vb, int | float):
                            problems.append(f"{name}: {key} = {va!r} vs {vb!r}")
                            continue
                        d = abs(va - vb) / max(abs(va), abs(vb), 1e-30)
                        if abs(va - vb) <= ATOL:
                            d = 0.0
                        if d > RTOL:
                            problems.append(f"{name}: {key} = {va!r} vs {vb!r}")
                        r = max(r, d)
                    elif isinstance(va, str) and isinstance(vb, str):
                        if va.replace(str(a.resolve()), "<run>") != vb.replace(str(b.resolve()),
                                                                               "<run>"):
                            problems.append(f"{name}: {key} = {va!r} vs {vb!r}")
                    elif isinstance(va, list) and isinstance(vb, list):
                        try:
                            xa, xb = (np.asarray(v, dtype=float) for v in (va, vb))
                        except (TypeError, ValueError):
                            if va != vb:
                                problems.append(f"{name}: {key} = {va!r} vs {vb!r}")
                            continue
                        d = _rel(xa, xb) if xa.shape == xb.shape else math.inf
                        if d > RTOL and np.nanmax(np.abs(xa - xb), initial=0.0) > ATOL:
                            problems.append(f"{name}: {key} = {va!r} vs {vb!r}")
                    elif va != vb:
                        problems.append(f"{name}: {key} = {va!r} vs {vb!r}")
            worst[kind] = max(worst[kind], r)
            if r > RTOL and kind != "qa":
                problems.append(f"{name}: differs by {r:.3g} relative")
    for name in sorted(files_b - files_a):
        if name.suffix == ".fits" or name.name in ("qa.json", "table.dat"):
            problems.append(f"{name}: only in {b}")
    for kind in counts:
        print(f"{kind:9s} {counts[kind]:3d} compared, largest relative difference "
              f"{worst[kind]:.3g}")
    for p in problems:
        print("DIFFERS:", p)
    print("same products" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems or not counts["fits"] else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        os.environ.setdefault("CONTIMG_LOG_FORMAT", "json")
        run(args.out, args.preset)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
