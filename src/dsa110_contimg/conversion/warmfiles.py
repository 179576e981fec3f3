"""Reuse the tile files of the last published MS, so a conversion writes into warm tmpfs pages.

On a VM whose balloon driver reports freed memory to its host (virtio free page reporting),
every fresh tmpfs page is faulted in from the host again: writing a full group's 2 GB DATA
column into a new MS took 4.6-5.3 s on the bench VM, into the pages of an existing file
1.5 s. So once an MS is published, the tile files of its big columns (DATA, FLAG,
WEIGHT_SPECTRUM) are not deleted: they move, with their headers, into a small pool in the
work area, and the next conversion of the same shape moves them into its new MS before
writing. casacore then overwrites the tiles in place.

Why the result is the MS casacore would have written: a TiledShapeStMan column's header
(``table.f<seq>``) and tile file follow from the column's description, cell shape and row
count alone. An entry serves only a column whose freshly created header is byte for byte the
one the entry's MS had before it was written, with the same cell shape and row count, and the
conversion writes every row. After the swap the table is opened and each column's layout
checked (one hypercube in row order, files of exactly the right size); anything else puts the
fresh column back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from .. import mstiles
from . import staging

log = structlog.get_logger(__name__)

POOL_NAME = "warm-columns"
HEADER = "header"
COLUMNS = ("DATA", "FLAG", "WEIGHT_SPECTRUM")


@dataclass(frozen=True)
class Column:
    """A tiled column of a new MS, as an entry must match it."""

    seq: int  # its data manager's sequence number: header table.f<seq>, tiles table.f<seq>_TSM*
    key: str  # column, digest of the fresh header, cell shape and row count
    npol: int
    nchan: int
    nrows: int


Keys = dict[str, Column]


def pool_dir(work_dir: Path) -> Path:
    return Path(work_dir) / POOL_NAME


def fresh_keys(t, ms: Path, nchan: int, npol: int) -> Keys:  # noqa: ANN001 - casacore table
    """Keys of the tiled columns of a just-created main table whose rows hold no data yet
    (flushed, so the headers are on disk)."""
    keys: Keys = {}
    nrows = int(t.nrows())
    for col in COLUMNS:
        if col not in t.colnames():
            continue
        info = t.getdminfo(col)
        if info["TYPE"] != "TiledShapeStMan":
            continue
        seq = int(info["SEQNR"])
        digest = hashlib.sha256((Path(ms) / f"table.f{seq}").read_bytes()).hexdigest()[:20]
        keys[col] = Column(seq, f"{col}-{digest}-{npol}x{nchan}x{nrows}", npol, nchan, nrows)
    return keys


def _entries(pool: Path) -> list[Path]:
    """The pool's entries, oldest first (others may take or drop them at any moment)."""
    found = []
    try:
        for p in Path(pool).iterdir():
            if not p.name.startswith("."):
                try:
                    found.append((p.stat().st_mtime, p))
                except OSError:
                    pass
    except OSError:
        return []
    return [p for _, p in sorted(found)]


def _size(entry: Path) -> int:
    try:
        return sum(f.stat().st_size for f in entry.iterdir())
    except OSError:
        return 0


def _matching(pool: Path, key: str) -> list[Path]:
    """Entries made for ``key`` (named ``<key>-<pid>-<ns>``), oldest first."""
    return [e for e in _entries(pool) if e.name.startswith(key + "-")]


def _claim(pool: Path, key: str, into: Path) -> Path | None:
    """Take an entry for ``key`` out of the pool (a rename: two conversions never share one)."""
    for entry in _matching(pool, key):
        try:
            os.rename(entry, into)
            return into
        except OSError:
            continue  # taken meanwhile, or not on this filesystem
    return None


def adopt(ms: Path, keys: Keys, pool: Path) -> list[str]:
    """Move matching pool entries into the closed, unwritten MS ``ms``; return the columns
    that now have warm tile files (checked through casacore)."""
    from casacore import tables

    ms = Path(ms)
    swapped: dict[str, tuple[bytes, Path]] = {}
    for col, c in keys.items():
        seq = c.seq
        entry = _claim(pool, c.key, ms / f".warm-{col}")
        if entry is None:
            continue
        header = ms / f"table.f{seq}"
        fresh = header.read_bytes()
        try:
            tiles = [p for p in entry.iterdir() if p.name != HEADER]
            if len(tiles) != 1 or not tiles[0].name.startswith(f"table.f{seq}_TSM"):
                raise OSError(f"entry {entry.name} holds {[p.name for p in tiles]}")
            header.write_bytes((entry / HEADER).read_bytes())
            os.rename(tiles[0], ms / tiles[0].name)
            swapped[col] = (fresh, ms / tiles[0].name)
        except OSError as exc:
            header.write_bytes(fresh)
            log.warning("warm_column_unusable", column=col, error=str(exc))
        finally:
            shutil.rmtree(entry, ignore_errors=True)
    if not swapped:
        return []
    bad: list[str] = []
    try:
        with tables.table(str(ms), ack=False) as t:
            for col in swapped:
                c, tf = keys[col], mstiles.tile_file(t, col)
                if tf is None or (tf.npol, tf.nchan, tf.nrows) != (c.npol, c.nchan, c.nrows):
                    bad.append(col)
    except RuntimeError as exc:
        log.warning("warm_columns_refused", error=str(exc))
        bad = list(swapped)
    for col in bad:  # back to the column as casacore created it
        fresh, tiles = swapped.pop(col)
        (ms / f"table.f{keys[col].seq}").write_bytes(fresh)
        tiles.unlink(missing_ok=True)
        log.warning("warm_column_refused", column=col, ms=str(ms))
    return sorted(swapped)


