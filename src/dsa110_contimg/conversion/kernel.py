"""The one pass every visibility makes on its way from a UVH5 file into the MS block.

Per element: constant flags are set, NaN/Inf become 0 and flagged, exact zeros (dead
inputs) are flagged, the w-term phase is applied, rows are conjugated for CASA's
convention, and the value lands in its output channel (subbands may run in descending
frequency) and CASA polarisation order. In numpy that is seven passes over the block, most
through strided views. Here it is one compiled loop over flat offsets (no per-index
checks). A UVH5 file holds many small chunks (typically 2 channels x 1 polarisation, each
a run of rows), so filling MS rows is a transpose: tiles of rows are walked row by row,
16 chunks at a time, so that the reads (as many streams as the prefetcher follows) and
the writes (along the output rows) both run sequentially. That takes half the time of
scattering one element at a time down rows 12 KB apart (a full group's fill: 1.7 against
3.1 CPU-s, one thread). One call fills a whole block from all of a thread's files without
Python's lock, so two fill threads and the MS writer run at once.

Compiled by numba on first use and cached on disk; :func:`warm` loads it ahead of time
(the daemon's forkserver does, so its workers inherit it).
"""

from __future__ import annotations

import numpy as np
from numba import njit, uintp
from numba.typed import List

from ..instrument import C_M_S

#: Rows per tile: the phasors of a tile (rows x a file's channels, complex64) stay in L1.
TILE_ROWS = 64
#: Elements (channel x pol) per pass over a tile's rows: 16 two-channel chunks of a UVH5
#: file are as many read streams as the hardware prefetcher follows; all 48 at once (or
#: walking one element down the rows, scattering to 12 KB-apart rows) ran 2-3x slower.
GROUP = 32


@njit(cache=True, nogil=True, boundscheck=False)
def _phasors(phs, dw, rows, fr, even):  # noqa: ANN001
    """``phs[i, c] = exp(-2 pi i dw[rows + i] fr[c] / c)``; evenly spaced channels by a
    recurrence kept as four independent chains (one chain waits on each multiply)."""
    k = -2.0 * np.pi / C_M_S
    nf = fr.size
    for i in range(phs.shape[0]):
        w = k * dw[rows + i]
        if even and nf >= 4:
            s1 = np.exp(1j * w * (fr[1] - fr[0]))
            s4 = s1 * s1
            s4 = s4 * s4
            c0 = np.exp(1j * w * fr[0])
            c1 = c0 * s1
            c2 = c1 * s1
            c3 = c2 * s1
            for c in range(0, nf - 3, 4):
                phs[i, c] = c0
                phs[i, c + 1] = c1
                phs[i, c + 2] = c2
                phs[i, c + 3] = c3
                c0 *= s4
                c1 *= s4
                c2 *= s4
                c3 *= s4
            for c in range(nf - nf % 4, nf):
                phs[i, c] = np.exp(1j * w * fr[c])
        else:
            for c in range(nf):
                phs[i, c] = np.exp(1j * w * fr[c])


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

    Each tile of rows is walked twice: the values (a group of elements at a time, row by
    row, so the stores run along the output rows), then the flags from the same, still
    cached, values. One pass doing both was 1.5x slower: the byte stores interleaved with
    the value stores.
    """
    zeros = 0
    ds = uintp(dstride)
    b = a + n
    for f in range(len(srcs)):
        src = srcs[f]
        st = starts[f]
        cr = crs[f]
        ss = uintp(strides[f])
        mo = m_of[f]
        co = chan_of[f]
        do = doffs[f]
        fr = freqs[f]
        fc = flag_const[f]
        ne = mo.size
        phs = np.empty((TILE_ROWS, fr.size), dtype=np.complex64)
        base = np.empty(ne, dtype=np.uintp)
        nonfinite = 0
        r = a - a % cr
        while r < b:
            lo = max(a, r) - r
            hi = min(b, r + cr) - r
            ri = r // cr
            for e in range(ne):
                base[e] = uintp(st[ri, mo[e]] + inner[f][e])
            for t0 in range(lo, hi, TILE_ROWS):
                t1 = min(hi, t0 + TILE_ROWS)
                _phasors(phs[:t1 - t0], dw, r + t0 - a, fr, regular[f])
                for g0 in range(0, ne, GROUP):
                    g1 = min(ne, g0 + GROUP)
                    for t in range(t0, t1):
                        row = r + t - a  # block row
                        so = uintp(t) * ss
                        dro = uintp(row) * ds
                        p = phs[t - t0]
                        fl = flip[row]
                        for e in range(g0, g1):
                            v = src[base[e] + so]
                            if not (np.isfinite(v.real) and np.isfinite(v.imag)):
                                v = np.complex64(0)
                            out = v * p[co[e]]
                            data[uintp(do[e]) + dro] = out.conjugate() if fl else out
                for t in range(t0, t1):
                    so = uintp(t) * ss
                    dro = uintp(r + t - a) * ds
                    for e in range(ne):
                        di = uintp(do[e]) + dro
                        v = src[base[e] + so]
                        old = flags[di] if fc < 0 else fc == 1
                        if not (np.isfinite(v.real) and np.isfinite(v.imag)):
                            nonfinite += 1
                            flags[di] = True
                        elif v.real == 0 and v.imag == 0 and not old:
                            zeros += 1
                            flags[di] = True
                        else:
                            flags[di] = old
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
