"""Alert channels: the log (always on), a Slack incoming webhook, and email over SMTP.

A channel makes ONE attempt per ``send``; retries, timeouts and queueing belong to the
router, so every channel gets the same policy. A failed attempt raises ``DeliveryError``
whose text has already been stripped of secrets (the webhook URL is itself the Slack
credential) and which says whether another attempt may help.
"""

from __future__ import annotations

import asyncio
import email.utils
import smtplib
import ssl
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import httpx
import structlog

from ..configbase import Secret
from .alert import Alert, Severity
from .options import AlertOptions

log = structlog.get_logger(__name__)

PIPELINE = "dsa110-contimg"

# Slack attachment colour and emoji per severity.
SLACK_STYLE: dict[Severity, tuple[str, str]] = {
    Severity.DEBUG: ("#9e9e9e", ":mag:"),
    Severity.INFO: ("#2eb886", ":information_source:"),
    Severity.WARNING: ("#daa038", ":warning:"),
    Severity.ERROR: ("#d00000", ":x:"),
    Severity.CRITICAL: ("#6a0dad", ":rotating_light:"),
}
_MAX_FIELDS = 20
_MAX_VALUE = 500


class DeliveryError(Exception):
    """One failed send attempt; ``detail`` is safe to log, ``retryable`` says if retrying may help."""

    def __init__(self, detail: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


def scrub(text: str, *secrets: str) -> str:
    """Replace every occurrence of each non-empty secret with ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def _short(value: Any, limit: int = _MAX_VALUE) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Channel(ABC):
    """One destination; ``min_severity`` decides which alerts the router routes to it."""

    name: str = "channel"

    def __init__(self, min_severity: Severity) -> None:
        self.min_severity = min_severity

    def wants(self, alert: Alert) -> bool:
        return alert.severity >= self.min_severity

    @abstractmethod
    async def send(self, alert: Alert) -> None:
        """Deliver once or raise ``DeliveryError``."""

    async def aclose(self) -> None:
        """Release connections and threads (nothing to release by default)."""
        return None

    def __repr__(self) -> str:  # never the destination's credentials
        return f"{type(self).__name__}(min_severity={self.min_severity.name})"


class LogChannel(Channel):
    """Writes each alert as one structlog event ``alert``, at the alert's own level.

    Synchronous on purpose: the router writes here inside ``emit`` so an alert reaches the
    journal even if the event loop never runs again.
    """

    name = "log"

    def write(self, alert: Alert) -> None:
        method = getattr(log, alert.severity.name.lower())
        method("alert", severity=alert.severity.name, category=alert.category,
               title=alert.title, message=alert.message, context=dict(alert.context))

    async def send(self, alert: Alert) -> None:
        self.write(alert)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class SlackChannel(Channel):
    """Posts to a Slack incoming webhook: one coloured attachment, context as fields."""

    name = "slack"

    def __init__(self, webhook_url: Secret, min_severity: Severity, timeout_s: float,
                 host: str) -> None:
        super().__init__(min_severity)
        self._url = webhook_url
        self._timeout_s = timeout_s
        self._host = host
        self._client: httpx.AsyncClient | None = None
        try:
            u = httpx.URL(webhook_url.get())
            self._secret_parts = tuple(p for p in (webhook_url.get(), str(u), u.path, u.query.decode())
                                       if len(p) > 1)
        except Exception:  # an unparsable URL is reported at send time
            self._secret_parts = (webhook_url.get(),)

    def payload(self, alert: Alert) -> dict[str, Any]:
        """The webhook JSON: text for notifications, one attachment for the channel view."""
        colour, emoji = SLACK_STYLE.get(alert.severity, SLACK_STYLE[Severity.ERROR])
        sev = alert.severity.name
        fields = [{"title": "category", "value": alert.category, "short": True},
                  {"title": "severity", "value": sev, "short": True}]
        for key, value in list(alert.context.items())[: _MAX_FIELDS - 2]:
            text = _short(value)
            fields.append({"title": str(key), "value": text, "short": len(text) <= 40})
        return {
            "text": f"{emoji} [{sev}] {alert.title}",
            "attachments": [{
                "fallback": f"[{sev}] {alert.category}: {alert.title}",
                "color": colour,
                "title": f"{emoji} {alert.title}",
                "text": _short(alert.message, 3000),
                "fields": fields,
                "footer": f"{PIPELINE} on {self._host}",
                "ts": int(alert.created),
            }],
        }

    async def send(self, alert: Alert) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False)
        try:
            resp = await self._client.post(self._url.get(), json=self.payload(alert))
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise DeliveryError(f"webhook URL is not usable ({type(exc).__name__})",
                                retryable=False) from None
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timed out ({type(exc).__name__})", retryable=True) from None
        except httpx.HTTPError as exc:
            detail = scrub(f"{type(exc).__name__}: {exc}", *self._secret_parts)
            raise DeliveryError(detail, retryable=True) from None
        if resp.is_success:
            return
        body = scrub(_short(resp.text.strip(), 200), *self._secret_parts)
        status = resp.status_code
        detail = f"HTTP {status}: {body}" if body else f"HTTP {status}"
        if status == 429 or status >= 500:
            raise DeliveryError(detail, retryable=True,
                                retry_after=parse_retry_after(resp.headers.get("retry-after")))
        raise DeliveryError(detail, retryable=False)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


PLAINTEXT_LOGIN_REFUSED = (
    "login refused by contimg: CONTIMG_SMTP_USER is set but CONTIMG_SMTP_SECURITY=none would "
    "send the password in clear; use starttls or tls, or set "
    "CONTIMG_SMTP_ALLOW_PLAINTEXT_LOGIN=true for a trusted relay")


def plaintext_login_refused(o: AlertOptions) -> bool:
    """True when the settings ask for an SMTP login without TLS and do not allow it."""
    return bool(o.smtp_user) and o.smtp_security == "none" and not o.smtp_allow_plaintext_login


class EmailChannel(Channel):
    """Sends mail with the stdlib ``smtplib`` in a private one-thread executor.

    smtplib blocks, so it runs off the loop. A private executor (rather than
    ``asyncio.to_thread``'s shared default pool) means a hung mail server can hold at most one
    thread and never starves other users of the default pool; the socket timeout bounds it.
    """

    name = "email"

    def __init__(self, options: AlertOptions, host: str) -> None:
        super().__init__(Severity.parse(options.email_min_severity))
        self._o = options
        self._host = host
        self._executor: ThreadPoolExecutor | None = None

    def message(self, alert: Alert) -> EmailMessage:
        """Subject ``[SEVERITY] DSA-110: category``; body with title, message and context."""
        category = " ".join(alert.category.split())  # no header injection via newlines
        msg = EmailMessage()
        msg["Subject"] = f"[{alert.severity.name}] DSA-110: {category}"
        msg["From"] = self._o.smtp_from
        msg["To"] = ", ".join(self._o.smtp_to)
        msg["Date"] = email.utils.formatdate(alert.created)
        msg["Message-ID"] = email.utils.make_msgid(domain=self._host or None)
        raised = datetime.fromtimestamp(alert.created, UTC).isoformat(timespec="seconds")
        lines = [alert.title, "", alert.message, ""]
        if alert.context:
            lines.append("Context:")
            lines += [f"  {k}: {_short(v, 2000)}" for k, v in alert.context.items()]
            lines.append("")
        lines += [f"Severity: {alert.severity.name}", f"Category: {category}",
                  f"Raised:   {raised}", f"Source:   {PIPELINE} on {self._host}"]
        msg.set_content("\n".join(lines) + "\n")
        return msg

    async def send(self, alert: Alert) -> None:
        if not self._o.smtp_to:
            raise DeliveryError("no recipients (CONTIMG_SMTP_TO is empty)", retryable=False)
        if plaintext_login_refused(self._o):
            raise DeliveryError(PLAINTEXT_LOGIN_REFUSED, retryable=False)
        msg = self.message(alert)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contimg-smtp")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._deliver, msg)

    def _ssl_context(self) -> ssl.SSLContext:
        ca = self._o.smtp_ca_file
        return ssl.create_default_context(cafile=str(ca) if ca else None)

    def _deliver(self, msg: EmailMessage) -> None:
        """Blocking: runs in the executor thread and classifies every failure."""
        o, pw = self._o, self._o.smtp_password.get()
        try:
            if o.smtp_security == "tls":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(o.smtp_host, o.smtp_port,
                                                      timeout=o.send_timeout_s,
                                                      context=self._ssl_context())
            else:
                smtp = smtplib.SMTP(o.smtp_host, o.smtp_port, timeout=o.send_timeout_s)
            with smtp:
                if o.smtp_security == "starttls":
                    smtp.ehlo()
                    smtp.starttls(context=self._ssl_context())
                    smtp.ehlo()
                if o.smtp_user:  # never in clear unless allowed: send() refuses first
                    smtp.login(o.smtp_user, pw)
                smtp.send_message(msg)
        except DeliveryError:
            raise
        except Exception as exc:
            err = _classify_smtp(exc)
            raise DeliveryError(scrub(err.detail, pw), retryable=err.retryable) from None

    async def aclose(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False, cancel_futures=True)


def _smtp_reply(exc: smtplib.SMTPResponseException) -> str:
    err = exc.smtp_error
    text = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
    return f"{exc.smtp_code} {_short(text, 200)}"


def _classify_smtp(exc: Exception) -> DeliveryError:
    """4xx replies, dropped connections and network errors may pass; 5xx, auth and TLS will not."""
    kind = type(exc).__name__
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return DeliveryError(f"login refused: {_smtp_reply(exc)}", retryable=False)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return DeliveryError(f"all recipients refused (codes {sorted(set(codes))})",
                             retryable=bool(codes) and all(400 <= c < 500 for c in codes))
    if isinstance(exc, smtplib.SMTPResponseException):
        return DeliveryError(f"{kind}: {_smtp_reply(exc)}",
                             retryable=400 <= exc.smtp_code < 500)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return DeliveryError(f"{kind}: {exc}", retryable=True)
    if isinstance(exc, smtplib.SMTPException):  # e.g. STARTTLS or AUTH not offered
        return DeliveryError(f"{kind}: {exc}", retryable=False)
    if isinstance(exc, ssl.SSLError):  # before OSError: it is one, but retrying will not help
        return DeliveryError(f"TLS failed: {getattr(exc, 'reason', None) or exc}", retryable=False)
    if isinstance(exc, TimeoutError):
        return DeliveryError("timed out", retryable=True)
    if isinstance(exc, OSError):
        return DeliveryError(f"{kind}: {exc.strerror or exc}", retryable=True)
    return DeliveryError(f"{kind}: {exc}", retryable=False)


def build_channels(options: AlertOptions, host: str) -> list[Channel]:
    """The configured remote channels (the log channel is separate and always on)."""
    channels: list[Channel] = []
    if options.slack_webhook_url:
        channels.append(SlackChannel(options.slack_webhook_url,
                                     Severity.parse(options.slack_min_severity),
                                     options.send_timeout_s, host))
    if options.smtp_host:
        channels.append(EmailChannel(options, host))
    return channels
