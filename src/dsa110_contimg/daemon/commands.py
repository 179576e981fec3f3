"""CLI subcommands backed by the daemon package: run, status, requeue, alert-test,
alert-failure, calibration."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any


def register(sub: argparse._SubParsersAction, settings_from: Callable[[argparse.Namespace], Any],
             add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("run", help="run the daemon (systemd service)")
    add_common(p)
    p.add_argument("--once", action="store_true", help="process what is there, exit when idle")
    p.add_argument("--input-dir")
    p.add_argument("--output-dir")
    p.add_argument("--scratch-dir")
    p.add_argument("--tmpfs-path")
    p.add_argument("--no-stage-to-tmpfs", action="store_true")
    p.add_argument("--max-workers", type=int)
    p.add_argument("--executor", help="'local' or dask://host:port")

    def run(args: argparse.Namespace) -> int:
        from .service import run_daemon

        return asyncio.run(run_daemon(settings_from(args), once=args.once))

    p.set_defaults(func=run)

    p = sub.add_parser("status", help="groups by state")
    add_common(p)
    p.add_argument("--json", action="store_true")

    def status(args: argparse.Namespace) -> int:
        from .status import status_report

        print(asyncio.run(status_report(settings_from(args).queue_db, args.json)))
        return 0

    p.set_defaults(func=status)

    p = sub.add_parser("requeue", help="put a failed/quarantined group back to pending (or, stopped at ingest "
                       "with files missing, to collecting: ingest looks for them again)")
    add_common(p)
    p.add_argument("group")

    def requeue(args: argparse.Namespace) -> int:
        from .status import requeue_group

        s = settings_from(args)
        print(asyncio.run(requeue_group(s.queue_db, args.group, s.ingest.expected_subbands)))
        return 0

    p.set_defaults(func=requeue)

    p = sub.add_parser("alert-test", help="send one test alert through every configured channel")
    add_common(p)

    def alert_test(args: argparse.Namespace) -> int:
        from ..alerting.cli import alert_test as run_test

        results = asyncio.run(run_test(settings_from(args).alerts))
        for channel, ok, detail in results:
            print(f"{channel:<8} {'OK' if ok else 'FAILED':<7} {detail}")
        return 0 if all(ok for _, ok, _ in results) else 1

    p.set_defaults(func=alert_test)

    p = sub.add_parser("alert-failure", help="send a CRITICAL alert that a systemd unit failed "
                       "(run by contimg-failure@.service through OnFailure=)")
    add_common(p)
    p.add_argument("unit", help="the unit that failed, e.g. contimg.service")

    def alert_failure(args: argparse.Namespace) -> int:
        from ..alerting.cli import alert_failure as send_failure

        stats = asyncio.run(send_failure(settings_from(args).alerts, args.unit, os.environ))
        lost = {ch: n for ch, n in stats["failed"].items() if n}
        lost.update({ch: n for ch, n in stats["dropped"].items() if n})
        for channel in stats["channels"]:
            state = "FAILED" if channel in lost else "OK"
            print(f"{channel:<8} {state}")
        return 1 if lost else 0

    p.set_defaults(func=alert_failure)

    p = sub.add_parser("calibration", help="calibration outlook: sets in force, next calibrator "
                       "transits, and when groups would go without calibration")
    add_common(p)
    p.add_argument("--json", action="store_true", help="print the outlook as JSON")
    p.add_argument("--hours", type=float, default=24.0, help="look this far ahead (default 24)")
    p.add_argument("--dec", type=float, help="pointing declination (deg); default: that of the "
                   "newest converted group in the queue")

    def calibration(args: argparse.Namespace) -> int:
        if not args.hours > 0:
            print("contimg calibration: --hours must be positive", file=sys.stderr)
            return 2
        if args.json:
            _logs_to_stderr()  # stdout carries the JSON only
        outlook = asyncio.run(calibration_outlook(settings_from(args), args.dec, args.hours))
        if outlook is None:
            print("contimg calibration: no converted group in the queue to take the pointing "
                  "declination from; give it with --dec DEG", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(outlook.as_dict(), indent=1))
        else:
            from ..calibration.outlook import format_outlook

            print(format_outlook(outlook))
        return 0

    p.set_defaults(func=calibration)


def _logs_to_stderr() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


async def calibration_outlook(settings: Any, dec_deg: float | None, hours: float) -> Any:
    """The outlook at ``dec_deg`` (default: the newest converted group's pointing), read from
    the state directory without changing it; None when no pointing is known."""
    from ..calibration.outlook import gather_outlook, newest_pointing_dec
    from ..config import QueueOptions
    from ..instrument import PrimaryBeam
    from .calregistry import CalRegistry
    from .queue import GroupQueue

    db = settings.queue_db
    source = "--dec"
    if dec_deg is None:
        if not db.is_file():  # opening would create an empty queue
            return None
        async with await GroupQueue.open(db, QueueOptions()) as queue:
            found = newest_pointing_dec(await queue.list_groups(limit=200))
        if found is None:
            return None
        dec_deg, gid = found
        source = f"group {gid}"
    registry = await CalRegistry.open(db, settings.calibration) if db.is_file() else None
    try:
        catalogue = settings.catalogue_db if settings.catalogue_db.is_file() else None
        return await gather_outlook(registry, catalogue, float(dec_deg), settings.calibration,
                                    PrimaryBeam.from_options(settings.beam), hours=hours,
                                    pointing_source=source)
    finally:
        if registry is not None:
            await registry.close()
