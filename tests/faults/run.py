"""Run the fault suite and print the table: ``python tests/faults/run.py [--only NAME ...]``.

Exit status 0 when every row passed (skips allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from faults.core import Row  # noqa: E402
from faults.sessions import SESSIONS  # noqa: E402
from faults.table import render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="+", choices=sorted(SESSIONS), help="run only these sessions")
    p.add_argument("--list", action="store_true", help="list the sessions and exit")
    p.add_argument("--soak-groups", type=int, default=200, help="groups in the soak session")
    p.add_argument("--workdir", help="keep every session's files here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(SESSIONS))
        return 0
    os.environ["FAULTS_SOAK_GROUPS"] = str(args.soak_groups)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="contimg-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.monotonic()
    try:
        for name in args.only or SESSIONS:
            t = time.monotonic()
            print(f"[faults] {name} ...", file=sys.stderr, flush=True)
            try:
                got = SESSIONS[name](work)
            except Exception as exc:  # noqa: BLE001 - a broken session is a failed row
                got = [Row(f"session {name}", "-", problems=[f"{type(exc).__name__}: {exc}"])]
            rows.extend(got)
            bad = sum(1 for r in got if not r.ok and not r.skipped)
            print(f"[faults] {name}: {len(got)} rows, {bad} failed, {time.monotonic() - t:.0f} s",
                  file=sys.stderr, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(render(rows, time.monotonic() - t0))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
