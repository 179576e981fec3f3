"""The group's phase centre, recomputed UVW and the per-visibility phase rotation.

Why one sidereal centre at mid-time: an MS field has one phase centre, and imaging wants
one (tclean grids each field about its own centre). Phasing each integration to its own
meridian would need one FIELD per integration (24 per group) and a mosaic to image them.
Over a 309 s group the meridian moves 1.3 deg in RA while the primary beam is ~3 deg wide,
so one centre at the group's mid-time, on the meridian at the pointing declination, keeps
every source of interest well inside the field and costs nothing at imaging time.

The pointing declination stored by the correlator describes where the fixed (transit)
dishes look: hour angle 0 at that (apparent, topocentric) declination. We take that
position at the mid-time into ICRS.

The heavy lifting (apparent coordinates, frame position angle, UVW from antenna positions)
is pyuvdata's ``UVData.phase`` applied to a *metadata-only* UVData, so the geometry is
exactly pyuvdata's; only the rotation of the visibilities, ``V * exp(-2 pi i dw f / c)``
(pyuvdata's ``_apply_w_proj``), is done here, block by block. As in pyuvdata, the w
undone is 0 for unprojected (drift) input and the file's own w for already-phased input
(what the data were phased with); the new UVW always come from the antenna positions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..instrument import C_M_S, offline_astropy

#: Channels per block of the phase recurrence: exact exp at each block start, then
#: repeated multiplication by exp(-2 pi i dw df / c) (error < 1e-7 rad after 64 steps).
PHASOR_BLOCK = 64


@dataclass(frozen=True)
class PhaseCentre:
    ra_deg: float
    dec_deg: float
    pointing_dec_deg: float
    mid_jd: float
    name: str
    source: str  # where the pointing declination came from



def meridian_centre(location: Any, mid_jd: float, pointing_dec_deg: float) -> tuple[float, float]:
    """ICRS (ra, dec) in degrees of the meridian at ``pointing_dec_deg`` at ``mid_jd``."""
    ra, dec = drift_pointing(location, np.array([mid_jd]), pointing_dec_deg)
    return float(np.degrees(ra[0])) % 360.0, float(np.degrees(dec[0]))


def drift_pointing(location: Any, times_jd: np.ndarray, pointing_dec_deg: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (ra, dec) in radians of hour angle 0 at the pointing declination at each time.

    In pyuvdata's apparent frame hour angle = LAST - app_ra, so the meridian is
    app_ra = LAST; pyuvdata's erfa-based transform takes that to ICRS. Using pyuvdata's own
    frame means the phased data sit at hour angle 0 exactly as ``UVData.phase`` sees it
    (and avoids astropy's frame machinery, which costs seconds in a fresh process).
    """
    from pyuvdata.utils.phasing import transform_app_to_icrs
    from pyuvdata.utils.times import get_lst_for_time

    offline_astropy()
    t = np.atleast_1d(np.asarray(times_jd, dtype=float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lst = get_lst_for_time(t, telescope_loc=location)
        ra, dec = transform_app_to_icrs(time_array=t, app_ra=lst,
                                        app_dec=np.full(t.size, np.radians(pointing_dec_deg)),
                                        telescope_loc=location)
    return np.asarray(ra) % (2 * np.pi), np.asarray(dec)


def choose_pointing_dec(uv: Any, stored_dec_rad: float | None, notes: list[str]) -> tuple[float, str]:
    """The pointing declination (deg): the file's keyword, else a fallback, noted."""
    if stored_dec_rad is not None:
        return float(np.degrees(stored_dec_rad)), "extra_keywords['phase_center_dec']"
    for cat in uv.phase_center_catalog.values():
        if cat.get("cat_type") == "sidereal":
            notes.append("no phase_center_dec keyword: pointing declination taken from the "
                         "input's sidereal phase centre")
            return float(np.degrees(cat["cat_lat"])), "input phase centre"
    lat = float(uv.telescope.location.lat.deg)
    notes.append("no phase_center_dec keyword and unprojected input: assuming a zenith "
                 f"pointing (dec = latitude {lat:.4f} deg)")
    return lat, "zenith"


def uvw_discrepancy_m(uv: Any) -> float:
    """Largest |UVW(file) - UVW(antenna positions)| in metres, for the report."""
    from pyuvdata.utils import phasing as phs

    unproj = uv._check_for_cat_type("unprojected")
    tel = uv.telescope
    kw = dict(lst_array=uv.lst_array, use_ant_pos=True,
              antenna_positions=tel.antenna_positions, antenna_numbers=tel.antenna_numbers,
              ant_1_array=uv.ant_1_array, ant_2_array=uv.ant_2_array,
              telescope_lat=tel.location.lat.rad, telescope_lon=tel.location.lon.rad)
    if np.all(unproj):
        ref = phs.calc_uvw(to_enu=True, **kw)
    else:
        ref = phs.calc_uvw(app_ra=uv.phase_center_app_ra, app_dec=uv.phase_center_app_dec,
                           frame_pa=uv.phase_center_frame_pa, **kw)
    return float(np.max(np.abs(uv.uvw_array - ref))) if ref.size else 0.0


def old_w(uv: Any) -> np.ndarray:
    """The w each row's data are currently phased with (pyuvdata semantics: 0 if unprojected)."""
    w = uv.uvw_array[:, 2].astype(float).copy()
    w[uv._check_for_cat_type("unprojected")] = 0.0
    return w


def phase_metadata(uv: Any, centre: PhaseCentre) -> None:
    """Phase the metadata-only ``uv`` to ``centre``: new catalogue, app coords, UVW from
    antenna positions (pyuvdata's own code path; no visibilities are touched)."""
    offline_astropy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uv.phase(lon=np.radians(centre.ra_deg), lat=np.radians(centre.dec_deg), epoch="J2000",
                 phase_frame="icrs", cat_name=centre.name, use_ant_pos=True)


def w_phasor(dw_m: np.ndarray, freqs_hz: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """exp(-2 pi i dw f / c) as complex64, shape (nrow, nchan).

    Evenly spaced channels use a recurrence (one exp per row per block, then one complex
    multiply per channel) — ~30x faster than exp on every element; irregular blocks fall
    back to exp. Built channel-major and returned as a transposed view (cheap to fill).
    """
    nrow, nf = dw_m.size, freqs_hz.size
    if out is None:
        out = np.empty((nf, nrow), dtype=np.complex64)
    k = -2.0 * np.pi / C_M_S
    dw = np.asarray(dw_m, dtype=np.float64)
    for b0 in range(0, nf, PHASOR_BLOCK):
        f = freqs_hz[b0:b0 + PHASOR_BLOCK]
        df = np.diff(f)
        if f.size > 2 and np.allclose(df, df[0], rtol=1e-9, atol=1e-6):
            cur = np.exp(1j * k * dw * f[0])
            step = np.exp(1j * k * dw * df[0])
            for j in range(f.size):
                out[b0 + j] = cur
                cur *= step
        else:
            out[b0:b0 + f.size] = np.exp(1j * k * np.outer(f, dw))
    return out.T
