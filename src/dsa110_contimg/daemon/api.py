"""Status API and page: a small HTTP/1.1 server on asyncio streams (no framework needed).

Bound to 127.0.0.1 by default. Read-only endpoints are open; anything that changes state
needs ``Authorization: Bearer <CONTIMG_API_TOKEN>`` (compared in constant time) and is
refused outright when no token is configured. Nothing here ever prints a secret.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..errors import BadInputError, ContimgError
from ..products import product_dir

log = structlog.get_logger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
            413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None


def _json(status: int, obj: Any) -> Response:
    return Response(status, json.dumps(obj, indent=1, default=str).encode())


class StatusAPI:
    """Routes requests to providers the daemon hands in (queue, alerts, registry, metrics)."""

    def __init__(self, host: str, port: int, token: str, output_dir: Path,
                 providers: dict[str, Callable[..., Awaitable[Any]]]) -> None:
        self.host, self.port = host, port
        self._token = token.encode()
        self.output_dir = Path(output_dir).resolve()
        self.p = providers
        self._server: asyncio.base_events.Server | None = None
        self.started = time.time()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("api_listening", host=self.host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            resp = await asyncio.wait_for(self._request(reader), timeout=10)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            resp = Response(400, b'{"error": "bad request"}')
        except Exception as exc:  # noqa: BLE001 - a bug here must not take the daemon down
            log.error("api_error", error=str(exc))
            resp = _json(500, {"error": "internal error"})
        head = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'OK')}",
                f"Content-Type: {resp.content_type}", f"Content-Length: {len(resp.body)}",
                "Connection: close", "X-Content-Type-Options: nosniff", "Cache-Control: no-store"]
        head += [f"{k}: {v}" for k, v in (resp.headers or {}).items()]
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + resp.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _request(self, reader: asyncio.StreamReader) -> Response:
        line = (await reader.readline()).decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3:
            return Response(400, b'{"error": "bad request line"}')
        method, target, _ = parts
        headers: dict[str, str] = {}
        while True:
            h = (await reader.readline()).decode("latin-1")
            if h in ("\r\n", "\n", ""):
                break
            k, _, v = h.partition(":")
            headers[k.strip().lower()] = v.strip()
            if len(headers) > 100:
                return Response(400, b'{"error": "too many headers"}')
        length = int(headers.get("content-length", "0") or 0)
        if length > 65536:
            return Response(413, b'{"error": "body too large"}')
        if length:
            await reader.readexactly(length)
        path = urllib.parse.urlsplit(target).path
        return await self.route(method, path, headers)

    def _authorised(self, headers: dict[str, str]) -> Response | None:
        if not self._token:
            return _json(403, {"error": "state-changing endpoints are disabled: no CONTIMG_API_TOKEN set"})
        given = headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            return Response(401, b'{"error": "missing or wrong token"}',
                            headers={"WWW-Authenticate": "Bearer"})
        return None

    async def route(self, method: str, path: str, headers: dict[str, str]) -> Response:
        seg = [urllib.parse.unquote(s) for s in path.strip("/").split("/") if s]
        if method == "POST":
            if len(seg) == 4 and seg[:2] == ["api", "groups"] and seg[3] == "requeue":
                denied = self._authorised(headers)
                if denied:
                    return denied
                try:
                    msg = await self.p["requeue"](seg[2])
                except (BadInputError, LookupError, ValueError) as exc:
                    return _json(409, {"error": str(exc)})
                return _json(200, {"ok": True, "message": msg})
            return _json(404 if method == "POST" else 405, {"error": "no such endpoint"})
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": "method not allowed"})
        if not seg:
            return Response(200, (await self._page()).encode(), "text/html; charset=utf-8")
        if seg == ["health"]:
            return _json(200, {"status": "ok", "uptime_s": round(time.time() - self.started, 1),
                               **(await self.p["health"]())})
        if seg == ["metrics"]:
            return Response(200, (await self.p["metrics"]()).encode(),
                            "text/plain; version=0.0.4")
        if seg == ["api", "queue"]:
            return _json(200, await self.p["queue"]())
        if len(seg) == 3 and seg[:2] == ["api", "groups"]:
            try:
                product_dir(Path("."), seg[2])
                return _json(200, await self.p["group"](seg[2]))
            except BadInputError as exc:
                return _json(400, {"error": str(exc)})
            except LookupError:
                return _json(404, {"error": f"no group {seg[2]!r}"})
        if seg == ["api", "alerts"]:
            return _json(200, await self.p["alerts"]())
        if seg == ["api", "calibration"]:
            return _json(200, await self.p["calibration"]())
        if seg == ["api", "calibration", "outlook"] and "calibration_outlook" in self.p:
            return await self._outlook()
        if seg == ["api", "images"]:
            return _json(200, await self.p["images"]())
        if seg and seg[0] == "products":
            return self._product(seg[1:])
        return _json(404, {"error": "no such endpoint"})

    async def _outlook(self) -> Response:
        """The calibration outlook; 503 while it cannot be computed (no pointing known yet,
        catalogue unreadable)."""
        try:
            doc = await self.p["calibration_outlook"]()
        except ContimgError as exc:
            return _json(503, {"error": str(exc)})
        if doc is None:
            return _json(503, {"error": "no converted group yet: the pointing declination "
                                        "is unknown"})
        return _json(200, doc)

    def _product(self, rel: list[str]) -> Response:
        """Serve quick-look PNGs only, and only from under the output directory."""
        if not rel or any(p in ("", ".", "..") for p in rel) or not rel[-1].endswith(".png"):
            return _json(404, {"error": "not found"})
        target = (self.output_dir / Path(*rel)).resolve()
        if not target.is_relative_to(self.output_dir) or not target.is_file():
            return _json(404, {"error": "not found"})
        return Response(200, target.read_bytes(), "image/png")

    async def _page(self) -> str:
        q = await self.p["queue"]()
        images = await self.p["images"]()
        counts = q.get("counts", {})
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='n'>{v}</td></tr>"
                       for k, v in counts.items())
        cards = []
        for im in images[:12]:
            png = im.get("quicklook_path")
            rel = None
            if png:
                try:
                    rel = Path(png).resolve().relative_to(self.output_dir)
                except ValueError:
                    rel = None
            img = (f'<img src="/products/{urllib.parse.quote(str(rel))}" '
                   f'alt="quick-look {html.escape(im["group_id"])}">'
                   if rel else '<div class="noimg">no quick-look</div>')
            verdict = "passed" if im.get("qa_passed") else "FAILED"
            cards.append(
                f'<div class="card" data-group="{html.escape(im["group_id"])}">{img}'
                f"<h3>{html.escape(im['group_id'])}</h3>"
                f'<p class="qa {verdict.lower()}">QA {verdict}</p>'
                f"<p>rms {(im.get('rms_jy') or 0) * 1e3:.2f} mJy/beam · "
                f"DR {im.get('dynamic_range') or 0:.0f} · beam {im.get('bmaj_arcsec') or 0:.1f}″"
                f"×{im.get('bmin_arcsec') or 0:.1f}″</p></div>")
        return _PAGE.format(rows=rows, cards="".join(cards) or "<p>No images yet.</p>",
                            updated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>DSA-110 contimg status</title><meta http-equiv="refresh" content="30">
<style>body{{font-family:sans-serif;margin:1.5em;background:#fafafa}}table{{border-collapse:collapse}}
td{{padding:2px 10px;border-bottom:1px solid #ddd}}td.n{{text-align:right}}
.cards{{display:flex;flex-wrap:wrap;gap:1em}}.card{{background:#fff;border:1px solid #ccc;padding:.5em;width:320px}}
.card img{{width:100%}}.qa.passed{{color:#1a7f37}}.qa.failed{{color:#c62828;font-weight:bold}}</style></head>
<body><h1>DSA-110 continuum imaging</h1><p id="updated">Updated {updated}</p>
<h2>Queue</h2><table id="queue">{rows}</table>
<h2>Latest images</h2><div class="cards" id="images">{cards}</div></body></html>"""
