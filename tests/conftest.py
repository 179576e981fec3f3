"""Shared fixtures: CASA offline for the test process, and small simulated groups with truth."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsa110_contimg.casa_env import prepare_casa

ROOT = Path(__file__).resolve().parent.parent
TEST_STATE = ROOT / ".test-state"
# Before anything imports casatools: CASA reads its site config at import time.
prepare_casa(TEST_STATE)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _no_daemon_left_running():
    """A test that fails mid-way must not leave its daemon (and CASA workers) running."""
    yield
    from daemon_harness import Daemon

    Daemon.reap_all()


@pytest.fixture(scope="session")
def casa_state_dir() -> Path:
    return TEST_STATE


def _simulate(root: Path, **kw) -> list[dict]:
    from dsa110_contimg.simulate import simulate_groups

    return simulate_groups(root, **kw)


@pytest.fixture(scope="session")
def tiny_group(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny group with 3C286 transiting: (directory, truth)."""
    root = tmp_path_factory.mktemp("tiny_group")
    truth = _simulate(root, preset="tiny", groups=1, seed=1)[0]
    return root, truth


@pytest.fixture(scope="session")
def tiny_two_groups(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two consecutive tiny groups: the calibrator transits in the first only."""
    root = tmp_path_factory.mktemp("tiny_two")
    truths = _simulate(root, preset="tiny", groups=2, seed=2)
    return root, truths


def group_files(root: Path, truth: dict) -> list[Path]:
    return sorted(root / name for name in truth["files"])


def load_truth(path: Path) -> dict:
    return json.loads(path.read_text())


def convert_groups_isolated(root: Path, truths: list[dict], out: Path, **options) -> list:
    """Convert simulated groups in a fresh process (as the daemon does), returning the
    ``ConversionResult``s. python-casacore stays out of the test process, which may use
    casatools (the two must not share a process)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from dsa110_contimg.conversion.convert import ConversionInputs, convert_group
    from dsa110_contimg.conversion.options import ConversionOptions

    opts = ConversionOptions(**{"publish_fsync": False, **options})
    jobs = [ConversionInputs(group_id=t["group_id"], files=tuple(group_files(root, t)),
                             output_dir=out / "products", scratch_dir=out / "scratch",
                             tmpfs_path=Path("/dev/shm")) for t in truths]
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return [ex.submit(convert_group, job, opts).result() for job in jobs]


@pytest.fixture(scope="session")
def tiny_ms(tiny_group, tmp_path_factory) -> Path:
    """The ``tiny_group`` converted to a Measurement Set (truth: ``tiny_group[1]``).

    Single SPW of 64 ascending channels, XX/YY, rows = 153 baselines x 6 times, phased to
    the meridian at the group's mid-time; ANTENNA rows are indexed by antenna number
    (padding rows flagged). Shared by the session: copy it before modifying it.
    """
    root, truth = tiny_group
    return convert_groups_isolated(root, [truth], tmp_path_factory.mktemp("tiny_ms"))[0].ms_path


@pytest.fixture(scope="session")
def tiny_two_ms(tiny_two_groups, tmp_path_factory) -> list[Path]:
    """Both groups of ``tiny_two_groups`` as Measurement Sets, in time order (copy before
    modifying)."""
    root, truths = tiny_two_groups
    results = convert_groups_isolated(root, truths, tmp_path_factory.mktemp("tiny_two_ms"))
    return [r.ms_path for r in results]
