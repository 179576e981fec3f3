"""What the whole-chain benchmarks share: simulated groups, a daemon run, its queue records.

Kept here so ``bench_daemon.py`` and ``bench_e2e.py`` drive the daemon the same way and read
the same numbers back (the daemon's own ``stage_runs``/``group_events``, not our stopwatch).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINAL_STATES = ("done", "failed", "quarantined")
STAGES = ("conversion", "calibration", "imaging")


def simulate(group_dir: Path, preset: str, groups: int, fresh: bool = False,
             rfi: bool = False) -> list[dict]:
    """Truths of ``groups`` consecutive groups in ``group_dir``, simulating only if missing.

    A full-size simulation takes minutes, so an existing one (its truth JSONs) is reused
    unless ``fresh``.
    """
    truths = sorted(group_dir.glob("*_truth.json"))
    if fresh or len(truths) < groups:
        shutil.rmtree(group_dir, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dsa110_contimg.cli", "simulate", str(group_dir),
                        "--preset", preset, "--groups", str(groups)] + (["--rfi"] if rfi else []),
                       check=True)
        print(f"simulated {groups} {preset} group(s) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        truths = sorted(group_dir.glob("*_truth.json"))
    else:
        print(f"reusing the simulated groups in {group_dir}", flush=True)
    from dsa110_contimg.simulate.survey import CATALOGUE_NAME, write_survey_catalogue

    out = [json.loads(p.read_text()) for p in truths[:groups]]
    if not (group_dir / CATALOGUE_NAME).exists():  # simulated before the simulator wrote one
        write_survey_catalogue(group_dir / CATALOGUE_NAME, out[0]["sources"], seed=out[0]["seed"])
    return out


def group_seconds(truth: dict) -> float:
    """Seconds of sky one group holds (309.24 s for the real correlator)."""
    return len(truth["times_jd"]) * truth["integration_s"]


def group_bytes(group_dir: Path, truth: dict) -> int:
    return sum((group_dir / name).stat().st_size for name in truth["files"])


def read_once(files: list[Path]) -> None:
    """Read files once, untimed, so a timed pass finds them in the page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def timed_copies(files: list[Path], tmpfs: Path, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` plain copies of ``files`` into a fresh directory
    in ``tmpfs`` (removed after each)."""
    walls = []
    for _ in range(max(1, repeats)):
        dest = Path(tempfile.mkdtemp(prefix="contimg-copy-", dir=tmpfs))
        try:
            t0 = time.perf_counter()
            for f in files:
                shutil.copyfile(f, dest / f.name)
            walls.append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    return walls


def daemon_dirs(work: Path) -> dict[str, Path]:
    """Fresh incoming/products/state/scratch directories under ``work`` (old ones removed)."""
    dirs = {k: work / k for k in ("incoming", "products", "state", "scratch")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    return dirs


def daemon_env(dirs: dict[str, Path], max_workers: int,
               catalogue: Path | None = None) -> dict[str, str]:
    """The daemon's settings for a benchmark: fast file stability, no API, JSON logs, and the
    simulated sky's survey catalogue as the calibration field model when there is one."""
    extra = {"CONTIMG_CAL_FIELD_CATALOGUE": str(catalogue)} if catalogue and catalogue.exists() else {}
    return {**os.environ, **extra, "CONTIMG_INPUT_DIR": str(dirs["incoming"]),
            "CONTIMG_OUTPUT_DIR": str(dirs["products"]), "CONTIMG_STATE_DIR": str(dirs["state"]),
            "CONTIMG_SCRATCH_DIR": str(dirs["scratch"]), "CONTIMG_FILE_STABLE_S": "1",
            "CONTIMG_API_ENABLED": "false", "CONTIMG_CAL_HOLD_RETRY_S": "5",
            "CONTIMG_MAX_WORKERS": str(max_workers), "CONTIMG_LOG_FORMAT": "json",
            "CONTIMG_DISK_WARN_GB": "1", "CONTIMG_DISK_CRIT_GB": "0.5"}


def drop_group(group_dir: Path, incoming: Path, truth: dict) -> None:
    """Make a group's files appear at once, as a finished correlator file does (a hard link on
    the same filesystem; a copy into a hidden name then a rename otherwise)."""
    for name in truth["files"]:
        try:
            os.link(group_dir / name, incoming / name)
        except OSError:
            tmp = incoming / f".{name}.part"
            shutil.copyfile(group_dir / name, tmp)
            os.replace(tmp, incoming / name)


@dataclass
class DaemonRun:
    arrival: str
    work: Path
    dirs: dict[str, Path]
    exit_code: int
    t_start: float
    wall_s: float
    arrivals: dict[str, float] = field(default_factory=dict)  # group id -> time.time() of drop


def run_daemon(group_dir: Path, truths: list[dict], work: Path, arrival: str,
               spacing_s: float, max_workers: int = 2, poll_s: float = 2.0) -> DaemonRun:
    """Run ``contimg run`` on the groups: ``burst`` drops all at once and uses ``--once``;
    ``realtime`` drops group k at k x ``spacing_s`` and stops the daemon (SIGTERM) once every
    group has reached a final state.

    A realtime run starts its clock when the daemon reports its workers warm: on the telescope
    the daemon has been up for hours when a group arrives. A burst run starts the daemon on
    files already there, so it includes the cold start (a restart after an outage)."""
    dirs = daemon_dirs(work)
    env = daemon_env(dirs, max_workers, group_dir / "sky_catalogue.csv")
    arrivals: dict[str, float] = {}
    if arrival == "burst":
        for t in truths:
            drop_group(group_dir, dirs["incoming"], t)
            arrivals[t["group_id"]] = time.time()
    t_start = time.time()
    with open(work / "daemon.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dsa110_contimg.cli", "run",
                                 *(["--once"] if arrival == "burst" else [])],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if arrival == "realtime":
                wait_for_event(work / "daemon.log", "executor_warm", proc)
                t_start = time.time()
                for k, t in enumerate(truths):
                    time.sleep(max(0.0, t_start + k * spacing_s - time.time()))
                    drop_group(group_dir, dirs["incoming"], t)
                    arrivals[t["group_id"]] = time.time()
                    print(f"  [{time.time() - t_start:7.1f} s] dropped {t['group_id']}", flush=True)
                db = dirs["state"] / "contimg.sqlite"
                while proc.poll() is None and count_final(db) < len(truths):
                    time.sleep(poll_s)
                proc.terminate()
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return DaemonRun(arrival, work, dirs, rc, t_start, time.time() - t_start, arrivals)


def wait_for_event(log_path: Path, event: str, proc: subprocess.Popen,
                   timeout_s: float = 120.0) -> None:
    """Until the daemon's JSON log holds ``event`` (RuntimeError if it exits or times out)."""
    needle = f'"event": "{event}"'
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if needle in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode}) before {event}: {log_path}")
        time.sleep(0.2)
    raise RuntimeError(f"no {event} in {log_path} after {timeout_s:.0f} s")


def count_final(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("SELECT count(*) FROM groups WHERE state IN (?, ?, ?)",
                           FINAL_STATES).fetchone()[0]


def queue_records(db: Path) -> tuple[list[dict], dict[str, str], dict[str, float]]:
    """(stage runs, state of each group, time each group became done) from the queue DB."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        # every column: cpu_s/peak_rss_mb/qa_s exist from queue schema v3 on
        runs = [dict(r) for r in con.execute("SELECT * FROM stage_runs ORDER BY id")]
        states = dict(con.execute("SELECT id, state FROM groups").fetchall())
        done = dict(con.execute("SELECT group_id, max(at) FROM group_events "
                                "WHERE to_state = 'done' GROUP BY group_id").fetchall())
    finally:
        con.close()
    for r in runs:
        r["metrics"] = json.loads(r["metrics"]) if r["metrics"] else {}
    return runs, states, done


# One group simulated with 3C286 transiting and converted by the conversion stage, in a child
# process (python-casacore and casatools never share a process); prints its facts as JSON.
_SIM_CONVERT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from dsa110_contimg.simulate import simulate_groups
    from dsa110_contimg.conversion.convert import ConversionInputs, convert_group
    from dsa110_contimg.conversion.options import ConversionOptions
    preset, root = sys.argv[1], Path(sys.argv[2])
    t0 = time.perf_counter()
    truth = simulate_groups(root / "raw", preset=preset, groups=1, seed=1)[0]
    t_sim = time.perf_counter() - t0
    files = tuple(root / "raw" / n for n in truth["files"])
    t0 = time.perf_counter()
    res = convert_group(ConversionInputs(truth["group_id"], files, root / "products",
                                         root / "scratch", Path("/dev/shm")), ConversionOptions())
    print(json.dumps({"ms": str(res.ms_path), "group_id": truth["group_id"],
                      "truth": str(root / "raw" / f"{truth['group_id']}_truth.json"),
                      "pointing_dec_deg": res.pointing_dec_deg, "mid_mjd": res.mid_mjd,
                      "simulate_s": t_sim, "convert_s": time.perf_counter() - t0}))
""")


def simulate_and_convert(preset: str, root: Path) -> dict:
    """Simulate and convert one ``preset`` group under ``root``; the facts the child printed."""
    r = subprocess.run([sys.executable, "-c", _SIM_CONVERT, preset, str(root)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"simulate/convert failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def set_name(new_set: str | dict) -> str:
    """The name of a calibration's new set as a group's flags record it (the set itself, or
    its name in databases from before the typed stage records)."""
    return new_set["name"] if isinstance(new_set, dict) else new_set
