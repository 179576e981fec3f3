"""``contimg alert-test``: prove each configured channel delivers, before it matters.

Sends straight through each channel, one attempt each, bypassing the router (no rate
limit, no severity routing, no retries) so the operator sees the first error verbatim
(minus secrets) instead of a retry loop.
"""

from __future__ import annotations

import asyncio
import socket

from .alert import Alert, Severity
from .channels import PIPELINE, Channel, DeliveryError, LogChannel, build_channels
from .options import AlertOptions


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
