"""Power loss between write and fsync: the products directory on the power-cut filesystem
(faults.powercut), the daemon SIGKILLed and everything not fsynced dropped at points during
two groups' processing, then restarted on what survived.

Two groups (the first has the calibrator transit, the second applies its set) go through
the pipeline on one worker; the power is cut mid conversion, mid calibration, at the
calibration→imaging boundary, mid imaging and at the imaging→done boundary. At the end every
group is ``done`` exactly once, no visible product is half-written (no empty FITS counted as
done) and every record's stamps match the products it names.

The state directory (SQLite in WAL, synchronous=NORMAL) stays on the ordinary disk: such a
database may lose its last commits in a power cut but keeps every commit that reached the
WAL before it here, which is the more demanding case for the products (the queue may say
``done`` for a group whose products were written just before). What the filesystem cannot
see is listed in faults.powercut.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dsa110_contimg.products import safe_stem, stamp_mismatch

from .core import STOPPED, WAIT_S, Expect, Row, Session, at, finish, half_written, product_dirs
from .crash import _poll
from .powercut import PowerCutMount, unavailable

# (label, state to wait for, seconds to wait after seeing it)
CUTS: list[tuple[str, str, float]] = [
    ("power cut mid conversion", "converting", 1.0),
    ("power cut mid calibration", "calibrating", 1.5),
    ("power cut at calibration→imaging boundary", "calibrated", 0.0),
    ("power cut mid imaging", "imaging", 1.5),
    ("power cut at imaging→done boundary", "done", 0.0),
]
GOAL = "every group done once, products valid"


def record_problems(output: Path) -> list[str]:
    """Products that do not match the records naming them (imaging and calibration)."""
    bad = []
    for gid, pdir in product_dirs(output).items():
        if gid.startswith("."):
            bad.append(f"hidden temporary left: {pdir.relative_to(output)}")
            continue
        stem = safe_stem(gid)
        rec = pdir / f"{stem}.imaging.json"
        if not rec.is_file():
            bad.append(f"{gid}: no imaging record")
            continue
        doc = json.loads(rec.read_text())
        result = doc["result"]
        paths = {"image": result["image_fits"], "pbcor": result["pbcor_fits"],
                 "pb": result["pb_fits"], "residual": result["residual_fits"],
                 "quicklook": result["quicklook_png"]}
        for key, path in paths.items():
            if path is not None:
                why = stamp_mismatch(Path(path), (doc.get("stamps") or {}).get(key))
                if why is not None or not doc.get("stamps"):
                    bad.append(f"{gid}: {key} {why or 'not stamped'}")
        marker = pdir / "caltables" / f"{stem}.calibration.json"
        if marker.is_file():
            cal = json.loads(marker.read_text())
            tables = {t["kind"]: t["path"] for t in (cal.get("new_set") or {}).get("tables", [])}
            for kind, st in (cal.get("table_stamps") or {}).items():
                why = stamp_mismatch(Path(tables[kind]), st)
                if why is not None:
                    bad.append(f"{gid}: caltable {kind} {why}")
    return bad


def session_powerloss(workdir: Path) -> list[Row]:
    rows = [Row(label, GOAL) for label, _, _ in CUTS]
    why = unavailable()
    if why is not None:
        for r in rows:
            r.skipped = why
        return rows
    s = Session(workdir, "powerloss", CONTIMG_CAL_HOLD_RETRY_S="5", CONTIMG_MAX_ATTEMPTS="8")
    fs = PowerCutMount(s.root / "products.backing", s.d.output, s.root / "powercut")
    try:
        fs.mount()
        a, b = s.simulate_run(at(0), 2, seed=83)
        s.start()
        s.drop(a["group_id"])
        s.drop(b["group_id"])
        for (label, state, delay), row in zip(CUTS, rows, strict=True):
            seen = _poll(s, state, min(WAIT_S, 200), boundary="boundary" in label)
            if seen is None:
                row.problems.append(f"never saw a group {state} before the cut "
                                    f"(daemon alive: {s.alive()}; states {s.d.states()})")
            time.sleep(delay)
            at_cut = s.d.states()
            s.kill()
            fs.cut()
            row.goal = f"{GOAL}; cut at {','.join(sorted(set(at_cut.values()))) or '-'}"
            for p in half_written(s.d.output):
                row.problems.append(f"after the cut: {p}")
            s.start()
        gids = [a["group_id"], b["group_id"]]
        s.wait_states({g: ("done",) for g in gids}, what="both groups done after the cuts",
                      fail_on=STOPPED)
        status = s.status_json()
        finish(s, rows)
        redone = sorted({(e.get("event"), e.get("path")) for e in s.events()
                         if e.get("event") in ("imaging.redo", "calibration.redo")
                         and e.get("path")})
        for row in rows:
            s.account(row, [Expect(g, ("done",)) for g in gids], status=status)
            row.check(not half_written(s.d.output), "half-written products at the end")
            for p in record_problems(s.d.output):
                row.problems.append(p)
        rows[-1].goal += f"; redone after damage: {len(redone)}"
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        s.close()
        try:
            fs.unmount(cut=False)
        except RuntimeError as exc:
            rows[0].problems.append(f"power-cut FS: {exc}")
    return rows
