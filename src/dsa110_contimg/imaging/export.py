"""FITS export of CASA images with the header keywords archives and viewers rely on.

``exportfits`` writes the WCS, BMAJ/BMIN/BPA (degrees), RESTFRQ and DATE-OBS; it copies the
MS's observatory name ('OVRO_DSA') into TELESCOP/OBSERVER. We set TELESCOP='DSA-110', ORIGIN to
this software, OBSERVER from the MS (or the pipeline), the observing span, the array position
(OBSGEO-X/Y/Z) and the pipeline's own provenance (group, data column, tier, expected noise).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .. import __version__ as _version

TELESCOPE = "DSA-110"


def mjd_s_to_iso(mjd_s: float) -> str:
    t = datetime(1858, 11, 17, tzinfo=UTC) + timedelta(seconds=float(mjd_s))
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def export_fits(casa_image: Path, fits_path: Path, keywords: dict[str, Any]) -> Path:
    """exportfits, then set our keywords (``None`` values are skipped)."""
    import casatasks
    from astropy.io import fits

    casatasks.exportfits(imagename=str(casa_image), fitsimage=str(fits_path), overwrite=True,
                         velocity=False, optical=False, bitpix=-32, dropdeg=False, history=True)
    with fits.open(fits_path, mode="update") as hdul:
        h = hdul[0].header
        h["TELESCOP"] = TELESCOPE
        h["INSTRUME"] = TELESCOPE
        h["ORIGIN"] = f"dsa110-contimg {_version}"
        for key, value in keywords.items():
            if value is None or (isinstance(value, tuple) and value[0] is None):
                continue
            h[key] = value
        hdul.flush()
    return fits_path


def standard_keywords(*, group_id: str, observer: str, start_mjd_s: float, end_mjd_s: float,
                      freq_hz: float, array_itrf_m: tuple[float, float, float], datacolumn: str,
                      tier: str, noise_expected_jy: float | None, bandwidth_hz: float,
                      ms_name: str) -> dict[str, Any]:
    """The keywords every exported image carries (value, comment) pairs."""
    return {
        "OBSERVER": (observer if observer and observer != "OVRO_DSA" else "DSA-110 contimg",
                     "observer"),
        "DATE-OBS": (mjd_s_to_iso(start_mjd_s), "start of the first integration (UTC)"),
        "DATE-END": (mjd_s_to_iso(end_mjd_s), "end of the last integration (UTC)"),
        "TIMESYS": ("UTC", None),
        "RESTFRQ": (float(freq_hz), "[Hz] reference (band-centre) frequency"),
        "BANDWID": (float(bandwidth_hz), "[Hz] imaged bandwidth"),
        "OBSGEO-X": (float(array_itrf_m[0]), "[m] array centre, ITRF"),
        "OBSGEO-Y": (float(array_itrf_m[1]), "[m] array centre, ITRF"),
        "OBSGEO-Z": (float(array_itrf_m[2]), "[m] array centre, ITRF"),
        "GROUPID": (group_id, "DSA-110 group (first subband timestamp)"),
        "MSNAME": ms_name[:68],
        "DATACOL": (datacolumn, "imaged MS data column"),
        "IMGTIER": (tier, "imaging tier (quick/standard/deep)"),
        "NOISEEXP": (float(noise_expected_jy) if noise_expected_jy else None,
                     "[Jy/beam] expected thermal noise"),
    }
