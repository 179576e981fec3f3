"""Soak: many tiny groups, some with random faults, dropped in one after another into one
long daemon run while the daemon's RSS and open file descriptors are sampled from /proc;
every 45 s a running stage worker is SIGKILLed (as the OOM killer would), which costs the
group one attempt and a retry.

The daemon has a sky catalogue (the simulated skies as NVSS lists them), so every group is
calibrated: the first (a calibrator transit) on 3C286, the later ones on their own fields.
Expected: every good group (and one missing a single subband: processed at the timeout)
ends ``done``, every faulty one is stopped with a reason (nothing lost, nothing duplicated);
after warm-up RSS grows by at most 10 % and open descriptors stay within ±5 (the last quarter
of the samples against the first); the queue and the products agree: a converted+ group has
exactly one MS, a stopped-at-ingest group none, every done group exactly one catalogue row
and every catalogue row belongs to a ``done`` group whose files exist. The number of groups
is ``--soak-groups`` of run.py (``FAULTS_SOAK_GROUPS``; ``make faults`` runs 200, CI fewer).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

from dsa110_contimg.conversion.workarea import work_dir
from dsa110_contimg.simulate.survey import NVSS_NAME

from .core import CONVERTED_PLUS, STOPPED, Expect, Row, Session, at, fd_targets, finish, proc_sample
from .environment import stage_worker

FAULTS = ["truncated", "nothdf5", "channels", "nan", "times", "antennas", "duplicate", "missing"]


def session_soak(workdir: Path) -> list[Row]:
    n = int(os.environ.get("FAULTS_SOAK_GROUPS", "20"))
    row = Row(f"soak: {n} groups, ~30% random faults", "good→done, bad→stopped")
    mem = Row("soak: daemon RSS and open fds", "flat")
    rows = [row, mem]
    rng = random.Random(2026)
    s = Session(workdir, "soak", CONTIMG_GROUP_TIMEOUT_S="15", CONTIMG_TIMEOUT_POLICY="process",
                CONTIMG_MAX_WORKERS="2", CONTIMG_CAL_HOLD_RETRY_S="10")
    samples: list[tuple[float, int, int]] = []
    targets: list[list[str]] = []  # open descriptors after warm-up and at the end
    stop = threading.Event()
    kills: list[int] = []
    kill_every_s = 45.0
    try:
        cal = s.simulate(at(0), seed=899)  # a calibrator transit: goes through to done
        plan = [(cal, None)]
        for k in range(n - 1):
            fault = rng.choice(FAULTS) if rng.random() < 0.3 else None
            # one instrument (one seed: the bandpass carries over), a group every 5 min, all
            # within the bandpass's validity of the transit
            truth = s.simulate(at(75 + 5 * k), faults={rng.randrange(16): fault} if fault else None,
                               seed=899)
            plan.append((truth, fault))
        skies = sorted({str(Path(t["hold"]) / NVSS_NAME) for t, _ in plan})
        built = s.d.cli("catalog", "build", "--no-bundled", *skies)
        if built.returncode != 0:
            raise AssertionError(f"catalog build failed: {built.stderr[-2000:]}")
        s.start()
        pid = s.proc.pid

        def sampler() -> None:
            while not stop.is_set():
                try:
                    rss, fds = proc_sample(pid)
                except OSError:
                    return
                samples.append((time.monotonic(), rss, fds))
                if len(samples) == 10:
                    targets.append(fd_targets(pid))
                stop.wait(0.5)

        def killer() -> None:  # now and then a stage worker dies (OOM, a crash): retried
            while not stop.wait(kill_every_s):
                victim = stage_worker(s)
                if victim is not None:
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills.append(victim)
                    except ProcessLookupError:
                        pass

        threading.Thread(target=sampler, daemon=True).start()
        threading.Thread(target=killer, daemon=True).start()
        for truth, _ in plan:
            s.drop(truth["group_id"])
            time.sleep(0.5)
        want = {t["group_id"]: (STOPPED if f and f != "missing" else ("done",)) for t, f in plan}
        s.wait_states({g: ("done",) + STOPPED for g in want}, timeout=120 + 40 * n,
                      what="every soak group done or stopped")
        time.sleep(3)
        stop.set()
        targets.append(fd_targets(pid))
        status = s.status_json()
        finish(s, rows)
        expects = [Expect(t["group_id"], want[t["group_id"]]) for t, _ in plan]
        s.account(row, expects, status=status)
        s.unexpected_groups(row, [s.actual(t["group_id"]) for t, _ in plan])
        s.leftovers(row)
        _agree(s, row, expects)
        counts = s.catalogue_counts()
        for t, _ in plan:
            if want[t["group_id"]] == ("done",):
                gid = s.actual(t["group_id"]) or t["group_id"]
                row.check(counts.get(gid) == 1,
                          f"done group {gid} has {counts.get(gid, 0)} image catalogue rows")
        row.goal += f"; {len(kills)} workers killed"
        _flat(mem, samples, targets)
        mem.runs, mem.groups_in = s.runs, len(plan)
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.problems.append(f"session aborted: {type(exc).__name__}: {str(exc)[:1500]}")
    finally:
        stop.set()
        s.close()
    return rows


def _agree(s: Session, row: Row, expects: list[Expect]) -> None:
    """Queue vs products: an MS exactly for the converted+ groups (in the product directory
    or the tmpfs work area, and archived once done), catalogue rows only for done groups and
    pointing at files that exist."""
    groups = s.groups()
    for x in expects:
        g = groups.get(x.gid)
        if g is None:
            continue
        pdir = s.d.output / x.gid[:10] / x.gid
        work = work_dir(s.tmpfs, s.d.state) / (x.gid.replace(":", "") + ".ms")
        mss = ([p for p in pdir.glob("*.ms")] if pdir.is_dir() else []) + (
            [work] if work.is_dir() else [])
        if g["state"] in CONVERTED_PLUS:
            row.check(len(mss) == 1, f"{x.gid} is {g['state']} but has {len(mss)} MS")
            if g["state"] == "done":
                row.check(not work.exists(), f"{x.gid} is done but its MS is still in tmpfs")
            conv = (g["flags"].get("conversion") or {}).get("ms_path")
            row.check(conv and (Path(conv).is_dir() or mss),
                      f"{x.gid}: queue's MS path missing and the MS nowhere else: {conv}")
        elif g["state"] in STOPPED and not any(r["group_id"] == x.gid for r in s.stage_runs()):
            row.check(not mss, f"{x.gid} stopped at ingest but has an MS")
    for r in s.catalogue():
        g = groups.get(r["group_id"])
        row.check(g and g["state"] == "done", f"catalogue row for {r['group_id']} "
                                              f"in state {g and g['state']}")
        row.check(Path(r["image_path"]).is_file(), f"catalogue image missing: {r['image_path']}")


def _flat(row: Row, samples: list[tuple[float, int, int]], targets: list[list[str]]) -> None:
    row.check(len(samples) >= 20, f"only {len(samples)} samples")
    if len(samples) < 20:
        return
    body = samples[len(samples) // 5:]  # after warm-up (imports, first workers)
    q = max(5, len(body) // 4)
    first, last = body[:q], body[-q:]
    rss0, rss1 = statistics.median(r for _, r, _ in first), statistics.median(r for _, r, _ in last)
    fd0, fd1 = max(f for _, _, f in first), max(f for _, _, f in last)
    row.goal = (f"flat: RSS {rss0 / 1024:.0f}→{rss1 / 1024:.0f} MB, "
                f"fds {fd0}→{fd1} (peak {max(f for _, _, f in samples)})")
    row.check(rss1 <= rss0 * 1.10, f"RSS grew {rss0 / 1024:.0f} → {rss1 / 1024:.0f} MB (> 10 %)")
    if not row.check(abs(fd1 - fd0) <= 5, f"open fds {fd0} → {fd1} (more than ±5)") \
            and len(targets) == 2:
        new = Counter(targets[1]) - Counter(targets[0])
        row.problems.append("descriptors opened and kept: "
                            + ", ".join(f"{n}× {t}" for t, n in new.most_common()))
