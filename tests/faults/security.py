"""Security: who may change state, what the daemon listens on, and where secrets must not go.

One daemon run with a distinctive API token, Slack webhook URL and SMTP password (delivering
to a local webhook and a local mail server that requires that password), an input directory
whose *path* carries an SQL injection, a bad group (so there is something to requeue and an
alert to deliver) and a good group. Checks:

* the API listens on 127.0.0.1 only (the daemon's sockets, from /proc);
* POST requeue without the token, with an empty one, a wrong one, a prefix of it, another
  scheme, in the query string or another header: 401 and nothing changes; other methods on
  every endpoint change nothing; with the token it works (the positive control);
* hostile group ids (``'; DROP TABLE groups; --``) through the CLI and the API are refused
  and the tables survive; a file path carrying the same text goes through ingest and
  conversion intact (it is a bound parameter, never SQL text);
* no secret in the daemon's logs (and CASA's), ``contimg status``, ``contimg config show``,
  ``/metrics``, ``/health``, the page, any ``/api/*`` answer, nor in the alerts delivered.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
import uuid
from pathlib import Path

from .core import CONVERTED_PLUS, Expect, Row, Session, at, finish, listening, request, requeues
from .servers import Smtp, Webhook

HOSTILE = "'; DROP TABLE groups; --"
GOAL = "bad→quarantined; good→converted+"


def session_security(workdir: Path) -> list[Row]:
    secret = uuid.uuid4().hex[:12]
    token = f"tok-{secret}-Zq9"
    password = f"pw-{secret}-Xk7"
    hook_path = f"/services/T0FAULTS/B0FAULTS/hook{secret}Wv3"
    webhook, smtp = Webhook("ok"), Smtp("contimg", password)
    inp = Path(workdir) / "security" / f"in {HOSTILE}"
    bound = Row("API bound to 127.0.0.1 by default", "loopback only")
    auth = Row("requeue: missing/empty/wrong token, other methods", "401/405, nothing changes")
    sqli = Row(f"SQL injection {HOSTILE!r} (id via CLI/API, input path)", GOAL)
    leaks = Row("no secret in logs, status, config show, /metrics, /api/*, alerts", "absent")
    rows = [bound, auth, sqli, leaks]
    s = None
    try:
        s = Session(workdir, "security", input_dir=inp, CONTIMG_API_TOKEN=token,
                    CONTIMG_SLACK_WEBHOOK_URL=webhook.url(hook_path),
                    CONTIMG_SLACK_MIN_SEVERITY="WARNING", CONTIMG_SMTP_HOST="127.0.0.1",
                    CONTIMG_SMTP_PORT=str(smtp.port), CONTIMG_SMTP_USER="contimg",
                    CONTIMG_SMTP_ALLOW_PLAINTEXT_LOGIN="true",  # the local fake has no TLS
                    CONTIMG_SMTP_PASSWORD=password, CONTIMG_SMTP_TO="ops@example.org",
                    CONTIMG_EMAIL_MIN_SEVERITY="WARNING", CONTIMG_LOG_LEVEL="DEBUG",
                    CONTIMG_ALERT_TIMEOUT_S="5")
        s.d.env.pop("CONTIMG_API_HOST", None)
        bad = s.simulate(at(10), faults={3: "nothdf5"}, seed=31)
        good = s.good(0)
        s.start()
        port = s.api_port()
        s.drop(bad["group_id"])
        s.wait_states({bad["group_id"]: ("quarantined",)}, what="the bad group quarantined")
        gid_bad = s.actual(bad["group_id"])

        socks = listening(s.proc.pid)
        bound.check(socks == [("127.0.0.1", port)],
                    f"daemon listens on {socks}, expected only 127.0.0.1:{port}")
        for pid in _kids(s):
            bound.check(not listening(pid), f"child {pid} listens on {listening(pid)}")
        bound.runs = s.runs

        _auth_matrix(s, auth, port, token, gid_bad)
        _sql_injection(s, sqli, port, token)
        # positive control: the right token requeues; the group is stopped again by conversion
        st, _, body = request(port, "POST", f"/api/groups/{gid_bad}/requeue",
                              {"Authorization": f"Bearer {token}"})
        auth.check(st == 200 and gid_bad in requeues(s),
                   f"the right token did not requeue: {st} {body[:200]}")
        s.wait(lambda st_: st_.get(gid_bad) == "quarantined" and _runs_of(s, gid_bad) >= 1,
               "the requeued bad group quarantined again")
        s.drop(good["group_id"])
        s.wait_states({good["group_id"]: CONVERTED_PLUS}, what="the good group converted")
        _wait_deliveries(webhook, smtp)
        texts = _surfaces(s, port, token, [gid_bad, good["group_id"]])
        status = s.status_json()
        finish(s, rows)
        texts["daemon and CASA logs"] = s.log_text()
        texts["slack payloads"] = "\n".join(r["body"] for r in webhook.requests)
        texts["emails"] = "\n".join(m.as_string() for m in smtp.messages)
        _no_secrets(leaks, texts, {"API token": token, "SMTP password": password,
                                   "webhook URL": webhook.url(hook_path),
                                   "webhook path": hook_path, "secret core": secret})
        leaks.check(webhook.requests and smtp.messages,
                    f"alerts were not delivered (slack {len(webhook.requests)}, "
                    f"email {len(smtp.messages)}): the leak check would be vacuous")
        good_x = Expect(good["group_id"], CONVERTED_PLUS)
        bad_x = Expect(bad["group_id"], ("quarantined",), r"sb03.*(signature|not an? HDF5)",
                       ("ingest", "conversion.quarantined"))
        s.account(sqli, [bad_x, good_x], status=status)
        paths = [f["path"] for f in s.group_files() if f["group_id"] == good_x.gid]
        sqli.check(paths and all(HOSTILE in p for p in paths),
                   f"the hostile input path was not stored verbatim: {paths[:1]}")
        s.leftovers(sqli)
        for r in (auth, leaks):
            r.runs = s.runs
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        if s is not None:
            s.close()
        webhook.close()
        smtp.close()
    return rows


def _kids(s: Session) -> list[int]:
    from .core import children

    return children(s.proc.pid)


def _runs_of(s: Session, gid: str) -> int:
    return sum(1 for r in s.stage_runs() if r["group_id"] == gid)


def _wait_deliveries(webhook: Webhook, smtp: Smtp, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (webhook.requests and smtp.messages):
        time.sleep(0.2)


def _auth_matrix(s: Session, row: Row, port: int, token: str, gid: str) -> None:
    path = f"/api/groups/{gid}/requeue"
    attempts = {
        "no Authorization header": {},
        "empty Authorization": {"Authorization": ""},
        "'Bearer' alone": {"Authorization": "Bearer"},
        "'Bearer ' + empty token": {"Authorization": "Bearer "},
        "wrong token": {"Authorization": "Bearer tok-wrong"},
        "token minus last char": {"Authorization": f"Bearer {token[:-1]}"},
        "token plus a char": {"Authorization": f"Bearer {token}x"},
        "token upper-cased": {"Authorization": f"Bearer {token.upper()}"},
        "token with a NUL appended": {"Authorization": f"Bearer {token}\x00"},
        "Basic scheme": {"Authorization": f"Basic {token}"},
        "token without scheme": {"Authorization": token},
        "token twice": {"Authorization": f"Bearer {token} {token}"},
        "X-Api-Token header": {"X-Api-Token": token},
        "Cookie": {"Cookie": f"token={token}"},
    }
    for what, headers in attempts.items():
        st, hdrs, body = request(port, "POST", path, headers)
        row.check(st == 401, f"{what}: status {st} (expected 401) {body[:100]}")
        row.check(token not in body and token not in json.dumps(hdrs),
                  f"{what}: the refusal echoes the token")
    st, _, _ = request(port, "POST", f"{path}?token={urllib.parse.quote(token)}")
    row.check(st == 401, f"token in the query string: status {st}")
    endpoints = ["/", "/health", "/metrics", "/api/queue", "/api/alerts", "/api/calibration",
                 "/api/images", f"/api/groups/{gid}", path, "/products/x.png", "/api/config"]
    for ep in endpoints:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            st, _, body = request(port, method, ep, body=b'{"state": "pending"}')
            row.check(not 200 <= st < 300, f"{method} {ep} without token: {st} {body[:80]}")
    row.check(not requeues(s), f"a request without the token changed the queue: {requeues(s)}")
    row.check(s.groups()[gid]["state"] == "quarantined", "the quarantined group moved")


def _sql_injection(s: Session, row: Row, port: int, token: str) -> None:
    before = _tables(s)
    for gid in (HOSTILE, f"2026-06-01T04:56:06{HOSTILE}", "2026-06-01T04:56:06' OR '1'='1"):
        r = s.cli("requeue", gid)
        row.check(r.returncode == 1 and "Traceback" not in r.stderr,
                  f"CLI requeue {gid!r}: exit {r.returncode} {r.stderr[-200:]!r}")
        q = urllib.parse.quote(gid, safe="")
        st, _, body = request(port, "POST", f"/api/groups/{q}/requeue",
                              {"Authorization": f"Bearer {token}"})
        row.check(400 <= st < 500 and st not in (401, 403), f"API requeue {gid!r}: {st} {body[:120]}")
        st, _, body = request(port, "GET", f"/api/groups/{q}")
        row.check(st == 400, f"GET /api/groups/{gid!r}: {st} {body[:120]}")
    after = _tables(s)
    row.check(before == after and "groups" in after, f"tables changed: {before} -> {after}")
    row.check(not requeues(s), "a hostile id requeued something")


def _tables(s: Session) -> list[str]:
    con = sqlite3.connect(f"file:{s.d.state / 'contimg.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'"))
    finally:
        con.close()


def _surfaces(s: Session, port: int, token: str, gids: list[str]) -> dict[str, str]:
    """Every place an operator or a scraper can read from the running daemon."""
    out: dict[str, str] = {}
    for ep in ["/", "/health", "/metrics", "/api/queue", "/api/alerts", "/api/calibration",
               "/api/images", *(f"/api/groups/{g}" for g in gids), "/nope",
               f"/api/groups/{gids[0]}/requeue"]:
        method = "POST" if ep.endswith("/requeue") else "GET"
        st, hdrs, body = request(port, method, ep, {"Authorization": "Bearer wrong"})
        out[f"{method} {ep} ({st})"] = json.dumps(hdrs) + body
    for args in (("status",), ("status", "--json"), ("config", "show"), ("config", "env")):
        r = s.cli(*args)
        out["contimg " + " ".join(args)] = r.stdout + r.stderr
    r = s.cli("requeue", "2026-01-01T00:00:00")
    out["contimg requeue (error)"] = r.stdout + r.stderr
    return out


def _no_secrets(row: Row, texts: dict[str, str], secrets: dict[str, str]) -> None:
    for where, text in texts.items():
        for what, value in secrets.items():
            row.check(value not in text, f"{what} appears in {where}")
    row.check(len(texts) >= 15, "too few surfaces inspected")
