"""The fault and abuse suite (tests/faults/) under pytest: one test per session.

Each session drives the real daemon as a subprocess and returns table rows; a test fails
when any of its rows has a problem (lost or duplicated groups, a missing reason, alert or
refusal...). ``make faults`` runs the same sessions and prints the whole table. The soak
runs ``FAULTS_SOAK_GROUPS`` groups (6 here unless set) to stay within the CI budget.
"""

from __future__ import annotations

import os

import pytest

from faults.powercut import unavailable
from faults.sessions import SESSIONS
from faults.table import render

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _soak_size(monkeypatch):
    monkeypatch.setenv("FAULTS_SOAK_GROUPS", os.environ.get("FAULTS_SOAK_GROUPS", "6"))


@pytest.mark.parametrize("name", list(SESSIONS))
def test_fault_session(name, tmp_path, capsys):
    if name == "power-cut" and unavailable():
        pytest.skip(f"power-cut filesystem unavailable: {unavailable()}")
    rows = SESSIONS[name](tmp_path)
    table = render(rows)
    with capsys.disabled():
        print(f"\n[{name}]\n{table}")
    assert rows, f"session {name} produced no rows"
    failed = [r for r in rows if not r.ok and not r.skipped]
    assert not failed, f"{len(failed)} row(s) of {name} failed:\n{table}"
