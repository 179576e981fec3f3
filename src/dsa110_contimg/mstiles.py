"""Where a column's rows lie in casacore's tiled storage file, for the layout the conversion
writes: one TiledShapeStMan hypercube, in row order, whose tiles hold whole rows.

Two users: the conversion publishes the rows the MS gate will sample through the page cache,
and the gate maps them instead of asking casacore. Any other layout (several hypercubes,
rows out of cube order, tiles that split channels) gives None, and callers use casacore.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_TYPES = {"boolean": "u1", "complex": "c8", "dcomplex": "c16", "float": "f4", "double": "f8"}


@dataclass(frozen=True)
class TileFile:
    path: Path
    npol: int
    nchan: int
    tile_rows: int
    bucket: int  # bytes per tile
    dtype: np.dtype  # element type in file byte order; uint8 for booleans (one bit each)
    nrows: int

    @property
    def bits(self) -> bool:
        return self.dtype.kind == "u"

    def tiles_of(self, start: int, nrow: int) -> tuple[int, int]:
        return start // self.tile_rows, (start + nrow - 1) // self.tile_rows

    def byte_range(self, start: int, nrow: int) -> tuple[int, int]:
        """(offset, length) of the whole tiles holding rows ``start`` … ``start + nrow - 1``."""
        first, last = self.tiles_of(start, nrow)
        return first * self.bucket, (last - first + 1) * self.bucket

    def _mmap(self, start: int, stop: int, writable: bool) -> tuple[mmap.mmap, int]:
        """Bytes ``start`` … ``stop - 1`` of the file mapped (from the page boundary below
        ``start``), and where ``start`` lies in the map. Writable maps are shared and
        faulted in at once."""
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "r+b" if writable else "rb") as fh:
            if writable:
                mm = mmap.mmap(fh.fileno(), stop - aligned, offset=aligned,
                               flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                mm = mmap.mmap(fh.fileno(), stop - aligned, offset=aligned, prot=mmap.PROT_READ)
        return mm, start - aligned

    def map(self, first: int, last: int) -> memoryview:
        """Tiles ``first`` … ``last``, mapped read-only (no copy)."""
        mm, skip = self._mmap(first * self.bucket, (last + 1) * self.bucket, writable=False)
        return memoryview(mm)[skip:]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` … ``stop - 1`` (padding rows of the last tile included), mapped
        writable as (rows, nchan, npol) with the pages faulted in at once: writes land in
        the file. Unmapped when the array and its views are gone."""
        if self.bits:
            raise ValueError("rows of a bit column cannot be viewed as an array")
        row_bytes = self.npol * self.nchan * self.dtype.itemsize
        mm, skip = self._mmap(start * row_bytes, stop * row_bytes, writable=True)
        return np.frombuffer(mm, dtype=self.dtype, count=(stop - start) * self.npol * self.nchan,
                             offset=skip).reshape(stop - start, self.nchan, self.npol)

    @property
    def padded_rows(self) -> int:
        return -(-self.nrows // self.tile_rows) * self.tile_rows


def tile_file(t: Any, col: str) -> TileFile | None:
    """The storage file of ``col`` in the open table ``t``, or None for any other layout.

    The file must have exactly the size its tiles need, so it has to be flushed."""
    try:
        info = t.getdminfo(col)
        spec = info["SPEC"]
        cubes = list(spec["HYPERCUBES"].values())
        if info["TYPE"] != "TiledShapeStMan" or len(cubes) != 1 or int(spec["IndexSize"]) != 1:
            return None  # several cubes or row runs: rows are not in cube order
        cube, tile = (np.asarray(cubes[0][k], dtype=np.int64) for k in ("CubeShape", "TileShape"))
        nrows = int(t.nrows())
        if cube.size != 3 or not np.array_equal(tile[:2], cube[:2]) or cube[2] != nrows:
            return None
        npol, nchan, tile_rows = (int(v) for v in tile)
        dtype = np.dtype(_TYPES[t.coldatatype(col)])
        if dtype.kind == "u":  # booleans: bits, each row starting on a byte
            if (npol * nchan) % 8:
                return None
            size = npol * nchan * tile_rows // 8
        else:
            dtype = dtype.newbyteorder("<" if t.endianformat() == "little" else ">")
            size = npol * nchan * tile_rows * dtype.itemsize
        bucket = int(cubes[0]["BucketSize"])
        if bucket != size:
            return None
        n_tiles = -(-nrows // tile_rows)
        files = [f for f in Path(t.name()).glob(f"table.f{int(info['SEQNR'])}_TSM*")
                 if f.stat().st_size == n_tiles * bucket]
        if len(files) != 1:
            return None
        return TileFile(files[0], npol, nchan, tile_rows, bucket, dtype, nrows)
    except (KeyError, ValueError, OSError, RuntimeError):
        return None


def sample_time_indices(n_times: int, n: int) -> list[int]:
    """Which of ``n_times`` integrations the gate reads visibilities of: up to ``n`` spread
    over the group (one: the middle, away from edge effects of the first and last). The
    conversion publishes these through the page cache, so both sides use this one rule."""
    n = min(n, n_times)
    at = np.linspace(0, n_times - 1, n) if n > 1 else np.array([(n_times - 1) // 2])
    return [int(i) for i in np.unique(at.round().astype(int))]
