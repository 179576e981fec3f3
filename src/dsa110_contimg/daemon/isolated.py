"""Run one stage call in a fresh interpreter: ``python -m dsa110_contimg.daemon.isolated IN OUT``.

Dask workers are long-lived (and daemonic) processes; CASA is not thread-safe and
python-casacore and casatools must not share a process, so each task on a Dask worker runs
its stage in a child interpreter, exactly as the local pool gives every task a fresh process.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from typing import Any


def run_isolated(fn: Any, args: tuple, group_id: str | None = None, timeout: float | None = None,
                 with_usage: bool = False, nice: int = 0) -> Any:
    """The call's result; with ``with_usage``, (result, TaskUsage the child measured)."""
    with tempfile.TemporaryDirectory(prefix="contimg-task-") as tmp:
        src, dst = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(src, "wb") as fh:
            pickle.dump((fn, args, group_id, nice), fh)
        proc = subprocess.run([sys.executable, "-m", "dsa110_contimg.daemon.isolated", src, dst],
                              stdin=subprocess.DEVNULL, timeout=timeout)
        if not os.path.exists(dst):
            from ..errors import StageError

            raise StageError(f"isolated worker for {getattr(fn, '__name__', fn)} died "
                             f"(exit code {proc.returncode})")
        with open(dst, "rb") as fh:
            ok, value, usage = pickle.load(fh)
    if ok:
        return (value, usage) if with_usage else value
    raise value


def _main(src: str, dst: str) -> int:
    from .worker import TaskUsage, call_stage

    with open(src, "rb") as fh:
        fn, args, group_id, nice = pickle.load(fh)
    try:
        out = (True, call_stage(fn, args, group_id, nice))
    except BaseException as exc:  # noqa: BLE001 - the parent re-raises it
        out = (False, exc)
    usage = TaskUsage.of_this_process()
    tmp = dst + ".tmp"
    with open(tmp, "wb") as fh:
        try:
            pickle.dump((*out, usage), fh)
        except Exception as exc:  # unpicklable exception: send its text
            fh.seek(0)
            fh.truncate()
            pickle.dump((False, RuntimeError(f"{type(out[1]).__name__}: {out[1]} ({exc})"),
                         usage), fh)
    os.replace(tmp, dst)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
