"""What ``contimg status`` and ``contimg requeue`` print, kept apart from argument parsing.

Both work on the database file directly, so they answer while the daemon runs (WAL lets a
reader in beside the daemon's writer) and when it is stopped.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config import QueueOptions
from ..errors import ConfigError
from ..products import validate_group_id
from .queue import STATES, GroupQueue

__all__ = ["requeue_group", "status_report"]

_COLUMNS = ("group", "state", "subbands", "attempts", "updated (UTC)", "note")


def _iso(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _require_db(db_path: Path) -> None:
    # Opening would create an empty queue; for a read-only report a missing file is a mistake.
    if not Path(db_path).is_file():
        raise ConfigError(f"CONTIMG_STATE_DIR: no queue database at {db_path}")


def _note(group: dict[str, Any]) -> str:
    if group["state"] in ("converting", "calibrating", "imaging"):
        return f"worker {group['worker']}, heartbeat {_iso(group['heartbeat'])}"
    if group["state"] in ("failed", "quarantined") and group["last_error"]:
        text = str(group["last_error"])
    else:
        text = group.get("state_reason") or ""
    return text.splitlines()[0][:100] if text else ""


async def status_report(db_path: Path, as_json: bool, limit: int = 50) -> str:
    """Groups per state and the most recent groups, as a table or as JSON."""
    _require_db(db_path)
    async with await GroupQueue.open(Path(db_path), QueueOptions()) as queue:
        counts = await queue.counts()
        groups = await queue.list_groups(limit=limit)
    if as_json:
        return json.dumps({"counts": counts, "groups": groups}, indent=2, sort_keys=True)
    lines = ["state        groups", "-----------  ------"]
    lines += [f"{state:<11}  {counts[state]:>6}" for state in STATES]
    lines.append(f"{'total':<11}  {sum(counts.values()):>6}")
    if groups:
        rows = [_COLUMNS] + [
            (g["id"], g["state"], str(g["n_subbands"]), str(g["attempts"]), _iso(g["updated"]),
             _note(g)) for g in groups]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        lines.append("")
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                         .rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def requeue_group(db_path: Path, group_id: str, expected_subbands: int | None = None) -> str:
    """Send a failed or quarantined group back to ``pending`` (or, stopped at ingest short of
    ``expected_subbands`` files, to ``collecting``: ingest looks for its files again);
    returns what was done.

    Raises ``InvalidName`` (malformed id), ``UnknownGroup`` or ``IllegalTransition`` (wrong
    state), each a ContimgError whose message is written for the operator.
    """
    group_id = validate_group_id(group_id)
    _require_db(db_path)
    async with await GroupQueue.open(Path(db_path), QueueOptions()) as queue:
        before = await queue.get_group(group_id)
        to = await queue.requeue(group_id, expected_subbands=expected_subbands)
    why = f" (was {before['state']}: {before['last_error']})" if before["last_error"] else ""
    return f"group {group_id} requeued to {to}{why}"
