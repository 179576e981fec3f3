"""CLI subcommands backed by the daemon package: run, status, requeue, alert-test."""

from __future__ import annotations

import argparse
import asyncio
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

    p = sub.add_parser("requeue", help="put a failed/quarantined group back to pending")
    add_common(p)
    p.add_argument("group")

    def requeue(args: argparse.Namespace) -> int:
        from .status import requeue_group

        print(asyncio.run(requeue_group(settings_from(args).queue_db, args.group)))
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
