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
