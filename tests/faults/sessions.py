"""Every session of the suite, in the order of the issue's priorities."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import (
    bad_input,
    crash,
    environment,
    host,
    inputmount,
    neighbours,
    powerloss,
    security,
    soak,
    statefaults,
    static,
)
from .core import Row

SessionFn = Callable[[Path], list[Row]]

SESSIONS: dict[str, SessionFn] = {
    # 1. bad input
    "bad-input": bad_input.session_bad_input,
    "timeout-process": bad_input.session_timeout_process,
    # 2. security
    "security": security.session_security,
    "static": static.session_static,
    # 3. environment
    "disk": environment.session_disk,
    "ro-state": environment.session_readonly_state,
    "sqlite-lock": environment.session_sqlite,
    "workers": environment.session_workers,
    "input-mount": inputmount.session_input_mount,
    "clock": host.session_clock,
    "oom": host.session_oom,
    "sqlite-corrupt": statefaults.session_sqlite_corrupt,
    "second-daemon": statefaults.session_second_daemon,
    "state-disk-full": statefaults.session_state_disk_full,
    "db-lock-completion": statefaults.session_db_lock_completion,
    # 4. neighbours
    "neighbours": neighbours.session_neighbours,
    # 5. crashes
    "crash": crash.session_crash,
    "reboot": crash.session_reboot,
    "power-cut": powerloss.session_powerloss,
    # 6. soak
    "soak": soak.session_soak,
}
