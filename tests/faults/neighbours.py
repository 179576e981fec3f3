"""Slow or dead neighbours: a Slack webhook that hangs, then answers HTTP 500, and an SMTP
server that is down (a closed port).

Run 1 has no alert channels and gives the baseline: a good group's conversion time and its
latency from drop-in to ``converted``. Run 2 (same directories) points Slack at a webhook that
never answers and email at a closed port, drops a bad group in (its alert goes to both), then
a good group; then the webhook switches to HTTP 500 and a second bad group follows. Expected:
each channel's failure degrades to an ``alert_delivery_failed`` log event naming the
channel and the cause, the alert itself is in the log, and the good group's timings stay
within a loose bound of the baseline (2x + 5 s: the machine is shared).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .core import CONVERTED_PLUS, WAIT_S, Expect, Row, Session, at, finish, request
from .servers import Webhook, closed_port

GOAL = "throughput ~baseline; alerts→log"


def _latency(s: Session, gid: str) -> float:
    t0 = time.monotonic()
    s.drop(gid)
    s.wait_states({gid: CONVERTED_PLUS}, what=f"{gid} converted")
    return time.monotonic() - t0


def _conv_seconds(s: Session, gid: str) -> float:
    runs = [r for r in s.stage_runs() if r["group_id"] == gid and r["stage"] == "conversion"
            and r["outcome"] == "ok"]
    return float(runs[-1]["duration_s"]) if runs else float("nan")


def _delivery_failed(s: Session, channel: str, pattern: str, gid: str,
                     timeout: float = WAIT_S) -> dict | None:
    """The degraded delivery of the alert about ``gid`` on ``channel``."""
    rx = re.compile(pattern, re.I)
    gid = s.actual(gid) or gid
    try:
        return s.wait_event("alert_delivery_failed", timeout,
                            lambda e: e.get("channel") == channel and rx.search(str(e.get("error")))
                            and (e.get("context") or {}).get("group_id") == gid)
    except AssertionError:
        return None


def session_neighbours(workdir: Path) -> list[Row]:
    hang = Row("Slack webhook hangs (never answers)", GOAL)
    err = Row("Slack webhook answers HTTP 500", GOAL)
    smtp = Row("SMTP server down (closed port)", GOAL)
    rows = [hang, err, smtp]
    hook = Webhook("hang")
    s = Session(workdir, "neighbours")
    try:
        g0, g1 = s.good(0), s.good(1)
        b1 = s.simulate(at(10), faults={3: "nothdf5"}, seed=31)
        b2 = s.simulate(at(20), faults={3: "nothdf5"}, seed=32)
        s.start()
        base_latency = _latency(s, g0["group_id"])
        base_conv = _conv_seconds(s, g0["group_id"])
        finish(s, rows)
        s.start(CONTIMG_SLACK_WEBHOOK_URL=hook.url("/services/T/B/hook"),
                CONTIMG_SLACK_MIN_SEVERITY="WARNING", CONTIMG_SMTP_HOST="127.0.0.1",
                CONTIMG_SMTP_PORT=str(closed_port()), CONTIMG_SMTP_TO="ops@example.org",
                CONTIMG_EMAIL_MIN_SEVERITY="WARNING", CONTIMG_ALERT_TIMEOUT_S="3",
                CONTIMG_ALERT_MAX_RETRIES="1", CONTIMG_ALERT_RETRY_BACKOFF_S="0.2")
        s.drop(b1["group_id"])
        s.wait_states({b1["group_id"]: ("quarantined",)}, what="bad group 1 quarantined")
        latency = _latency(s, g1["group_id"])  # while Slack hangs on the bad group's alert
        conv = _conv_seconds(s, g1["group_id"])
        ev_hang = _delivery_failed(s, "slack", r"no answer within", b1["group_id"])
        ev_smtp = _delivery_failed(s, "email", r"refused|Errno 111", b1["group_id"])
        hook.mode = "error"
        s.drop(b2["group_id"])
        s.wait_states({b2["group_id"]: ("quarantined",)}, what="bad group 2 quarantined")
        ev_err = _delivery_failed(s, "slack", r"HTTP 500", b2["group_id"])
        _, _, body = request(s.api_port(), "GET", "/api/alerts")
        stats = json.loads(body).get("stats", {})
        status = s.status_json()
        alive = s.alive()
        finish(s, rows)
        bound = 2 * max(base_latency, 1.0) + 5
        conv_bound = 2 * max(base_conv, 1.0) + 5
        for r, ev, channel, bad in ((hang, ev_hang, "slack", b1), (err, ev_err, "slack", b2),
                                    (smtp, ev_smtp, "email", b1)):
            r.check(ev, f"no alert_delivery_failed event for {channel} ({r.fault})")
            if ev:
                r.check(ev.get("category") == "ingest" and ev.get("message"),
                        f"the degraded alert does not carry the original alert: {ev}")
            r.check((stats.get("failed") or {}).get(channel),
                    f"/api/alerts does not count the failed {channel} delivery: {stats.get('failed')}")
            r.check(alive, "the daemon died")
            s.account(r, [Expect(bad["group_id"], ("quarantined",), alerts=("ingest",)),
                          Expect(g1["group_id"], CONVERTED_PLUS)], status=status)
        for r in (hang, smtp):
            r.check(latency <= bound, f"drop-to-converted took {latency:.1f} s with the "
                                      f"neighbour down, baseline {base_latency:.1f} s")
            r.check(conv <= conv_bound, f"conversion took {conv:.1f} s, baseline {base_conv:.1f} s")
        hang.check(any(rq["mode"] == "hang" for rq in hook.requests), "the webhook was never called")
        err.check(sum(rq["mode"] == "error" for rq in hook.requests) >= 2,
                  "HTTP 500 was not retried")
        for r in rows:
            r.goal = f"{GOAL} (conv {conv:.1f}s vs {base_conv:.1f}s)"
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        s.close()
        hook.close()
    return rows
