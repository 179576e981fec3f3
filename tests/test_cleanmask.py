"""The scipy clean mask follows auto-multithresh's rules on images with known content."""

from __future__ import annotations

import numpy as np
import pytest

from dsa110_contimg.imaging.cleanmask import (
    MaskRules,
    beam_kernel,
    build_mask,
    psf_sidelobe,
    robust_rms,
)

N = 256
BMAJ, BMIN, BPA = 8.0, 4.0, 0.0  # pixels, degrees
AREA = np.pi / (4 * np.log(2)) * BMAJ * BMIN


def _sky(sources: list[tuple[int, int, float]], rms: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, rms, (N, N))
    k = beam_kernel(BMAJ, BMIN, BPA)
    h = k.shape[0] // 2
    for y, x, flux in sources:
        img[y - h:y + h + 1, x - h:x + h + 1] += flux * k
    return img


def test_robust_rms_ignores_sources():
    img = _sky([(60, 60, 50.0), (180, 150, 20.0)], rms=0.01)
    assert robust_rms(img) == pytest.approx(0.01, rel=0.05)


def test_beam_kernel_is_elongated_along_the_position_angle():
    north = beam_kernel(BMAJ, BMIN, 0.0)
    east = beam_kernel(BMAJ, BMIN, 90.0)
    c = north.shape[0] // 2
    # half power at half the FWHM along each axis
    assert north[c + 4, c] == pytest.approx(0.5, rel=0.01)   # +y (north) is the major axis
    assert north[c, c + 2] == pytest.approx(0.5, rel=0.01)
    assert east[c, c - 4] == pytest.approx(0.5, rel=0.01)    # east is -x in CASA images
    assert north.max() == pytest.approx(1.0)


def test_psf_sidelobe_is_measured_outside_the_main_lobe():
    psf = beam_kernel(BMAJ, BMIN, 0.0)
    big = np.zeros((N, N), dtype=np.float32)
    h = psf.shape[0] // 2
    big[128 - h:128 + h + 1, 128 - h:128 + h + 1] = psf
    big[128, 170] = 0.31  # a sidelobe 42 pixels east of the peak
    assert psf_sidelobe(big, BMAJ) == pytest.approx(0.31, rel=1e-6)


def test_sources_above_threshold_are_masked_noise_and_faint_ones_are_not():
    rms = 0.01
    img = _sky([(60, 60, 1.0), (180, 150, 0.1), (200, 40, 0.02)], rms)
    img[100, 200] = 0.2  # a one-pixel spike: far less than a third of a beam
    mask, info = build_mask(img, robust_rms(img), 0.0, beam_kernel(BMAJ, BMIN, BPA), AREA,
                            MaskRules())
    assert mask[60, 60] and mask[180, 150]
    assert not mask[200, 40]  # 2 sigma: below the 4.25 sigma seed threshold
    assert not mask[100, 200]  # pruned
    assert info.regions == 2 and info.pruned >= 1
    assert info.threshold_jy == pytest.approx(4.25 * info.rms_jy)
    # widened by about a beam around each source, not flooding the image
    assert mask[60 + 8, 60] and mask.mean() < 0.05


def test_sidelobe_threshold_keeps_a_bright_sources_sidelobes_out():
    rms = 0.01
    # 'sidelobes' of a 10 Jy source at 3 % are bright features 30x the noise
    img = _sky([(60, 60, 10.0), (180, 150, 0.3), (200, 200, 0.3)], rms)
    loose, _ = build_mask(img, rms, 0.0, beam_kernel(BMAJ, BMIN, BPA), AREA, MaskRules())
    strict, info = build_mask(img, rms, 0.05, beam_kernel(BMAJ, BMIN, BPA), AREA, MaskRules())
    assert loose[180, 150] and loose[200, 200]
    assert info.threshold_jy == pytest.approx(0.05 * info.peak_jy)
    assert strict[60, 60] and not strict[180, 150] and not strict[200, 200]


def test_previous_mask_is_kept_and_grows_into_connected_low_level_emission():
    rms = 0.01
    img = _sky([(128, 128, 0.2)], rms)
    # an extended ridge at 3 sigma touching the source: mostly below the seed threshold
    img[126:131, 128:200] += 0.03
    previous = np.zeros((N, N), dtype=bool)
    previous[120:137, 124:133] = True
    previous[10:14, 10:14] = True  # an old region with nothing left in it: kept
    mask, _ = build_mask(img, rms, 0.0, beam_kernel(BMAJ, BMIN, BPA), AREA, MaskRules(),
                         previous)
    assert mask[10:14, 10:14].all()
    assert mask[128, 190]  # the ridge was grown into
    fresh, _ = build_mask(img, rms, 0.0, beam_kernel(BMAJ, BMIN, BPA), AREA, MaskRules())
    assert mask[126:131, 140:200].all() and not fresh[126:131, 140:200].all()


def test_pure_noise_gives_an_empty_mask():
    img = _sky([], 0.01, seed=3)
    mask, info = build_mask(img, robust_rms(img), 0.2, beam_kernel(BMAJ, BMIN, BPA), AREA,
                            MaskRules())
    assert not mask.any() and info.regions == 0
