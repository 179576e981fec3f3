"""``contimg alert-test``: prove each configured channel delivers, before it matters.

Sends straight through each channel, one attempt each, bypassing the router (no rate
limit, no severity routing, no retries) so the operator sees the first error verbatim
(minus secrets) instead of a retry loop.

``contimg alert-failure UNIT``: the CRITICAL alert systemd's ``OnFailure=`` unit sends when the
daemon's unit failed, through the router like any other alert.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any

from .alert import Alert, Severity
from .channels import PIPELINE, Channel, DeliveryError, LogChannel, build_channels
from .options import AlertOptions
from .router import AlertRouter

# What systemd (251+) passes to an OnFailure= unit about the unit that failed.
_MONITOR_VARS = ("MONITOR_SERVICE_RESULT", "MONITOR_EXIT_CODE", "MONITOR_EXIT_STATUS",
                 "MONITOR_INVOCATION_ID")


def make_test_alert(host: str) -> Alert:
    """The alert ``alert-test`` sends."""
    return Alert(Severity.INFO, "alert-test", f"Test alert from {PIPELINE} on {host}",
                 "If you can read this, this channel delivers alerts from the pipeline.",
                 {"host": host, "sent_by": "contimg alert-test"})


async def _try(channel: Channel, alert: Alert, timeout_s: float) -> tuple[str, bool, str]:
    try:
        async with asyncio.timeout(timeout_s):
            await channel.send(alert)
    except DeliveryError as exc:
        return channel.name, False, exc.detail
    except TimeoutError:
        return channel.name, False, f"no answer within {timeout_s:g} s"
    except Exception as exc:  # report the type only: its text could carry a secret
        return channel.name, False, f"unexpected {type(exc).__name__}"
    finally:
        await channel.aclose()
    return channel.name, True, "delivered"


async def alert_test(options: AlertOptions) -> list[tuple[str, bool, str]]:
    """One test alert through the log and every configured channel: ``(channel, ok, detail)``.

    Channels run concurrently, so a hung one costs ``send_timeout_s`` at most.
    """
    host = socket.gethostname()
    alert = make_test_alert(host)
    LogChannel(Severity.DEBUG).write(alert)
    rows: list[tuple[str, bool, str]] = [("log", True, "written to the log (event 'alert')")]
    channels = build_channels(options, host)
    rows += await asyncio.gather(*(_try(c, alert, options.send_timeout_s) for c in channels))
    return rows


def make_failure_alert(unit: str, host: str, environ: Mapping[str, str]) -> Alert:
    """The alert ``alert-failure`` sends: the unit, the host and what systemd said."""
    context: dict[str, Any] = {"unit": unit, "host": host}
    for var in _MONITOR_VARS:
        if environ.get(var):
            context[var.removeprefix("MONITOR_").lower()] = environ[var]
    result = context.get("service_result", "unknown")
    return Alert(Severity.CRITICAL, "daemon.failed", f"{unit} failed on {host}",
                 f"systemd reports {unit} failed (result: {result}). Once its start limit is hit "
                 f"it is not restarted and no group is processed: see `systemctl status {unit}` "
                 f"and `journalctl -u {unit}`, then `systemctl restart {unit}`.",
                 context)


async def alert_failure(options: AlertOptions, unit: str,
                        environ: Mapping[str, str]) -> dict[str, Any]:
    """Send the failure alert of ``unit`` through the router (retries included); its stats."""
    host = socket.gethostname()
    router = AlertRouter(options, host=host)
    await router.start()
    router.emit(make_failure_alert(unit, host, environ))
    # room for every attempt and the waits between them
    budget = (options.send_timeout_s * (options.max_retries + 1)
              + options.retry_max_delay_s * options.max_retries)
    await router.stop(timeout=budget)
    return router.stats()
