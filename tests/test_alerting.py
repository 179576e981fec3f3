"""Alert router and channels against real servers on 127.0.0.1.

A small asyncio HTTP server stands in for Slack (it can answer 200/429/500/404 or accept and
never answer); aiosmtpd stands in for the mail server, with login, STARTTLS and implicit TLS
on a self-signed certificate made by the ``openssl`` command (skipped if it is missing).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from asyncio.subprocess import PIPE, STDOUT
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from structlog.testing import capture_logs

from dsa110_contimg.alerting.alert import Alert, Severity
from dsa110_contimg.alerting.channels import parse_retry_after
from dsa110_contimg.alerting.cli import alert_test
from dsa110_contimg.alerting.options import AlertOptions
from dsa110_contimg.alerting.ratelimit import RateLimiter
from dsa110_contimg.alerting.router import AlertRouter
from dsa110_contimg.configbase import Secret

pytestmark = pytest.mark.timeout(60)

TOKEN = "XyZzY-webhook-token-0123456789"
PASSWORD = "s3cret-smtp-pa55word"


# ---------------------------------------------------------------------------- servers
class SlackServer:
    """A minimal HTTP/1.1 server: records each POST's JSON and answers from a script.

    ``script`` items are ``(status, headers)`` or ``"hang"`` (read the request, never answer);
    when the script is empty ``default`` is used.
    """

    def __init__(self, default: Any = (200, {})) -> None:
        self.default = default
        self.script: deque[Any] = deque()
        self.requests: list[dict[str, Any]] = []
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> SlackServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/services/T000/B000/{TOKEN}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for w in list(self._writers):
            w.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip()
                       for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append({"method": method, "path": path, "headers": headers,
                                  "json": json.loads(body), "t": time.monotonic()})
            action = self.script.popleft() if self.script else self.default
            if action == "hang":
                await reader.read()  # until the client gives up and closes
                return
            status, extra = action
            payload = b"ok" if status == 200 else b"error_body"
            out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(payload)}",
                   "Content-Type: text/plain", "Connection: close"]
            out += [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


class Inbox:
    """aiosmtpd handler keeping every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"


