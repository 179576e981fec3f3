"""``contimg catalog``: build, inspect and query the sky catalogue; calibrator coverage by declination."""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ContimgError

CATALOGUE_FILENAME = "catalogue.sqlite"
BEAM_FREQ_HZ = 1.405e9


def _db_path(args: argparse.Namespace, settings_from: Callable[[argparse.Namespace], Any]) -> Path:
    explicit = getattr(args, "catalogue_db", None)
    if explicit:
        return Path(explicit)
    return Path(settings_from(args).paths.state_dir) / CATALOGUE_FILENAME


def _airy_beam(freq_hz: float = BEAM_FREQ_HZ) -> Callable[[float], float]:
    """Power of DSA-110's primary beam (Airy, 4.65 m dish) at an offset in degrees."""
    from ..instrument import PrimaryBeam

    beam = PrimaryBeam.airy()
    return lambda offset_deg: float(beam.power(math.radians(offset_deg), freq_hz))


def register(sub: argparse._SubParsersAction, settings_from: Callable[[argparse.Namespace], Any],
             add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    top = sub.add_parser("catalog", help="build and query the sky catalogue (<state_dir>/catalogue.sqlite)")
    csub = top.add_subparsers(dest="catalog_command", required=True)

    p = csub.add_parser("build", help="parse catalogue files (VLA list, NVSS TDAT, CSV) into the catalogue")
    add_common(p)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--no-bundled", action="store_true", help="leave out the bundled calibrator lists")

    def build(args: argparse.Namespace) -> int:
        from .store import build_catalogue

        report = build_catalogue(_db_path(args, settings_from), args.files, not args.no_bundled)
        for rec in report.inputs:
            print(f"{rec.path}: {rec.rows} rows ({rec.format})")
        print(f"wrote {report.rows} sources from {len(report.inputs)} inputs to {report.db_path} "
              f"in {report.seconds:.1f} s")
        return 0

    p.set_defaults(func=build)

    p = csub.add_parser("info", help="rows per origin and the inputs of the built catalogue")
    add_common(p)
    p.add_argument("--catalogue-db", help="catalogue file (default <state_dir>/catalogue.sqlite)")

    def info(args: argparse.Namespace) -> int:
        from .store import SkyCatalogue

        with SkyCatalogue.open(_db_path(args, settings_from)) as cat:
            s = cat.summary()
        print(f"{s.path}: {s.rows} sources, built {s.built_at}")
        for origin, n in s.rows_by_origin.items():
            print(f"  {origin:<9} {n:>9}")
        for rec in s.inputs:
            print(f"  input {rec.path} ({rec.format}{', bundled' if rec.bundled else ''}): {rec.rows} rows, "
                  f"{rec.size} bytes, sha256 {rec.sha256[:12]}")
        return 0

    p.set_defaults(func=info)

    p = csub.add_parser("cone", help="sources within RADIUS deg of (RA, DEC), brightest first")
    add_common(p)
    p.add_argument("ra", type=float, help="deg")
    p.add_argument("dec", type=float, help="deg")
    p.add_argument("radius", type=float, help="deg")
    p.add_argument("--min-flux", type=float, default=0.0, help="Jy")
    p.add_argument("--catalogue-db", help="catalogue file (default <state_dir>/catalogue.sqlite)")

    def cone(args: argparse.Namespace) -> int:
        from .sources import angular_separation_deg
        from .store import SkyCatalogue

        with SkyCatalogue.open(_db_path(args, settings_from)) as cat:
            found = cat.cone(args.ra, args.dec, args.radius, args.min_flux)
        print(f"{'name':<24} {'ra_deg':>10} {'dec_deg':>10} {'flux_jy':>9} {'sep_deg':>8} origin codes")
        for s in found:
            sep = angular_separation_deg(args.ra, args.dec, s.ra_deg, s.dec_deg)
            print(f"{s.name:<24} {s.ra_deg:10.5f} {s.dec_deg:10.5f} {s.flux_jy:9.4f} {sep:8.4f} "
                  f"{s.origin:<6} {s.vla_lband_codes or ''}")
        print(f"{len(found)} sources")
        return 0

    p.set_defaults(func=cone)

    p = csub.add_parser("coverage", help="calibrators per pointing declination and the share of the day they cover")
    add_common(p)
    p.add_argument("--dec-min", type=float, default=-10.0)
    p.add_argument("--dec-max", type=float, default=80.0)
    p.add_argument("--step", type=float, default=1.0)
    p.add_argument("--radius", type=float, default=1.5, help="deg from the pointing declination")
    p.add_argument("--min-flux", type=float, default=1.0, help="apparent Jy at transit (Airy beam, 1.405 GHz)")
    p.add_argument("--window-h", type=float, default=1.0, help="a solution is valid +- this many hours of transit")
    p.add_argument("--config", default="C", choices=tuple("ABCD"), help="VLA configuration whose L-band codes decide 'unresolved'")
    p.add_argument("--isolation-radius", type=float, default=0.0, help="deg; 0 turns the isolation test off")
    p.add_argument("--isolation-ratio", type=float, default=1.0)
    p.add_argument("--catalogue-db", help="catalogue file (default <state_dir>/catalogue.sqlite; the bundled lists when absent)")

    def coverage(args: argparse.Namespace) -> int:
        from .calibrators import bundled_sources, coverage_by_declination
        from .store import SkyCatalogue

        if args.step <= 0 or args.dec_max < args.dec_min:
            raise ContimgError("catalog coverage: need --step > 0 and --dec-max >= --dec-min")
        n = int(math.floor((args.dec_max - args.dec_min) / args.step + 1e-9)) + 1
        decs = [round(args.dec_min + k * args.step, 6) for k in range(n)]
        path = _db_path(args, settings_from)
        reach = args.radius + max(args.isolation_radius, 0.0)
        if path.exists() or args.catalogue_db:
            with SkyCatalogue.open(path) as cat:
                floor_jy = 0.5 * args.min_flux * min(1.0, args.isolation_ratio)
                sources = cat.dec_band(decs[0] - reach, decs[-1] + reach, floor_jy)
            origin = f"catalogue {path}"
        else:
            sources = list(bundled_sources())
            origin = f"bundled calibrator lists (no catalogue at {path})"
        rows = coverage_by_declination(sources, decs, args.radius, args.min_flux, args.window_h,
                                       _airy_beam(), args.isolation_radius, args.isolation_ratio,
                                       args.config)
        print(f"calibrators from {origin}: within {args.radius:g} deg, >= {args.min_flux:g} Jy apparent, "
              f"unresolved in VLA config {args.config}, valid +-{args.window_h:g} h of transit")
        print(f"{'dec':>6} {'n':>4} {'day %':>6}  calibrators")
        for r in rows:
            names = ", ".join(r.names[:6]) + (f", ... (+{len(r.names) - 6})" if len(r.names) > 6 else "")
            print(f"{r.dec_deg:+6.1f} {r.n_calibrators:4d} {100 * r.fraction:6.1f}  {names}")
        empty = [r.dec_deg for r in rows if r.n_calibrators == 0]
        fractions = [100 * r.fraction for r in rows]
        listed = ", ".join(f"{d:+g}" for d in empty[:10]) + (", ..." if len(empty) > 10 else "")
        print(f"{len(empty)} of {len(rows)} declinations have no calibrator"
              f"{' (' + listed + ')' if empty else ''}; day covered: mean "
              f"{statistics.fmean(fractions):.1f} %, median {statistics.median(fractions):.1f} %")
        return 0

    p.set_defaults(func=coverage)
