"""The one pass every visibility makes on its way from a UVH5 file into the MS block.

Per element: constant flags are set, NaN/Inf become 0 and flagged, exact zeros (dead
inputs) are flagged, the w-term phase is applied, rows are conjugated for CASA's
convention, and the value lands in its output channel (subbands may run in descending
frequency) and CASA polarisation order. In numpy that is seven passes over the block, most
through strided views. Here it is one compiled loop over flat offsets (no per-index
checks), walked in tiles of rows so that the many small chunks of a UVH5 file (typically
2 channels x 1 polarisation) scatter into output rows that are still in cache: ~8 ns a
visibility. One call fills a whole block from all of a thread's files without Python's
lock, so two fill threads and the MS writer run at once.

Compiled by numba on first use and cached on disk; :func:`warm` loads it ahead of time
(the daemon's forkserver does, so its workers inherit it).
"""

from __future__ import annotations

import numpy as np
from numba import njit, uintp
from numba.typed import List

C_M_S = 299792458.0
#: Rows per tile. An output row is 12 KB at full size, a multiple of 4 KB, so the rows of a
#: tile fall into one L1 cache set; 32 rows overflowed its ways (4.4 CPU-s for a full group's
#: fill), 8 fit (2.4 CPU-s).
TILE_ROWS = 8


@njit(cache=True, nogil=True, boundscheck=False)
def fill_files(srcs, starts, crs, strides, m_of, inner, chan_of, doffs, freqs, regular,
               flag_const, a, n, data, flags, dstride, dw, flip, counts):  # noqa: ANN001
    """Fill block rows ``0..n`` (file rows ``a..a+n``) of flat ``data``/``flags`` from each
    file f; add its NaN/Inf count to ``counts[f]``; return the zeros newly flagged.

    File f: values ``srcs[f]`` (flat), in chunks of ``crs[f]`` rows; chunk m of chunk row
    ri starts at ``starts[f][ri, m]`` and holds a row every ``strides[f]`` values. Element e
    (one channel and pol) is at ``inner[f][e]`` in chunk ``m_of[f][e]``, has file channel
    ``chan_of[f][e]`` (frequency ``freqs[f][c]``; ``regular``: evenly spaced, so the phasor
    follows a recurrence) and goes to ``doffs[f][e] + row * dstride``. ``flag_const[f]`` is
    the file's constant flag (0/1) or -1 when ``flags`` already holds its flags. ``dw[row]``
    is the w change (m), ``flip[row]`` says conjugate.
    """
    zeros = 0
    k = -2.0 * np.pi / C_M_S
    ds = uintp(dstride)
    b = a + n
    for f in range(len(srcs)):
        src = srcs[f]
        st = starts[f]
        cr = crs[f]
        ss = uintp(strides[f])
        mo = m_of[f]
        inn = inner[f]
        co = chan_of[f]
        do = doffs[f]
        fr = freqs[f]
        fc = flag_const[f]
        nf = fr.size
        df = fr[1] - fr[0] if nf > 1 else 0.0
        phs = np.empty((nf, TILE_ROWS), dtype=np.complex64)
        nonfinite = 0
        r = a - a % cr
        while r < b:
            lo = max(a, r) - r
            hi = min(b, r + cr) - r
            ri = r // cr
            for t0 in range(lo, hi, TILE_ROWS):
                nt = min(hi, t0 + TILE_ROWS) - t0
                r0 = r + t0 - a  # block row of chunk row t0
                for i in range(nt):
                    w = k * dw[r0 + i]
                    if regular[f]:
                        cur = np.exp(1j * w * fr[0])
                        step = np.exp(1j * w * df)
                        for c in range(nf):
                            phs[c, i] = cur
                            cur *= step
                    else:
                        for c in range(nf):
                            phs[c, i] = np.exp(1j * w * fr[c])
                for e in range(mo.size):
                    c = co[e]
                    si = uintp(st[ri, mo[e]] + inn[e]) + uintp(t0) * ss
                    di = uintp(do[e]) + uintp(r0) * ds
                    for i in range(nt):
                        if fc >= 0:
                            flags[di] = fc == 1
                        v = src[si]
                        if not (np.isfinite(v.real) and np.isfinite(v.imag)):
                            v = np.complex64(0)
                            flags[di] = True
                            nonfinite += 1
                        elif v.real == 0 and v.imag == 0 and not flags[di]:
                            flags[di] = True
                            zeros += 1
                        out = v * phs[c, i]
                        data[di] = out.conjugate() if flip[r0 + i] else out
                        si += ss
                        di += ds
            r += cr
        counts[f] += nonfinite
    return zeros


def regular(freqs: np.ndarray) -> bool:
    """Evenly spaced channels (the phasor recurrence is exact to float64 rounding)."""
    if freqs.size < 3:
        return True
    df = np.diff(freqs)
    return bool(np.allclose(df, df[0], rtol=1e-9, atol=1e-6))


def warm() -> None:
    """Load (or compile and cache) the kernel now rather than inside the first block."""
    src = np.zeros(4, dtype=np.complex64)
    src.setflags(write=False)  # file maps are read-only
    ints = np.arange(2, dtype=np.int64)
    fill_files(List([src]), List([np.zeros((1, 1), dtype=np.int64)]), np.array([2]),
               np.array([2]), List([ints * 0]), List([ints]), List([ints]), List([ints]),
               List([np.array([1.0e9, 1.1e9])]), np.array([True]), np.array([0], dtype=np.int8),
               0, 2, np.zeros(4, dtype=np.complex64), np.zeros(4, dtype=bool), 2, np.zeros(2),
               np.ones(2, dtype=bool), np.zeros(1, dtype=np.int64))
