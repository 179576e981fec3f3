"""Bad input: broken or inconsistent subband files, hostile file names, path traversal.

Session ``bad-input`` (timeout policy 'quarantine'): every faulty group is dropped in at once
together with files whose names must be ignored; once every faulty group is stopped, a good
group is dropped in and must still convert. Expectation of each fault row: the faulty group
is *quarantined* with a reason naming the problem (queue, ``contimg status --json`` and a
log event) and an alert naming the group; the good group dropped in afterwards reaches
``converted`` or beyond (calibration and imaging are out of scope for input faults).

Session ``timeout-process`` (policy 'process'): a group missing one subband is processed
incomplete after the timeout (flagged, alerted); one missing five (fewer than
CONTIMG_MIN_SUBBANDS) is quarantined. It also checks the API is bound where it is told
(127.0.0.2) and that with no token configured the state-changing endpoint is disabled.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from .core import (
    CONVERTED_PLUS,
    Expect,
    Row,
    Session,
    at,
    finish,
    listening,
    request,
    requeues,
    run_guarded,
    tracebacks,
)

GOOD = "bad→quarantined; good after→converted+"

# (row label, start offset in minutes, faults, reason regex, alert categories)
FAULTS: list[tuple[str, int, dict[int, str], str, tuple[str, ...]]] = [
    ("truncated HDF5 (sb05)", 10, {5: "truncated"}, r"sb05.*truncat",
     ("ingest", "conversion.quarantined")),
    ("not an HDF5 file (sb05)", 20, {5: "nothdf5"}, r"sb05.*(signature|not an? HDF5)",
     ("ingest", "conversion.quarantined")),
    ("wrong channel count (sb05)", 30, {5: "channels"}, r"sb05.*channel", ("conversion.quarantined",)),
    ("subbands disagree on times", 40, {5: "times"}, r"sb05.*times? differ",
     ("conversion.quarantined",)),
    ("subbands disagree on antennas", 50, {5: "antennas"}, r"sb05.*(antenna|baseline)",
     ("conversion.quarantined",)),
    ("NaN visibilities (sb05)", 60, {5: "nan"}, r"sb05.*NaN", ("conversion.quarantined",)),
    ("Inf visibilities (sb05)", 70, {5: "inf"}, r"sb05.*Inf", ("conversion.quarantined",)),
    ("all-zero data (16 subbands)", 80, {sb: "zeros" for sb in range(16)}, r"zero",
     ("conversion.quarantined",)),
    ("duplicate subband (sb05 twice)", 90, {5: "duplicate"}, r"duplicate subband sb05",
     ("ingest", "conversion.quarantined")),
    ("missing subband, policy=quarantine", 100, {5: "missing"},
     r"timed out.*missing sb05.*quarantine", ("ingest",)),
]

# Names that must be ignored (debug log), never crash, never form a group. Each file is a
# real, valid subband file under the hostile name.
MARK = "PWNED-" + uuid.uuid4().hex[:6]
HOSTILE_NAMES = [
    "2026-06-01T07:46:06_sb00 copy.hdf5",
    "2026-06-01T07:46:06 _sb01.hdf5",
    "2026-06-01T07:46:06_sb02.hdf5 ",
    "2026-06-01T07:46:06_sb03é.hdf5",
    "２026-06-01T07:46:06_sb04.hdf5",
    "2026-06-01T07:46:06_sb٠5.hdf5",
    f"$(touch {MARK})_sb06.hdf5",
    f"`touch {MARK}`_sb07.hdf5",
    f"2026-06-01T07:46:06_sb08.hdf5;touch {MARK}",
    "2026-06-01T07:46:06_sb09.hdf5|cat>x&",
    "'; DROP TABLE groups; --_sb10.hdf5",
    "2026-06-01T07:46:06'; DROP TABLE groups; --_sb11.hdf5",
    "2026-06-01T07:46:06_sb12.hdf5\nrm -rf ~",
    "-rf 2026-06-01T07:46:06_sb13.hdf5",
    "..2026-06-01T07:46:06_sb14.hdf5",
    "2026-06-01T07:46:06_sb15.hdf5.." ,
    "2026-13-01T07:46:06_sb00.hdf5",
    "2026-06-01T07:46:06_sb1.hdf5",
    "x" * 200 + "_sb00.hdf5",
]
# A directory with a perfectly valid subband name: not a regular file, must be skipped.
DIR_NAME = "2026-06-01T07:46:06_sb07.hdf5"

TRAVERSAL_IDS = ["../../etc/passwd", "..", "2026-06-01T04:56:06/../..",
                 "2026-06-01T04:56:06/../../../state", "%2e%2e%2fstate", "..\\..\\state",
                 "2026-06-01T04:56:06\x00../x"]


def session_bad_input(workdir: Path) -> list[Row]:
    token = "tok-" + uuid.uuid4().hex
    s = Session(workdir, "bad-input", CONTIMG_TIMEOUT_POLICY="quarantine",
                CONTIMG_GROUP_TIMEOUT_S="12", CONTIMG_LOG_LEVEL="DEBUG",
                CONTIMG_API_TOKEN=token)
    rows = [Row(label, GOOD) for label, *_ in FAULTS]
    names_row = Row("file names: spaces, unicode, shell/SQL metachars", "ignored (debug log); good→converted+")
    cli_row = Row("group id path traversal via CLI requeue", "exit 1, one line, nothing changes")
    api_row = Row("group id / product path traversal via API", "4xx, nothing served or changed")
    all_rows = [*rows, names_row, cli_row, api_row]
    try:
        _bad_input(s, token, rows, names_row, cli_row, api_row)
    except Exception as exc:  # noqa: BLE001 - reported on every row of the session
        for r in all_rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        s.close()
    return all_rows


def _bad_input(s: Session, token: str, rows: list[Row], names_row: Row, cli_row: Row,
               api_row: Row) -> None:
    bad = {}
    for k, (label, minutes, faults, reason, cats) in enumerate(FAULTS):
        bad[label] = (s.simulate(at(minutes), faults=faults, seed=100 + k), reason, cats)
    good = s.good(0)
    gid_good = good["group_id"]

    s.start()
    for truth, _, _ in bad.values():
        s.drop(truth["group_id"])
    # hostile names: real subband files under names ingest must refuse
    sample = Path(good["hold"]) / good["files"][0]
    for name in HOSTILE_NAMES:
        shutil.copyfile(sample, s.d.input / name)
    (s.d.input / DIR_NAME).mkdir()
    (s.d.input / DIR_NAME / "inner_sb00.hdf5").write_bytes(sample.read_bytes())

    run_guarded([cli_row], lambda: _cli_traversal(s, cli_row), "CLI traversal")
    run_guarded([api_row], lambda: _api_traversal(s, token, api_row), "API traversal")

    want = {t["group_id"]: ("quarantined", "failed") for t, _, _ in bad.values()}
    s.wait_states(want, what="every faulty group stopped")
    alive_before_good = s.alive()
    s.drop(gid_good)
    s.wait_states({gid_good: CONVERTED_PLUS}, what="the good group converted")
    status = s.status_json()
    finish(s, [*rows, names_row, cli_row, api_row])

    good_x = Expect(gid_good, CONVERTED_PLUS)
    for r, (truth, reason, cats) in zip(rows, bad.values(), strict=True):
        x = Expect(truth["group_id"], ("quarantined",), reason, cats)
        s.account(r, [x, good_x], status=status)
        r.check(alive_before_good, "daemon not running when the good group was dropped in")
        s.leftovers(r)
    _names(s, names_row, good_x, status, [t["group_id"] for t, _, _ in bad.values()])
    for r in (cli_row, api_row):
        s.account(r, [good_x], status=status)


def _names(s: Session, row: Row, good_x: Expect, status: dict, bad_gids: list[str]) -> None:
    s.account(row, [good_x], status=status)
    s.unexpected_groups(row, [good_x.gid, *(s.actual(g) or g for g in bad_gids)])
    ignored = [e for e in s.events() if e.get("event") in ("watcher.ignored", "ingest.ignored_name")
               and e.get("level") == "debug"]
    for name in HOSTILE_NAMES:
        hit = [e for e in ignored if str(e.get("path", "")).endswith("/" + name)]
        row.check(hit, f"no debug 'ignored' log event for {name!r}")
    marks = [p for p in (Path.cwd(), s.root, s.d.input, s.d.state) if (p / MARK).exists()]
    row.check(not marks, f"a shell ran a file name: {MARK} created in {marks}")
    files = {os.path.basename(f["path"]) for f in s.group_files()}
    row.check(not files & set(HOSTILE_NAMES) and DIR_NAME not in files,
              "a hostile-named file or a directory was queued")
    tb = tracebacks(s)
    row.check(not tb, f"unhandled exceptions in the daemon log: {tb[:3]}")


def _one_line_error(r, row: Row, label: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    row.check(r.returncode == 1, f"{label}: exit code {r.returncode} (expected 1)")
    row.check(len(lines) == 1 and lines[0].startswith("contimg: "),
              f"{label}: stderr is not one 'contimg: ...' line: {r.stderr[-300:]!r}")
    row.check("Traceback" not in r.stderr + r.stdout, f"{label}: traceback printed")


def _cli_traversal(s: Session, row: Row) -> None:
    for gid in TRAVERSAL_IDS:
        if "\x00" in gid:
            continue  # a NUL cannot be passed in argv at all
        r = s.cli("requeue", gid)
        _one_line_error(r, row, f"requeue {gid!r}")
        row.check("YYYY-MM-DDTHH:MM:SS" in r.stderr, f"requeue {gid!r}: reason does not say "
                                                     f"what a group id looks like: {r.stderr!r}")
    # control: a well-formed id passes validation and is refused for the right reason
    r = s.cli("requeue", "2026-01-01T00:00:00")
    _one_line_error(r, row, "requeue of an unknown but well-formed id")
    row.check("no group" in r.stderr, f"unknown id: unexpected message {r.stderr!r}")
    row.check(not requeues(s), f"a traversal requeue changed the queue: {requeues(s)}")
    strays = [p for p in s.root.rglob("*") if p.name in ("passwd", "x")]
    row.check(not strays, f"files appeared: {strays}")


def _api_traversal(s: Session, token: str, row: Row) -> None:
    port = s.api_port()
    auth = {"Authorization": f"Bearer {token}"}
    out = s.d.output
    secret = s.root / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nSECRET-OUTSIDE-OUTPUT" + b"IEND")
    (s.d.state / "state.png").write_bytes(secret.read_bytes())
    legit = out / "2026-06-01" / "2026-06-01T04:46:06" / "ok.png"
    legit.parent.mkdir(parents=True, exist_ok=True)
    legit.write_bytes(b"\x89PNG\r\n\x1a\nLEGIT" + b"IEND")
    (out / "evil.png").symlink_to(secret)
    st, _, _ = request(port, "GET", "/products/2026-06-01/2026-06-01T04:46:06/ok.png")
    row.check(st == 200, f"control: a quick-look under the output dir is not served ({st})")
    reads = ["/products/../secret.png", "/products/..%2Fsecret.png", "/products/%2e%2e/secret.png",
             "/products/2026-06-01/..%2F..%2Fsecret.png", "/products/evil.png",
             "/products/..%2F..%2Fstate%2Fstate.png", "/products//etc/passwd.png",
             "/products/%2Fetc%2Fpasswd.png", "/api/groups/..%2F..%2Fetc%2Fpasswd",
             "/api/groups/../../etc/passwd", "/api/groups/%2e%2e", "/api/groups/..%5C..%5Cstate",
             "/api/groups/2026-06-01T04:56:06%2F..%2F..", "/api/groups/2026-06-01T04:56:06%00"]
    for path in reads:
        st, _, body = request(port, "GET", path)
        row.check(400 <= st < 500, f"GET {path}: status {st}")
        row.check("SECRET-OUTSIDE-OUTPUT" not in body and "root:" not in body,
                  f"GET {path}: served something from outside the output directory")
    for gid in ("..%2F..%2Fetc%2Fpasswd", "..", "%2e%2e", "2026-06-01T04:56:06%2F..%2F..",
                "..%5C..%5Cstate", "2026-06-01T04:56:06%00"):
        path = f"/api/groups/{gid}/requeue"
        st, _, body = request(port, "POST", path, auth)
        row.check(400 <= st < 500 and st not in (401, 403), f"POST {path}: status {st} {body[:120]}")
    st, _, _ = request(port, "POST", "/api/groups/../../../requeue", auth)
    row.check(400 <= st < 500, f"POST /api/groups/../../../requeue: status {st}")
    row.check(not requeues(s), f"an API traversal request changed the queue: {requeues(s)}")


def session_timeout_process(workdir: Path) -> list[Row]:
    s = Session(workdir, "timeout-process", CONTIMG_TIMEOUT_POLICY="process",
                CONTIMG_GROUP_TIMEOUT_S="10", CONTIMG_MIN_SUBBANDS="12",
                CONTIMG_API_HOST="127.0.0.2")
    one = Row("missing subband, policy=process (15/16)", "converted+ incomplete, flagged, alerted")
    five = Row("missing 5 subbands, policy=process (11 < min 12)", GOOD)
    host = Row("API bind address told otherwise (127.0.0.2)", "listens there only")
    notok = Row("no API token set: requeue endpoint disabled", "403 for any credentials")
    rows = [one, five, host, notok]
    try:
        t1 = s.simulate(at(10), faults={5: "missing"}, seed=21)
        t5 = s.simulate(at(20), faults={sb: "missing" for sb in range(5)}, seed=22)
        good = s.good(0)
        s.start()
        s.drop(t1["group_id"])
        s.drop(t5["group_id"])
        run_guarded([host], lambda: _bound(s, host, "127.0.0.2"), "socket check")
        run_guarded([notok], lambda: _no_token(s, notok, t5["group_id"]), "no-token check")
        s.wait_states({t1["group_id"]: CONVERTED_PLUS + ("quarantined", "failed"),
                       t5["group_id"]: ("quarantined", "failed")}, what="both timed out")
        s.drop(good["group_id"])
        s.wait_states({good["group_id"]: CONVERTED_PLUS}, what="the good group converted")
        status = s.status_json()
        finish(s, [one, five])
        good_x = Expect(good["group_id"], CONVERTED_PLUS)
        s.account(one, [Expect(t1["group_id"], CONVERTED_PLUS, alerts=("ingest",)), good_x],
                  status=status)
        g1 = s.groups()[t1["group_id"]]
        one.check("incomplete" in g1["flags"] and "missing sb05" in str(g1["flags"]["incomplete"]),
                  f"no 'incomplete' flag naming sb05: {g1['flags'].get('incomplete')!r}")
        conv = g1["flags"].get("conversion") or {}
        notes = " ".join(conv.get("notes") or ())
        one.check(re.search(r"4 channels missing.*flagged", notes),
                  f"conversion notes do not say the missing subband was flagged: {notes!r}")
        one.check(g1["n_subbands"] == 15, f"queue says {g1['n_subbands']} subbands")
        s.account(five, [Expect(t5["group_id"], ("quarantined",),
                                r"timed out.*missing sb00, sb01, sb02, sb03, sb04.*at least 12",
                                ("ingest",)), good_x], status=status)
        for r in (one, five):
            s.leftovers(r)
        host.runs = notok.runs = s.runs
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        s.close()
    return rows


def _bound(s: Session, row: Row, host: str) -> None:
    socks = listening(s.proc.pid)
    port = s.api_port()
    row.check(socks == [(host, port)], f"daemon listens on {socks}, expected only {host}:{port}")
    st, _, _ = request(port, "GET", "/health", host=host)
    row.check(st == 200, f"GET /health on {host}: {st}")
    try:
        request(port, "GET", "/health", host="127.0.0.1")
        row.problems.append("the API also answers on 127.0.0.1")
    except OSError:
        pass


def _no_token(s: Session, row: Row, gid: str) -> None:
    port = s.api_port()
    for hdr in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"},
                {"Authorization": "Basic Og=="}):
        st, _, body = request(port, "POST", f"/api/groups/{gid}/requeue", hdr, host="127.0.0.2")
        row.check(st == 403, f"POST requeue with {hdr or 'no header'}: {st} {body[:100]}")
