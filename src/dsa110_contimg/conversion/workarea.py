"""The tmpfs work area: where a group's MS lives from conversion until the group is finished.

Calibration and imaging read the whole MS several times and write flags and CORRECTED_DATA
(as big again); in RAM that costs no disk writeback, and conversion ends with a rename
instead of a 2 GB copy and fsync. When the group leaves the pipeline (done, quarantined or
failed) :func:`archive_ms` moves the MS to its product directory, where it would otherwise
have been published at conversion.

An MS is kept only while memory allows (:func:`room_to_keep`); otherwise conversion
publishes to disk as before. A reboot empties tmpfs: :func:`locate_ms` then finds nothing
and the scheduler converts the group again from its raw files, which are never touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

from ..products import product_dir, safe_stem
from .publish import publish
from .staging import free_bytes

WORK_PREFIX = "contimg-work-"
#: written into a kept MS before it is archived; the same token in the product copy means
#: a crash came after the copy was complete (so the work copy can simply go)
ARCHIVE_MARK = "contimg_archive.json"


def work_dir(tmpfs_path: Path, state_dir: Path) -> Path:
    """This daemon's work area: named after its state directory, so daemons (or test runs)
    sharing one tmpfs never see, skip on or archive each other's MSs."""
    key = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]
    return Path(tmpfs_path) / (WORK_PREFIX + key)


def work_ms_path(work: Path, group_id: str) -> Path:
    return Path(work) / (safe_stem(group_id) + ".ms")


def flag_versions(ms: Path) -> Path:
    """Where CASA's flagdata keeps its flag backups for ``ms``: beside it."""
    return ms.with_name(ms.name + ".flagversions")


def group_of(ms: Path) -> str | None:
    """The group id of a work-area MS name (``2026-06-01T044410.ms``), or None."""
    stem = ms.name.removesuffix(".ms")
    gid = f"{stem[:13]}:{stem[13:15]}:{stem[15:]}"
    try:
        product_dir(Path("."), gid)
    except Exception:
        return None
    return gid if safe_stem(gid) == stem else None


def kept_ms(work: Path) -> list[Path]:
    try:
        return sorted(p for p in Path(work).glob("*.ms") if p.is_dir())
    except OSError:
        return []


def room_to_keep(work: Path, ms_bytes: int, reserve_bytes: int) -> tuple[bool, str]:
    """Whether an MS of ``ms_bytes`` (already staged in tmpfs) may stay there.

    Every kept MS still grows by about its own size (CORRECTED_DATA); counting that for this
    one and each already kept (all groups are the same size), memory available and tmpfs
    free space must both stay above ``reserve_bytes``.
    """
    import psutil

    growth = ms_bytes * (1 + len(kept_ms(work)))
    avail = psutil.virtual_memory().available
    free = free_bytes(Path(work).parent)
    ok = avail - growth >= reserve_bytes and free - growth >= reserve_bytes
    return ok, (f"{avail / 1e9:.1f} GB memory available, {free / 1e9:.1f} GB tmpfs free; "
                f"kept MSs may grow by {growth / 1e9:.1f} GB; reserve {reserve_bytes / 1e9:.1f} GB")


def is_ms(path: Path) -> bool:
    return (Path(path) / "table.dat").is_file()


def locate_ms(recorded: Path, final: Path) -> Path | None:
    """Where a group's MS is now: where conversion put it, else archived, else None (lost)."""
    for p in (Path(recorded), Path(final)):
        if is_ms(p):
            return p
    return None


def archive_ms(work: Path, final: Path, fsync: bool = True, direct: bool = True) -> Path:
    """Move a kept MS to its product place (atomically, as conversion publishes), with its
    flag backups; return it.

    Idempotent: without a work copy there is nothing to do, and a product copy carrying
    this work copy's token is the result of an archive interrupted after its rename.
    """
    work, final = Path(work), Path(final)
    versions = flag_versions(work)
    if versions.is_dir():  # first: the MS's presence is what says "not archived yet"
        dest = flag_versions(final)
        if dest.exists():
            shutil.rmtree(dest)
        publish(versions, dest, fsync=fsync, direct=direct)
        shutil.rmtree(versions, ignore_errors=True)
    if not is_ms(work):
        return final
    mark = work / ARCHIVE_MARK
    if not mark.is_file():
        mark.write_text(json.dumps({"token": uuid.uuid4().hex, "from": str(work),
                                    "started": time.time()}))
    token = mark.read_text()
    try:
        done = (final / ARCHIVE_MARK).read_text() == token
    except OSError:
        done = False
    if not done:
        publish(work, final, fsync=fsync, direct=direct)
    shutil.rmtree(work, ignore_errors=True)
    return final
