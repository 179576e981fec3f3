"""The primary-beam model: one setting, its two forms, and what it does to pb-corrected fluxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsa110_contimg.config import load_settings
from dsa110_contimg.errors import ConfigError
from dsa110_contimg.instrument import C_M_S, PrimaryBeam, airy_power

F = 1.405e9
LAM_D = C_M_S / F / 4.65  # lambda / D in radians


def test_airy_is_the_uniform_dish_and_gaussian_has_its_fwhm():
    airy = PrimaryBeam.airy(4.65)
    theta = np.radians(np.linspace(0, 2.5, 50))
    assert np.allclose(airy.power(theta, F), airy_power(theta, F, 4.65))
    assert float(airy.power(0.0, F)) == pytest.approx(1.0)
    # Airy FWHM ~ 1.029 lambda/D
    assert 2 * airy.radius_at_level(0.5, F) == pytest.approx(math.degrees(1.029 * LAM_D), rel=2e-3)
    g = PrimaryBeam("gaussian", 4.65, 1.2)
    assert float(g.power(0.0, F)) == pytest.approx(1.0)
    assert float(g.power(0.6 * LAM_D, F)) == pytest.approx(0.5, rel=1e-9)  # FWHM/2
    assert 2 * g.radius_at_level(0.5, F) == pytest.approx(math.degrees(1.2 * LAM_D), rel=1e-6)
    # wider than the Airy pattern of the same dish: more flux off axis
    assert float(g.power(np.radians(1.5), F)) > float(airy.power(np.radians(1.5), F))
    # scales with frequency
    assert float(g.power(0.6 * LAM_D, 2 * F)) < 0.5
    with pytest.raises(ValueError, match="beam model"):
        PrimaryBeam("cosine")


def test_beam_is_one_setting():
    s = load_settings(environ={"CONTIMG_BEAM_MODEL": "gaussian",
                               "CONTIMG_BEAM_GAUSSIAN_FACTOR": "1.1",
                               "CONTIMG_BEAM_DISH_DIAMETER_M": "4.7"})
    beam = PrimaryBeam.from_options(s.beam)
    assert beam == PrimaryBeam("gaussian", 4.7, 1.1)
    assert "gaussian" in beam.describe() and "4.7" in beam.describe()
    assert PrimaryBeam.from_options(load_settings(environ={}).beam) == PrimaryBeam()
    with pytest.raises(ConfigError, match="CONTIMG_BEAM_MODEL"):
        load_settings(environ={"CONTIMG_BEAM_MODEL": "top-hat"})


def _fits(path, ra0=200.0, dec0=30.0, n=201, cell_arcsec=60.0, value=1.0):
    from astropy.io import fits

    h = fits.Header()
    h["NAXIS"] = 2
    h["CTYPE1"], h["CTYPE2"] = "RA---SIN", "DEC--SIN"
    h["CRVAL1"], h["CRVAL2"] = ra0, dec0
    h["CRPIX1"] = h["CRPIX2"] = (n + 1) / 2
    h["CDELT1"], h["CDELT2"] = -cell_arcsec / 3600, cell_arcsec / 3600
    h["BUNIT"] = "Jy/beam"
    fits.PrimaryHDU(np.full((n, n), value, dtype=np.float32), h).writeto(path)
    return path


@pytest.mark.parametrize("beam", [PrimaryBeam.airy(4.65), PrimaryBeam("gaussian", 4.65, 1.2)],
                         ids=["airy", "gaussian"])
def test_pbcor_divides_by_the_configured_beam_and_records_it(tmp_path, beam):
    """An image of constant apparent brightness: after correction each pixel is 1/beam at its
    offset from the (single-pointing) track; the header names the model."""
    from astropy.io import fits

    from dsa110_contimg.imaging.pbcor import write_beam_and_pbcor

    img = _fits(tmp_path / "img.fits")
    pb = write_beam_and_pbcor(img, tmp_path / "pb.fits", tmp_path / "pbcor.fits",
                              np.array([200.0]), np.array([30.0]), None, F, beam, 0.05)
    with fits.open(tmp_path / "pbcor.fits") as h:
        data, header = h[0].data, h[0].header
    assert header["PBMODEL"] == beam.describe()
    with fits.open(tmp_path / "pb.fits") as h:
        assert h[0].header["PBMODEL"] == beam.describe()
    # one degree north of the centre (60 pixels of 1 arcmin)
    expected = float(beam.power(np.radians(1.0), F))
    assert float(pb[160, 100]) == pytest.approx(expected, rel=1e-3)
    assert float(data[160, 100]) == pytest.approx(1.0 / expected, rel=1e-3)
    assert np.isnan(data[pb < 0.05]).all()


def test_the_two_models_differ_by_tens_of_percent_at_half_power(tmp_path):
    """The systematic the setting exists for: at the Airy half-power radius the tapered
    (1.2 lambda/D Gaussian) beam is ~13 % higher, so fluxes there differ by that much."""
    from dsa110_contimg.imaging.pbcor import write_beam_and_pbcor

    img = _fits(tmp_path / "img.fits")
    out = {}
    for beam in (PrimaryBeam.airy(), PrimaryBeam("gaussian", 4.65, 1.2)):
        d = tmp_path / beam.kind
        d.mkdir()
        write_beam_and_pbcor(img, d / "pb.fits", d / "pbcor.fits", np.array([200.0]),
                             np.array([30.0]), None, F, beam, 0.05)
        from astropy.io import fits

        with fits.open(d / "pbcor.fits") as h:
            out[beam.kind] = h[0].data.copy()
    r = PrimaryBeam.airy().radius_at_level(0.5, F)
    row = 100 + int(round(r * 60))
    ratio = out["airy"][row, 100] / out["gaussian"][row, 100]
    assert 1.05 < ratio < 1.3


def _gaussian_fits(path, fwhm_l_deg=2.0, fwhm_m_deg=1.2, freqs=None, scale_on_axis=1.0):
    """An elliptical Gaussian power pattern on an (L, M[, FREQ]) grid; with ``freqs`` the
    widths scale as 1/frequency (reference: the first)."""
    from astropy.io import fits

    n = 201
    ax = np.linspace(-0.08, 0.08, n)  # direction cosines (~ +-4.6 deg)
    mm, ll = np.meshgrid(ax, ax, indexing="ij")
    planes = []
    for f in (freqs if freqs is not None else [None]):
        k = 1.0 if f is None else freqs[0] / f
        sl, sm = np.radians(fwhm_l_deg) * k, np.radians(fwhm_m_deg) * k
        planes.append(scale_on_axis * np.exp(-4 * np.log(2) * ((ll / sl) ** 2 + (mm / sm) ** 2)))
    data = np.array(planes if freqs is not None else planes[0], dtype=np.float32)
    h = fits.Header()
    h["CTYPE1"], h["CRVAL1"], h["CRPIX1"], h["CDELT1"] = "L", 0.0, 101.0, float(ax[1] - ax[0])
    h["CTYPE2"], h["CRVAL2"], h["CRPIX2"], h["CDELT2"] = "M", 0.0, 101.0, float(ax[1] - ax[0])
    if freqs is not None:
        h["CTYPE3"], h["CRVAL3"], h["CRPIX3"] = "FREQ", float(freqs[0]), 1.0
        h["CDELT3"] = float(freqs[1] - freqs[0])
    fits.PrimaryHDU(data, h).writeto(path)
    return path


def _fits_beam(path, **kw) -> PrimaryBeam:
    from dsa110_contimg.instrument import BeamOptions

    return PrimaryBeam.from_options(BeamOptions(kind="fits", fits_path=str(_gaussian_fits(path,
                                                                                          **kw))))


def test_fits_beam_is_read_in_the_dish_frame(tmp_path):
    beam = _fits_beam(tmp_path / "beam.fits")
    s = math.sin(math.radians(1.0))
    # FWHM 2 deg along azimuth, 1.2 deg along elevation: half power at 1 and 0.6 deg
    assert float(beam.power_lm(s, 0.0, F)) == pytest.approx(0.5, abs=0.01)
    assert float(beam.power_lm(0.0, math.sin(math.radians(0.6)), F)) == pytest.approx(0.5, abs=0.01)
    assert float(beam.power_lm(0.2, 0.0, F)) == 0.0  # off the grid
    assert beam.describe() == "fits beam.fits" and beam.as_dict()["sha256"]
    assert 2 * beam.radius_at_level(0.5, F) == pytest.approx(2.0, abs=0.02)  # the wider axis
    # with a frequency axis the pattern is interpolated between planes
    fb = _fits_beam(tmp_path / "beam3.fits", freqs=[1.3e9, 1.5e9])
    half = math.sin(math.radians(1.0))
    assert float(fb.power_lm(half, 0.0, 1.3e9)) == pytest.approx(0.5, abs=0.01)
    assert float(fb.power_lm(half, 0.0, 1.5e9)) < float(fb.power_lm(half, 0.0, 1.4e9)) < 0.5


def test_bad_fits_beams_stop_start_up_naming_the_file(tmp_path):
    from astropy.io import fits

    from dsa110_contimg.instrument import BeamOptions

    def load(path):
        return PrimaryBeam.from_options(BeamOptions(kind="fits", fits_path=str(path)))

    with pytest.raises(ConfigError, match="missing.fits"):
        load(tmp_path / "missing.fits")
    fits.PrimaryHDU(np.ones((5, 5), np.float32)).writeto(tmp_path / "noaxes.fits")
    with pytest.raises(ConfigError, match="noaxes.fits.*'L' and 'M'"):
        load(tmp_path / "noaxes.fits")
    with pytest.raises(ConfigError, match="on axis"):
        load(_gaussian_fits(tmp_path / "unnormalised.fits", scale_on_axis=0.7))


def test_fits_beam_orientation_in_pbcor_and_the_sky_model(tmp_path):
    """A source one degree north of a south-facing pointing is up in elevation (+m), one
    degree east is down in azimuth (-l): pb-correction and the sky model agree on both."""
    from astropy.io import fits

    from dsa110_contimg.imaging.pbcor import write_beam_and_pbcor

    beam = _fits_beam(tmp_path / "beam.fits")
    img = _fits(tmp_path / "img.fits")  # centre ra 200, dec 30: south of OVRO's zenith
    pb = write_beam_and_pbcor(img, tmp_path / "pb.fits", tmp_path / "pbcor.fits",
                              np.array([200.0]), np.array([30.0]), None, F, beam, 0.01)
    north, east = float(pb[160, 100]), float(pb[100, 40])  # RA increases to the left
    s1 = math.sin(math.radians(1.0))
    assert north == pytest.approx(float(beam.power_lm(0.0, s1, F)), rel=2e-3)
    assert east == pytest.approx(float(beam.power_lm(-s1, 0.0, F)), rel=5e-3)
    assert east > 2 * north  # the beam is wider along azimuth
    with fits.open(tmp_path / "pbcor.fits") as h:
        assert h[0].header["PBMODEL"] == "fits beam.fits"


def test_transit_search_works_long_after_the_bundled_iers_table(tmp_path):
    """astropy refuses times past its bundled IERS table's age limit unless told otherwise;
    the daemon must keep finding transits years after it was installed."""
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from dsa110_contimg.calibration.options import CalibrationOptions\n"
            "from dsa110_contimg.calibration.skymodel import find_transiting_calibrator\n"
            "from dsa110_contimg.catalogue.reference import get_calibrator\n"
            "from dsa110_contimg.simulate.core import transit_time\n"
            "from datetime import datetime, UTC\n"
            "c = get_calibrator('3C286')\n"
            "t = transit_time(c.ra_deg, c.dec_deg, datetime(2029, 3, 1, tzinfo=UTC))\n"
            "mjd = t.timestamp() / 86400 + 40587.0\n"
            "times = mjd + (np.arange(24) - 11.5) * 12.884902 / 86400\n"
            "print(find_transiting_calibrator((30.7, times), CalibrationOptions()).name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("3C286")


def test_nothing_is_seen_behind_the_dish():
    from dsa110_contimg.imaging.pbcor import drift_averaged_beam

    for beam in (PrimaryBeam.airy(), PrimaryBeam("gaussian", 4.65, 1.2)):
        assert float(beam.power_lm(0.0, 0.0, F, dn=1.0)) == pytest.approx(1.0)
        assert float(beam.power_lm(0.0, 0.0, F, dn=-1.0)) == 0.0
        # the antipode of the pointing (l = m = 0, behind)
        anti = drift_averaged_beam(np.array([20.0]), np.array([-30.0]), np.array([200.0]),
                                   np.array([30.0]), None, F, beam)
        assert float(anti[0]) == 0.0
