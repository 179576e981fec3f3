"""Neighbours the daemon talks to: a Slack-like webhook server and an SMTP server (both real
sockets on 127.0.0.1), and a port where nothing listens."""

from __future__ import annotations

import email
import email.policy
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Webhook:
    """An incoming-webhook stand-in. ``mode``: 'ok' (200), 'error' (HTTP 500) or 'hang'
    (reads the request, never answers). Switch modes at any time."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[dict[str, Any]] = []
        self._release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.requests.append({"path": self.path, "body": body.decode("utf-8", "replace"),
                                      "mode": hook.mode})
                if hook.mode == "hang":
                    hook._release.wait(120)
                    return
                status = 200 if hook.mode == "ok" else 500
                payload = b"ok" if status == 200 else b"internal_error"
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.content,
                                                      policy=email.policy.default))
        return "250 OK"


class _Controller(Controller):
    """Controller on a socket bound beforehand (port 0 without a race)."""

    def __init__(self, handler: Any, **kw: Any) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        super().__init__(handler, hostname="127.0.0.1", port=self._sock.getsockname()[1], **kw)

    def _create_server(self):  # type: ignore[no-untyped-def]
        return self.loop.create_server(self._factory_invoker, sock=self._sock,
                                       ssl=self.ssl_context)


class Smtp:
    """A mail server requiring LOGIN/PLAIN as ``user``/``password`` (no TLS: loopback only)."""

    def __init__(self, user: str, password: str) -> None:
        self.inbox = _Inbox()
        # aiosmtpd warns about its own deprecated attribute on every login: not ours to fix
        logging.getLogger("mail.log").setLevel(logging.ERROR)

        def auth(server: Any, session: Any, envelope: Any, mechanism: str,
                 data: Any) -> AuthResult:
            ok = (isinstance(data, LoginPassword) and data.login == user.encode()
                  and data.password == password.encode())
            return AuthResult(success=ok, handled=False)

        self._ctl = _Controller(self.inbox, authenticator=auth, auth_require_tls=False)
        self._ctl.start()
        self.port = self._ctl.port

    @property
    def messages(self) -> list[email.message.EmailMessage]:
        return self.inbox.messages

    def close(self) -> None:
        self._ctl.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