def give_back(ms: Path, keys: Keys, pool: Path, limit: int, reserve_bytes: int) -> int:
    """Move the tile files of the published (still staged) MS ``ms`` into the pool, keeping
    at most ``limit`` entries and only while ``reserve_bytes`` of memory stay available;
    return the bytes kept."""
    import psutil

    if limit <= 0 or not keys:
        return 0
    if psutil.virtual_memory().available < reserve_bytes:
        clear(pool)
        return 0
    from casacore import tables

    ms = Path(ms)
    with tables.table(str(ms), ack=False) as t:
        files = {col: mstiles.tile_file(t, col) for col in keys}
    pool.mkdir(parents=True, exist_ok=True)
    _remove_orphans(pool)
    kept = 0
    for col, c in keys.items():
        tf = files[col]
        if tf is None:
            continue
        _evict(pool, col, limit - 1)
        tmp = pool / f".incoming-{os.getpid()}-{time.time_ns()}"
        try:
            tmp.mkdir()
            size = tf.path.stat().st_size
            shutil.copyfile(ms / f"table.f{c.seq}", tmp / HEADER)
            os.rename(tf.path, tmp / tf.path.name)
            os.rename(tmp, pool / f"{c.key}-{os.getpid()}-{time.time_ns()}")
            kept += size
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("warm_column_not_kept", column=col, error=str(exc))
    return kept


def _remove_orphans(pool: Path) -> None:
    """Half-moved entries of conversions killed mid-way (``.incoming-<pid>-…``)."""
    for stale in Path(pool).glob(".*-*-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not staging.owner_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _evict(pool: Path, col: str, keep: int) -> None:
    """Drop the oldest entries of ``col`` beyond ``keep``."""
    mine = [e for e in _entries(pool) if e.name.startswith(col + "-")]
    for entry in mine[:max(0, len(mine) - keep)]:
        _drop(entry)


def _drop(entry: Path) -> None:
    gone = entry.with_name(f".drop-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(entry, gone)  # a conversion claiming it at the same moment wins or loses whole
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def make_room(pool: Path, free: int, need: int) -> int:
    """Drop entries, oldest first, until ``free`` plus what was dropped covers ``need``
    (staging comes before warm pages); return the bytes freed."""
    freed = 0
    for entry in _entries(pool):
        if free + freed >= need:
            break
        size = _size(entry)
        _drop(entry)
        freed += size
    return freed


def clear(pool: Path, remove_dirs: bool = False) -> None:
    """Give the pool's memory back; at daemon shutdown (``remove_dirs``, nothing else running)
    also its directory and the work area's, when empty."""
    for entry in _entries(pool):
        _drop(entry)
    for stale in Path(pool).glob(".*"):
        shutil.rmtree(stale, ignore_errors=True)
    for d in (Path(pool), Path(pool).parent) if remove_dirs else ():
        try:
            d.rmdir()
        except OSError:
            break


class WarmColumns:
    """One conversion's use of the pool: adopt before writing, give back after publishing."""

    def __init__(self, pool: Path) -> None:
        self.pool = Path(pool)
        self.keys: Keys = {}
        self.adopted: list[str] = []

    def before_write(self, t, ms: Path, nchan: int, npol: int):  # noqa: ANN001, ANN201
        """Given the open, flushed, unwritten main table, adopt what the pool has for it;
        return the main table open for writing (reopened when files were swapped)."""
        from casacore import tables

        self.keys = fresh_keys(t, ms, nchan, npol)
        if not any(_matching(self.pool, c.key) for c in self.keys.values()):
            return t
        t.close()
        self.adopted = adopt(ms, self.keys, self.pool)
        return tables.table(str(ms), readonly=False, ack=False)

    def after_publish(self, ms: Path, limit: int, reserve_bytes: int) -> int:
        return give_back(ms, self.keys, self.pool, limit, reserve_bytes)
