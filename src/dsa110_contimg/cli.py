"""The ``contimg`` command: the only place that reads the environment and configures logging."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from . import __version__
from .errors import ConfigError, ContimgError


def _settings(args: argparse.Namespace):
    """The one settings object, built once per invocation (cached on ``args``)."""
    cached = getattr(args, "_settings_obj", None)
    if cached is not None:
        return cached
    from .config import load_settings

    overrides: dict[str, str] = {}
    for attr, env in (("input_dir", "CONTIMG_INPUT_DIR"), ("output_dir", "CONTIMG_OUTPUT_DIR"),
                      ("scratch_dir", "CONTIMG_SCRATCH_DIR"), ("state_dir", "CONTIMG_STATE_DIR"),
                      ("tmpfs_path", "CONTIMG_TMPFS_PATH"), ("max_workers", "CONTIMG_MAX_WORKERS"),
                      ("executor", "CONTIMG_EXECUTOR"), ("log_level", "CONTIMG_LOG_LEVEL"),
                      ("log_format", "CONTIMG_LOG_FORMAT")):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[env] = str(value)
    if getattr(args, "no_stage_to_tmpfs", False):
        overrides["CONTIMG_STAGE_TO_TMPFS"] = "false"
    settings = load_settings(overrides=overrides)
    args._settings_obj = settings
    return settings


def _add_path_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="overrides CONTIMG_STATE_DIR")
    p.add_argument("--log-level", help="overrides CONTIMG_LOG_LEVEL")
    p.add_argument("--log-format", help="overrides CONTIMG_LOG_FORMAT (auto|json|console)")


def _parse_start(text: str | None) -> datetime | None:
    if not text:
        return None
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import FAULT_KINDS, simulate_groups

    faults: dict[int, str] = {}
    for spec in args.fault or []:
        kind, _, sb = spec.partition(":")
        if kind not in FAULT_KINDS or not sb.isdigit():
            raise ConfigError(f"--fault {spec!r}: use KIND:SUBBAND with KIND one of {', '.join(FAULT_KINDS)}")
        faults[int(sb)] = kind
    t0 = datetime.now(UTC)
    truths = simulate_groups(Path(args.outdir), preset=args.preset, groups=args.groups,
                             start=_parse_start(args.start), seed=args.seed,
                             calibrator=args.calibrator, dec_deg=args.dec, jitter_s=args.jitter,
                             write_delay_s=args.write_delay, chunks=args.chunks, faults=faults,
                             descending_channels=not args.ascending_channels, rfi=args.rfi,
                             gain_drift=args.gain_drift, sky_model=args.sky,
                             cadence_s=args.every, counts_min_jy=args.sky_min_mjy * 1e-3)
    took = (datetime.now(UTC) - t0).total_seconds()
    for t in truths:
        cals = [s["name"] for s in t["sources"] if s.get("transits_in_group")]
        print(f"{t['group_id']}: {len(t['files'])} files, {len(t['sources'])} sources"
              f"{', calibrator transit: ' + ', '.join(cals) if cals else ''}")
    print(f"wrote {len(truths)} group(s) to {args.outdir} in {took:.1f} s")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import load_settings, public_view, render_env_file

    if args.what == "env":
        print(render_env_file())
    else:
        print(json.dumps(public_view(load_settings()), indent=2, default=str))
    return 0


def cmd_casa_check(args: argparse.Namespace) -> int:
    from .casa_env import prepare_casa

    settings = _settings(args)
    cfg = prepare_casa(settings.paths.state_dir)
    import casatools

    obs = casatools.measures().observatory("OVRO_MMA")
    ok = bool(obs) and "m0" in obs
    print(f"CASA {casatools.version_string()} offline via {cfg}: measures {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _register_optional(sub: argparse._SubParsersAction) -> None:
    """Subcommands whose modules may not be importable yet (built in later issues)."""
    try:
        from .daemon import commands
    except ImportError:
        commands = None
    if commands is not None:
        commands.register(sub, _settings, _add_path_flags)
    from .catalogue import cli as catalogue_cli
    catalogue_cli.register(sub, _settings, _add_path_flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contimg", description="DSA-110 continuum-imaging daemon")
    parser.add_argument("--version", action="version", version=f"dsa110-contimg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write simulated UVH5 groups with known truth")
    p.add_argument("outdir")
    p.add_argument("--preset", choices=("tiny", "small", "full"), default="tiny")
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--start", help="ISO start time (UTC); default: the calibrator's transit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrator", default="3C286", help="catalogue calibrator to point at, or 'none'")
    p.add_argument("--dec", type=float, help="pointing declination (deg); default: calibrator dec + 0.2")
    p.add_argument("--jitter", type=float, default=0.0, help="spread subband file timestamps by up to this many seconds")
    p.add_argument("--write-delay", type=float, default=0.0, help="write each file slowly over this many seconds")
    p.add_argument("--chunks", type=int, default=8, help="chunks per file when writing slowly")
    p.add_argument("--fault", action="append", help="KIND:SB bad file in the first group, e.g. truncated:3")
    p.add_argument("--ascending-channels", action="store_true", help="channels ascend within a subband")
    p.add_argument("--rfi", action="store_true", help="add interference of known footprint (lines and a burst; recorded in the truth)")
    p.add_argument("--gain-drift", action="store_true", help="gains drift on an absolute time axis (phase random walk ~25 deg/h, slow amplitude drift): a solution carried between groups is no longer exact")
    p.add_argument("--sky", choices=("preset", "counts"), default="preset", help="'preset': a few sources per group; 'counts': a realistic sky from 1.4 GHz source counts (hundreds per field, 2 mJy to a few Jy)")
    p.add_argument("--sky-min-mjy", type=float, default=2.0, help="--sky counts: faintest source (mJy); fewer sources simulate faster")
    p.add_argument("--every", type=float, help="seconds between group starts (default: back to back), e.g. 3600 for a sparse day")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("config", help="print settings: 'env' (documented env file) or 'show'")
    p.add_argument("what", choices=("env", "show"))
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("casa-check", help="prove CASA runs offline with the project's configuration")
    _add_path_flags(p)
    p.set_defaults(func=cmd_casa_check)

    _register_optional(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command not in ("config", "simulate"):
            from .logs import configure_logging

            settings = _settings(args)
            configure_logging(settings.log.level, settings.log.format)
        elif args.command == "simulate":
            from .logs import configure_logging

            configure_logging("INFO", "auto")
        result = args.func(args)
        return int(result or 0)
    except ConfigError as exc:
        print(f"contimg: configuration error: {exc}", file=sys.stderr)
        return 2
    except ContimgError as exc:
        print(f"contimg: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

