"""The fill kernel against a plain numpy statement of what it must do.

The conversion tests run the tiny preset (4 channels a subband, one element group, short
chunk rows); here full-width subbands (48 channels, several element groups and row tiles)
in chunk shapes that straddle tiles and blocks, with NaN/Inf, zeros, file flags and
constant flags, irregular channels and mixed conjugation.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dsa110_contimg.conversion import kernel, reader

C = 299_792_458.0
NROW, NCHAN, NPOL = 300, 48, 2
CHUNKS = [(70, 2, 1), (33, 3, 2), (NROW, NCHAN, NPOL), (17, 1, 1)]
FLAG_CONST = [None, False, True, None]  # None: the file's flags are already in `flags`


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, np.ndarray]]:
    rng = np.random.default_rng(7)
    out = []
    for i, chunks in enumerate(CHUNKS):
        v = (rng.normal(size=(NROW, NCHAN, NPOL))
             + 1j * rng.normal(size=(NROW, NCHAN, NPOL))).astype(np.complex64)
        v[rng.random(v.shape) < 0.01] = np.nan
        v[rng.random(v.shape) < 0.01] = complex(np.inf, 0)
        v[rng.random(v.shape) < 0.05] = 0
        v[rng.integers(0, NROW, 20)] = 0  # dead rows
        path = tmp_path_factory.mktemp("kernel") / f"sb{i}.h5"
        with h5py.File(path, "w") as h:
            h.create_dataset("Data/visdata", data=v, chunks=chunks)
        out.append((path, v))
    return out


def _expected(vis, specs, freqs, perm, a, n, dw, flip, flags_in):
    """Per file: rows a..a+n, NaN/Inf -> 0 and flagged, zeros flagged unless already,
    phased by exp(-2 pi i dw f / c), conjugated where flip, into its output channels."""
    data = np.zeros((n, freqs.size, NPOL), np.complex64)
    flags = flags_in.copy()
    zeros, counts = 0, []
    for v, spec in zip(vis, specs, strict=True):
        chans = np.arange(spec.out_start, spec.out_start + spec.nchan)
        if spec.descending:
            chans = chans[::-1]
        x = v[a:a + n][:, :, perm]
        bad = ~np.isfinite(x)
        x = np.where(bad, 0, x)
        old = (flags[:, chans, :] if spec.flag_const is None
               else np.full(x.shape, bool(spec.flag_const)))
        zero = (x == 0) & ~bad & ~old
        ph = np.exp(-2j * np.pi * dw[:, None] * freqs[chans][None, :] / C)[:, :, None]
        out = x * ph
        data[:, chans, :] = np.where(flip[:, None, None], out.conj(), out)
        flags[:, chans, :] = old | bad | zero
        zeros += int(zero.sum())
        counts.append(int(bad.sum()))
    return data, flags, counts, zeros


@pytest.mark.parametrize(("a", "n"), [(0, NROW), (13, 200), (70, 140), (299, 1)])
def test_fill_matches_numpy(files, a, n):
    rng = np.random.default_rng(a + n)
    nf = len(files)
    freqs = np.linspace(1.3e9, 1.5e9, NCHAN * nf)
    freqs[NCHAN + 5] += 1e5  # the second file's channels are not evenly spaced
    specs = [reader.FillSpec(path=str(p), source=str(p), out_start=(nf - 1 - i) * NCHAN,
                             nchan=NCHAN, descending=bool(i % 2), flag_const=FLAG_CONST[i],
                             nsam_const=1.0) for i, (p, _) in enumerate(files)]
    perm = np.array([1, 0])
    dw = rng.normal(0, 50, n)
    flip = rng.random(n) < 0.5
    flags_in = rng.random((n, NCHAN * nf, NPOL)) < 0.3
    data = np.full((n, NCHAN * nf, NPOL), 7 + 7j, np.complex64)
    flags = flags_in.copy()
    counts = np.zeros(nf, np.int64)
    readers = [reader.SubbandReader(p) for p, _ in files]
    try:
        share = reader.Share(specs, readers, NCHAN * nf, NPOL, freqs, perm)
        assert len(share.raw) == nf  # every file read in place, by the kernel
        zeros = kernel.fill_files(share.srcs, share.starts, share.crs, share.strides,
                                  share.m_of, share.inner, share.chan_of, share.doffs,
                                  share.freqs, share.regular, share.flag_const, a, n,
                                  data.reshape(-1), flags.reshape(-1), NCHAN * nf * NPOL, dw,
                                  flip, counts)
    finally:
        for rd in readers:
            rd.close()
    want = _expected([v for _, v in files], specs, freqs, perm, a, n, dw, flip, flags_in)
    np.testing.assert_allclose(data, want[0], rtol=0, atol=2e-5)
    assert np.array_equal(flags, want[1])
    assert counts.tolist() == want[2]
    assert zeros == want[3]