class BoundController(Controller):
    """aiosmtpd's Controller on a socket bound to a free port beforehand (no port race)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        super().__init__(handler, hostname="127.0.0.1", port=self._sock.getsockname()[1],
                         **kwargs)

    def _create_server(self):  # type: ignore[no-untyped-def]
        return self.loop.create_server(self._factory_invoker, sock=self._sock,
                                       ssl=self.ssl_context)


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"contimg"
          and auth_data.password == PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def inbox():
    box = Inbox()
    ctl = BoundController(box)
    ctl.start()
    box.port = ctl.port
    yield box
    ctl.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    crt, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt, key


def server_tls(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


# ---------------------------------------------------------------------------- helpers
def opts(**kw: Any) -> AlertOptions:
    base: dict[str, Any] = dict(send_timeout_s=2.0, max_retries=2, retry_backoff_s=0.05,
                                retry_max_delay_s=5.0, rate_limit_window_s=60.0)
    base.update(kw)
    return AlertOptions(**base)


def alert(sev: Severity = Severity.ERROR, category: str = "calibration", title: str = "Bandpass failed",
          **context: Any) -> Alert:
    return Alert(sev, category, title, f"{title}: see the log for details", context)


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Ticker:
    """A bystander coroutine that should keep ticking every 50 ms whatever alerting does."""

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self.lateness: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time() + self.period
        while True:
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            self.lateness.append(loop.time() - nxt)
            nxt += self.period


def no_secret(*things: Any) -> None:
    for thing in things:
        text = repr(thing)
        assert TOKEN not in text and PASSWORD not in text, text[:500]


def events(logs: list[dict[str, Any]], name: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name and all(e.get(k) == v for k, v in match.items())]


# ---------------------------------------------------------------------------- routing & format
async def test_routes_by_severity_and_formats_slack_and_email(inbox: Inbox) -> None:
    async with SlackServer() as slack:
        o = opts(slack_webhook_url=Secret(slack.url), smtp_host="127.0.0.1", smtp_port=inbox.port,
                 smtp_to=("ops@example.org", "astro@example.org"), smtp_from="contimg@dsa110")
        router = AlertRouter(o, host="corr-node-7")
        with capture_logs() as logs:
            await router.start()
            for sev in Severity:
                router.emit(alert(sev, category=f"cat-{sev.name.lower()}", title=f"{sev.name} title",
                                  group="2025-01-01T00:00:00", n_subbands=15))
            await wait_for(lambda: len(slack.requests) == 3 and len(inbox.messages) == 2)
            await router.stop()

    # log: every severity, one `alert` event each with the documented fields
    logged = events(logs, "alert")
    assert [e["severity"] for e in logged] == [s.name for s in Severity]
    assert [e["log_level"] for e in logged] == ["debug", "info", "warning", "error", "critical"]
    assert logged[3]["category"] == "cat-error" and logged[3]["title"] == "ERROR title"
    assert logged[3]["context"] == {"group": "2025-01-01T00:00:00", "n_subbands": 15}

    # slack: WARNING and above, colour/emoji per severity, context as fields, footer
    by_sev = {r["json"]["attachments"][0]["fallback"].split("]")[0][1:]: r["json"] for r in slack.requests}
    assert set(by_sev) == {"WARNING", "ERROR", "CRITICAL"}
    err = by_sev["ERROR"]
    att = err["attachments"][0]
    assert att["color"] == "#d00000" and ":x:" in err["text"] and "ERROR title" in err["text"]
    assert by_sev["WARNING"]["attachments"][0]["color"] == "#daa038"
    assert ":warning:" in by_sev["WARNING"]["text"]
    assert ":rotating_light:" in by_sev["CRITICAL"]["text"]
    fields = {f["title"]: f["value"] for f in att["fields"]}
    assert fields == {"category": "cat-error", "severity": "ERROR",
                      "group": "2025-01-01T00:00:00", "n_subbands": "15"}
    assert att["footer"] == "dsa110-contimg on corr-node-7"
    assert att["text"] == "ERROR title: see the log for details"
    assert slack.requests[0]["path"] == f"/services/T000/B000/{TOKEN}"

    # email: ERROR and above, exact subject, body with title, message, context
    subjects = sorted(m["Subject"] for m in inbox.messages)
    assert subjects == ["[CRITICAL] DSA-110: cat-critical", "[ERROR] DSA-110: cat-error"]
    msg = next(m for m in inbox.messages if m["Subject"] == "[ERROR] DSA-110: cat-error")
    body = msg.get_content()
    assert msg["From"] == "contimg@dsa110"
    assert set(inbox.envelopes[0].rcpt_tos) == {"ops@example.org", "astro@example.org"}
    for text in ("ERROR title", "ERROR title: see the log for details",
                 "group: 2025-01-01T00:00:00", "n_subbands: 15", "corr-node-7"):
        assert text in body

    stats = router.stats()
    assert stats["sent"]["slack"] == {"cat-warning": 1, "cat-error": 1, "cat-critical": 1}
    assert stats["sent"]["email"] == {"cat-error": 1, "cat-critical": 1}
    assert sum(stats["sent"]["log"].values()) == 5
    assert stats["totals"]["failed"] == 0 and stats["totals"]["dropped"] == 0
    recent = router.recent(5)
    assert recent[0]["severity"] == "CRITICAL"  # newest first
    assert recent[0]["delivery"] == {"log": "sent", "slack": "sent", "email": "sent"}
    assert recent[4]["delivery"] == {"log": "sent"}
    no_secret(router, stats, recent, logs, o)


# ---------------------------------------------------------------------------- never blocking
async def test_hung_slack_is_retried_then_logged_and_blocks_nothing(inbox: Inbox) -> None:
    ticker = Ticker()
    async with SlackServer(default="hang") as slack:
        o = opts(slack_webhook_url=Secret(slack.url), smtp_host="127.0.0.1", smtp_port=inbox.port,
                 smtp_to=("ops@example.org",), send_timeout_s=0.5, max_retries=1)
        router = AlertRouter(o)
        with capture_logs() as logs:
            await router.start()
            tick = asyncio.create_task(ticker.run())
            await asyncio.sleep(0.1)
            durations = []
            t0 = time.monotonic()
            for i in range(2):
                s = time.perf_counter()
                router.emit(alert(Severity.ERROR, category=f"conversion-{i}"))
                durations.append(time.perf_counter() - s)
            for i in range(200):  # log-only traffic, some of it rate limited
                s = time.perf_counter()
                router.emit(alert(Severity.INFO, category=f"ingest-{i % 10}", title=f"file {i}"))
                durations.append(time.perf_counter() - s)
            # email is not held up by the hung Slack (separate sender per channel)
            await wait_for(lambda: len(inbox.messages) == 2, timeout=3)
            email_latency = time.monotonic() - t0
            assert email_latency < 0.45, email_latency
            assert len(slack.requests) == 1  # still on its first, unanswered attempt
            await wait_for(lambda: sum(router.stats()["failed"].get("slack", {}).values()) == 2,
                           timeout=6)
            tick.cancel()
            await router.stop(timeout=1)

    assert len(slack.requests) == 4  # two alerts x (1 try + 1 retry)
    failed = events(logs, "alert_delivery_failed", channel="slack")
    assert len(failed) == 2 and all(e["log_level"] == "error" for e in failed)
    assert {e["category"] for e in failed} == {"conversion-0", "conversion-1"}
    assert all("no answer within 0.5 s" in e["error"] and e["attempts"] == 2 for e in failed)
    assert len(events(logs, "alert_delivery_retry", channel="slack")) == 2
    assert router.stats()["sent"]["email"] == {"conversion-0": 1, "conversion-1": 1}
    assert router.stats()["suppressed"] == {f"ingest-{k}": 10 for k in range(10)}
    assert statistics.median(durations) < 1e-3
    assert sorted(durations)[int(0.95 * len(durations))] < 1e-3, max(durations)
    assert max(ticker.lateness) < 0.1, max(ticker.lateness)
    assert len(ticker.lateness) >= 20
    no_secret(router, router.stats(), router.recent(), logs)


async def test_hung_mail_server_blocks_neither_loop_nor_slack() -> None:
    conns: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)  # accept and never send the SMTP greeting
        await reader.read()

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = mute.sockets[0].getsockname()[1]
    ticker = Ticker()
    try:
        async with SlackServer() as slack:
            o = opts(slack_webhook_url=Secret(slack.url), smtp_host="127.0.0.1", smtp_port=port,
                     smtp_to=("ops@example.org",), smtp_user="contimg",
                     smtp_password=Secret(PASSWORD), smtp_allow_plaintext_login=True,
                     send_timeout_s=0.4, max_retries=0)
            with capture_logs() as logs:
                async with AlertRouter(o) as router:
                    tick = asyncio.create_task(ticker.run())
                    router.emit(alert(Severity.CRITICAL, category="disk"))
                    await wait_for(lambda: len(slack.requests) == 1, timeout=0.3)
                    await wait_for(lambda: router.stats()["failed"].get("email"), timeout=3)
                    await asyncio.sleep(0.1)
                    tick.cancel()
    finally:
        mute.close()
        for w in conns:
            w.close()
    failed = events(logs, "alert_delivery_failed", channel="email")
    assert len(failed) == 1 and failed[0]["attempts"] == 1
    assert failed[0]["category"] == "disk" and failed[0]["title"] == "Bandpass failed"
    assert max(ticker.lateness) < 0.1
    no_secret(router.stats(), logs)


@pytest.mark.parametrize("status", [500, 429])
async def test_server_errors_retry_with_backoff_then_degrade_to_log(status: int) -> None:
    headers = {"Retry-After": "30"} if status == 429 else {}
    async with SlackServer(default=(status, headers)) as slack:
        # retry_max_delay_s caps both the exponential backoff and the server's Retry-After
        o = opts(slack_webhook_url=Secret(slack.url), max_retries=2, retry_backoff_s=0.1,
                 retry_max_delay_s=0.3)
        with capture_logs() as logs:
            async with AlertRouter(o) as router:
                router.emit(alert())
                await wait_for(lambda: router.stats()["failed"].get("slack"), timeout=5)
    t = [r["t"] for r in slack.requests]
    assert len(t) == 3
    gaps = [b - a for a, b in zip(t, t[1:], strict=False)]
    if status == 500:  # 0.1 s then 0.2 s
        assert 0.09 <= gaps[0] < 0.6 and 0.19 <= gaps[1] < 0.7, gaps
    else:  # Retry-After 30 s capped at 0.3 s
        assert all(0.29 <= g < 0.9 for g in gaps), gaps
    failed = events(logs, "alert_delivery_failed")
    assert len(failed) == 1 and failed[0]["channel"] == "slack"
    assert failed[0]["error"].startswith(f"HTTP {status}") and failed[0]["attempts"] == 3
    assert router.stats()["channels"]["slack"]["retries"] == 2
    assert router.recent(1)[0]["delivery"]["slack"] == "failed"
    no_secret(router, router.stats(), logs)


async def test_429_retry_after_is_honoured_then_delivers() -> None:
    async with SlackServer() as slack:
        slack.script.append((429, {"Retry-After": "1"}))
        o = opts(slack_webhook_url=Secret(slack.url), max_retries=3, retry_backoff_s=0.01)
        async with AlertRouter(o) as router:
            router.emit(alert())
            await wait_for(lambda: router.stats()["sent"].get("slack"), timeout=4)
    assert len(slack.requests) == 2
    assert 0.95 <= slack.requests[1]["t"] - slack.requests[0]["t"] < 1.8
    assert router.stats()["failed"] == {}


async def test_client_error_is_not_retried() -> None:
    async with SlackServer(default=(404, {})) as slack:
        with capture_logs() as logs:
            async with AlertRouter(opts(slack_webhook_url=Secret(slack.url))) as router:
                router.emit(alert())
                await wait_for(lambda: router.stats()["failed"].get("slack"), timeout=3)
    assert len(slack.requests) == 1
    assert events(logs, "alert_delivery_failed")[0]["error"] == "HTTP 404: error_body"


async def test_connection_refused_is_retried_and_url_never_logged() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/services/T000/B000/{TOKEN}"
    with capture_logs() as logs:
        async with AlertRouter(opts(slack_webhook_url=Secret(url), max_retries=1)) as router:
            router.emit(alert())
            await wait_for(lambda: router.stats()["failed"].get("slack"), timeout=3)
    failed = events(logs, "alert_delivery_failed")
    assert len(failed) == 1 and failed[0]["attempts"] == 2
    assert "ConnectError" in failed[0]["error"]
    no_secret(router, router.stats(), router.recent(), logs)


async def test_buffer_overflow_drops_oldest_to_log() -> None:
    async with SlackServer(default="hang") as slack:
        o = opts(slack_webhook_url=Secret(slack.url), buffer_size=3, send_timeout_s=0.3,
                 max_retries=0)
        with capture_logs() as logs:
            router = AlertRouter(o)
            await router.start()
            for i in range(8):  # all emitted before the sender first runs
                router.emit(alert(category=f"c{i}", title=f"alert {i}"))
            stats = router.stats()
            await router.stop(timeout=0.1)
    dropped = events(logs, "alert_dropped", reason="buffer full")
    assert [e["title"] for e in dropped] == [f"alert {i}" for i in range(5)]
    assert [e["dropped_total"] for e in dropped] == [1, 2, 3, 4, 5]
    assert stats["channels"]["slack"]["queued"] == 3
    assert sum(stats["dropped"]["slack"].values()) == 5
    # every one of them is still in the log as an `alert` event
    assert len(events(logs, "alert")) == 8
    assert len(slack.requests) <= 1


async def test_stop_drains_queue_and_emit_works_from_threads() -> None:
    async with SlackServer() as slack:
        router = AlertRouter(opts(slack_webhook_url=Secret(slack.url)))
        await router.start()
        router.emit(alert(category="a"))
        th = threading.Thread(target=lambda: [router.emit(alert(category="b")) for _ in range(3)])
        th.start()
        th.join()
        await asyncio.sleep(0)  # let the thread's call_soon_threadsafe callbacks run
        await router.stop(timeout=5)
        assert len(slack.requests) == 4
        router.emit(alert(category="late"))  # after stop: logged, counted, not sent
    assert router.stats()["dropped"]["slack"] == {"late": 1}
    assert router.stats()["state"] == "stopped"


async def test_stop_gives_up_on_a_hung_channel_within_timeout() -> None:
    async with SlackServer(default="hang") as slack:
        o = opts(slack_webhook_url=Secret(slack.url), send_timeout_s=30)
        router = AlertRouter(o)
        await router.start()
        router.emit(alert(category="a"))
        router.emit(alert(category="b"))
        await wait_for(lambda: len(slack.requests) == 1)
        t0 = time.monotonic()
        with capture_logs() as logs:
            await router.stop(timeout=0.2)
        assert time.monotonic() - t0 < 1.0
    assert {e["category"] for e in events(logs, "alert_dropped", reason="shutdown")} == {"a", "b"}


# ---------------------------------------------------------------------------- rate limiting
async def test_burst_of_25_gives_10_sends_and_one_summary() -> None:
    async with SlackServer() as slack:
        o = opts(slack_webhook_url=Secret(slack.url), rate_limit_count=10, rate_limit_window_s=1.0)
        with capture_logs() as logs:
            async with AlertRouter(o) as router:
                t0 = time.monotonic()
                for i in range(25):
                    router.emit(alert(Severity.WARNING, category="ingest", title=f"late file {i}"))
                router.emit(alert(Severity.CRITICAL, category="other"))  # other categories unaffected
                await wait_for(lambda: len(slack.requests) == 12, timeout=4)
                waited = time.monotonic() - t0
                await asyncio.sleep(0.3)  # no second summary
                assert len(slack.requests) == 12
                stats = router.stats()
    texts = [r["json"]["attachments"][0]["title"] for r in slack.requests]
    originals = [t for t in texts if "late file" in t]
    assert len(originals) == 10 and texts[-1].endswith("15 alerts of category ingest suppressed")
    summary = slack.requests[-1]["json"]
    assert "in the last window" in summary["attachments"][0]["text"]
    assert summary["attachments"][0]["color"] == "#daa038"  # highest suppressed severity
    assert 0.95 <= waited < 2.5  # sent by the timer when the window reopened
    assert stats["suppressed"] == {"ingest": 15}
    assert stats["sent"]["slack"] == {"ingest": 11, "other": 1}
    assert len(events(logs, "alert_suppressed", category="ingest")) == 15
    summaries = [e for e in router.recent() if e["summary"]]
    assert len(summaries) == 1 and summaries[0]["context"]["suppressed"] == 15


async def test_pending_summary_is_flushed_on_stop() -> None:
    async with SlackServer() as slack:
        o = opts(slack_webhook_url=Secret(slack.url), rate_limit_count=2, rate_limit_window_s=300)
        async with AlertRouter(o) as router:
            for _ in range(5):
                router.emit(alert(category="qa"))
        assert len(slack.requests) == 3
        assert "3 alerts of category qa suppressed" in slack.requests[-1]["json"]["text"]


def test_rate_limiter_windows() -> None:
    now = [0.0]
    rl = RateLimiter(3, 10.0, clock=lambda: now[0])
    assert [rl.allow("a", Severity.INFO, f"t{i}") for i in range(5)] == [True] * 3 + [False] * 2
    assert rl.allow("b", Severity.INFO)  # per category
    rl.allow("a", Severity.ERROR, "t5")
    assert rl.due() == [] and rl.pending() == {"a": 3}
    now[0] = 10.0
    (s,) = rl.due()
    assert (s.category, s.count, s.max_severity, s.first_title, s.last_title) == \
        ("a", 3, Severity.ERROR, "t3", "t5")
    assert rl.due() == [] and rl.allow("a", Severity.INFO)
    # a summary is not lost if the next alert arrives before anyone asks
    for _ in range(4):
        rl.allow("c", Severity.INFO)
    now[0] = 25.0
    assert rl.allow("c", Severity.INFO)
    assert [(x.category, x.count) for x in rl.due()] == [("c", 1)]


def test_retry_after_parsing() -> None:
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < parse_retry_after(later) <= 121  # type: ignore[operator]


# ---------------------------------------------------------------------------- email security
async def _send_one(o: AlertOptions) -> tuple[AlertRouter, list[dict[str, Any]]]:
    with capture_logs() as logs:
        async with AlertRouter(o) as router:
            router.emit(alert(category="calibration"))
            await wait_for(lambda: router.stats()["sent"].get("email")
                           or router.stats()["failed"].get("email"), timeout=5)
    return router, logs


async def test_email_login_without_tls_only_when_allowed() -> None:
    box = Inbox()
    tried: list[str] = []

    def counting(*args: Any) -> AuthResult:
        tried.append(args[3])  # the mechanism
        return authenticator(*args)

    ctl = BoundController(box, authenticator=counting, auth_require_tls=False)
    ctl.start()
    try:
        base = dict(smtp_host="127.0.0.1", smtp_port=ctl.port, smtp_to=("ops@example.org",),
                    smtp_user="contimg")
        # not allowed: refused before any connection, not retried, the setting named
        router, refused_logs = await _send_one(opts(smtp_password=Secret(PASSWORD), **base))
        assert router.stats()["failed"]["email"] == {"calibration": 1}
        assert tried == [] and box.messages == []
        good = opts(smtp_password=Secret(PASSWORD), smtp_allow_plaintext_login=True, **base)
        router, _ = await _send_one(good)
        assert router.stats()["sent"]["email"] == {"calibration": 1}
        assert box.messages[0]["Subject"] == "[ERROR] DSA-110: calibration"
        assert len(tried) == 1
        bad = opts(smtp_password=Secret("wrong-" + PASSWORD), smtp_allow_plaintext_login=True,
                   **base)
        router, logs = await _send_one(bad)
        logins = len(tried)
        rows = await alert_test(opts(smtp_password=Secret(PASSWORD), **base))
    finally:
        ctl.stop()
    (refused,) = events(refused_logs, "alert_delivery_failed")
    assert refused["attempts"] == 1
    assert "CONTIMG_SMTP_ALLOW_PLAINTEXT_LOGIN" in refused["error"], refused["error"]
    assert rows[1][:2] == ("email", False) and "CONTIMG_SMTP_SECURITY=none" in rows[1][2]
    (failed,) = events(logs, "alert_delivery_failed")
    assert failed["error"].startswith("login refused: 535") and failed["attempts"] == 1
    assert len(box.messages) == 1 and len(tried) == logins  # alert-test did not log in
    no_secret(router, router.stats(), logs, bad, refused_logs, rows)


async def test_email_starttls_with_login(cert: tuple[Path, Path]) -> None:
    box = Inbox()
    ctl = BoundController(box, tls_context=server_tls(cert), require_starttls=True,
                          authenticator=authenticator, auth_require_tls=True)
    ctl.start()
    try:
        base = dict(smtp_host="127.0.0.1", smtp_port=ctl.port, smtp_to=("ops@example.org",),
                    smtp_user="contimg", smtp_password=Secret(PASSWORD))
        router, _ = await _send_one(opts(smtp_security="starttls", smtp_ca_file=cert[0], **base))
        assert router.stats()["sent"]["email"] == {"calibration": 1}
        assert box.messages[0]["Subject"] == "[ERROR] DSA-110: calibration"
        assert box.envelopes[0].mail_from == "contimg@localhost"
        # a login without TLS is refused (by us; the server would too), and an untrusted
        # certificate is not retried
        _, plain_logs = await _send_one(opts(**base))
        _, untrusted_logs = await _send_one(opts(smtp_security="starttls", **base))
    finally:
        ctl.stop()
    assert len(box.messages) == 1
    (plain,) = events(plain_logs, "alert_delivery_failed")
    assert plain["attempts"] == 1
    (untrusted,) = events(untrusted_logs, "alert_delivery_failed")
    assert "TLS failed" in untrusted["error"] and untrusted["attempts"] == 1
    no_secret(plain_logs, untrusted_logs)


async def test_email_implicit_tls(cert: tuple[Path, Path]) -> None:
    box = Inbox()
    ctl = BoundController(box, ssl_context=server_tls(cert))
    ctl.start()
    try:
        router, _ = await _send_one(opts(smtp_host="127.0.0.1", smtp_port=ctl.port,
                                         smtp_to=("ops@example.org",), smtp_security="tls",
                                         smtp_ca_file=cert[0]))
    finally:
        ctl.stop()
    assert router.stats()["sent"]["email"] == {"calibration": 1}
    assert "Bandpass failed" in box.messages[0].get_content()


# ---------------------------------------------------------------------------- alert-test
async def test_alert_test_reports_each_configured_channel(inbox: Inbox) -> None:
    async with SlackServer() as slack:
        o = opts(slack_webhook_url=Secret(slack.url), smtp_host="127.0.0.1", smtp_port=inbox.port,
                 smtp_to=("ops@example.org",), rate_limit_count=1)
        with capture_logs() as logs:
            rows = await alert_test(o)
    assert [(c, ok) for c, ok, _ in rows] == [("log", True), ("slack", True), ("email", True)]
    assert len(slack.requests) == 1 and len(inbox.messages) == 1
    assert inbox.messages[0]["Subject"] == "[INFO] DSA-110: alert-test"  # below email's ERROR
    assert len(events(logs, "alert", category="alert-test")) == 1


async def test_alert_test_reports_failures_without_secrets() -> None:
    async with SlackServer(default=(404, {})) as slack:
        o = opts(slack_webhook_url=Secret(slack.url), smtp_host="127.0.0.1", smtp_port=slack.port,
                 smtp_to=(), smtp_password=Secret(PASSWORD))
        rows = await alert_test(o)
    assert rows[1] == ("slack", False, "HTTP 404: error_body")
    assert rows[2] == ("email", False, "no recipients (CONTIMG_SMTP_TO is empty)")
    assert [r[0] for r in await alert_test(AlertOptions())] == ["log"]  # nothing configured
    no_secret(rows)


async def test_alert_failure_command_sends_critical_with_what_systemd_said(
        inbox: Inbox, tmp_path: Path) -> None:
    """As contimg-failure@.service runs it: settings from the environment, the webhook as a
    systemd credential, the failed unit's result in MONITOR_* variables."""
    creds = tmp_path / "creds"
    creds.mkdir()
    async with SlackServer() as slack:
        (creds / "contimg-slack-webhook-url").write_text(slack.url + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
        env.update(CONTIMG_SMTP_HOST="127.0.0.1", CONTIMG_SMTP_PORT=str(inbox.port),
                   CONTIMG_SMTP_TO="ops@example.org", CONTIMG_STATE_DIR=str(tmp_path / "state"),
                   CONTIMG_LOG_FORMAT="json", CREDENTIALS_DIRECTORY=str(creds),
                   MONITOR_SERVICE_RESULT="start-limit-hit", MONITOR_EXIT_CODE="exited",
                   MONITOR_EXIT_STATUS="1")
        cmd = [sys.executable, "-m", "dsa110_contimg.cli", "alert-failure", "contimg.service"]
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=PIPE, stderr=STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode()
        assert proc.returncode == 0, text
        assert "slack    OK" in text and "email    OK" in text
        (msg,) = inbox.messages
        assert msg["Subject"] == "[CRITICAL] DSA-110: daemon.failed"
        body = msg.get_content()
        assert "contimg.service failed" in body and "start-limit-hit" in body
        assert "exit_status: 1" in body
        (req,) = slack.requests
        assert req["json"]["text"].startswith(":rotating_light: [CRITICAL] contimg.service failed")
        # a channel that cannot deliver makes the command fail, so the failure unit shows it
        slack.default = (404, {})
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=PIPE, stderr=STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "slack    FAILED" in out.decode(), out.decode()
    assert TOKEN not in out.decode()


def test_emit_without_a_loop_and_bad_input_never_raise() -> None:
    router = AlertRouter(opts())
    with capture_logs() as logs:
        router.emit(alert(Severity.WARNING, category="startup"))
        router.emit("not an alert")  # type: ignore[arg-type]
    assert events(logs, "alert", category="startup")
    assert events(logs, "alert_emit_failed")
