"""Write a Measurement Set with python-casacore, filling the main table in row blocks.

Why not ``UVData.write_ms``: it needs the whole group in memory (peak ~9 GB for a full
group) and writes every column in one go. Here the schema and every subtable come from
pyuvdata's own MS helpers (``pyuvdata.utils.io.ms``) applied to a *metadata-only* UVData of
the group, so the MS is what ``write_ms`` would produce, while the visibilities stream
through in blocks of whole integrations with bounded memory. Conventions follow
``write_ms(flip_conj=True)``: DATA holds the conjugate of pyuvdata's visibilities and UVW is
negated, with ANTENNA1 <= ANTENNA2 on every row.

python-casacore only: never import casatools in a process that uses this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Bytes per tile of the big columns: large enough for few, long writes, small enough that
#: CASA's row-by-row readers do not drag in much they do not need.
TILE_BYTES = 1 << 20
DATA_GROUPS = {"DATA": "TiledData", "FLAG": "TiledFlag", "WEIGHT_SPECTRUM": "TiledWgtSpectrum"}


def _tile_rows(nchan: int, npol: int, itemsize: int) -> int:
    return int(max(8, min(4096, TILE_BYTES // max(1, nchan * npol * itemsize))))


def estimate_ms_bytes(nrows: int, nchan: int, npol: int, weight_spectrum: bool) -> int:
    """Upper estimate of the MS size on disk (whole tiles, per-row columns, subtables)."""
    def tiled(itemsize: float, tile_rows: int) -> int:
        tiles = -(-nrows // tile_rows)
        return int(tiles * tile_rows * nchan * npol * itemsize)

    total = tiled(8, _tile_rows(nchan, npol, 8)) + tiled(1 / 8, _tile_rows(nchan, npol, 1) * 8)
    if weight_spectrum:
        total += tiled(4, _tile_rows(nchan, npol, 4))
    total += nrows * 160 + (4 << 20)  # UVW, TIME, ANTENNA*, WEIGHT, SIGMA ...; subtables
    return int(total * 1.05)


def main_table_desc(nchan: int, npol: int, weight_spectrum: bool) -> tuple[dict, dict]:
    """Table description and data-manager info of the main table.

    The column set and storage managers are pyuvdata's ``init_ms_file`` (an ALMA-like
    layout CASA is happy with); only the tile shapes are chosen here, so that one tile holds
    whole rows (all channels and correlations), which is how we write and how CASA reads.
    WEIGHT_SPECTRUM is left out when every channel of a row has the same weight: CASA then
    uses WEIGHT, and the MS is a third smaller.
    """
    from casacore import tables

    desc = tables.required_ms_desc("MAIN")
    desc["FLAG"].update(dataManagerType="TiledShapeStMan", dataManagerGroup="TiledFlag")
    desc["UVW"].update(dataManagerType="TiledColumnStMan", dataManagerGroup="TiledUVW")
    desc["FLAG_CATEGORY"].update(dataManagerType="TiledShapeStMan",
                                 dataManagerGroup="TiledFlagCategory",
                                 keywords={"CATEGORY": np.array("baddata")})
    desc["WEIGHT"].update(dataManagerType="TiledShapeStMan", dataManagerGroup="TiledWgt")
    desc["SIGMA"].update(dataManagerType="TiledShapeStMan", dataManagerGroup="TiledSigma")
    for key in ("ANTENNA1", "ANTENNA2", "DATA_DESC_ID", "FLAG_ROW"):
        desc[key].update(dataManagerGroup=key)
    for key in ("ARRAY_ID", "EXPOSURE", "FEED1", "FEED2", "FIELD_ID", "INTERVAL",
                "OBSERVATION_ID", "PROCESSOR_ID", "SCAN_NUMBER", "STATE_ID", "TIME",
                "TIME_CENTROID"):
        desc[key].update(dataManagerType="IncrementalStMan", dataManagerGroup=key)
    cols = [("DATA", 0.0 + 0.0j, "complex", "TiledData", "The data column")]
    if weight_spectrum:
        cols.append(("WEIGHT_SPECTRUM", 0.0, "float", "TiledWgtSpectrum",
                     "Weight for each data point"))
    for name, value, vtype, group, comment in cols:
        cd = tables.makearrcoldesc(name, value, valuetype=vtype, ndim=2,
                                   datamanagertype="TiledShapeStMan",
                                   datamanagergroup=group, comment=comment)
        del cd["desc"]["shape"]
        desc.update(tables.maketabdesc(cd))
    spec = {
        "TiledData": {"DEFAULTTILESHAPE": np.int32([npol, nchan, _tile_rows(nchan, npol, 8)])},
        "TiledFlag": {"DEFAULTTILESHAPE": np.int32([npol, nchan, _tile_rows(nchan, npol, 1) * 8])},
        "TiledWgtSpectrum": {"DEFAULTTILESHAPE":
                             np.int32([npol, nchan, _tile_rows(nchan, npol, 4)])},
    }
    return desc, tables.makedminfo(desc, spec)


def create_ms(path: Path, uv: Any, nrows: int, weight_spectrum: bool) -> Any:
    """Create the MS with all subtables from ``uv`` (metadata only) and an empty main table
    of ``nrows`` rows; return the open main table for the caller to fill."""
    from casacore import tables
    from pyuvdata.utils.io import ms as ms_utils

    path = str(path)
    desc, dminfo = main_table_desc(uv.Nfreqs, uv.Npols, weight_spectrum)
    ms = tables.default_ms(path, desc, dminfo)
    ms.addrows(nrows)
    ms.putcolkeyword("DATA", "QuantumUnits", uv.vis_units)
    if uv.extra_keywords:
        ms.putkeyword("pyuvdata_extra", _plain(uv.extra_keywords))
    if uv.pol_convention is not None:
        ms.putkeyword("pyuvdata_polconv", uv.pol_convention)
    ms.putkeyword("pyuvdata_flip_conj", True)
    ms.flush()
    pol_order = pol_order_for(uv)
    ms_utils.write_ms_antenna(path, uvobj=uv)
    ms_utils.write_ms_data_description(path, uvobj=uv)
    ms_utils.write_ms_feed(path, uvobj=uv)
    ms_utils.write_ms_field(path, uvobj=uv)
    ms_utils.write_ms_history(path, uvobj=uv)
    ms_utils.write_ms_observation(path, uvobj=uv)
    ms_utils.write_ms_pointing(path, uvobj=uv)
    ms_utils.write_ms_polarization(path, pol_order=pol_order, uvobj=uv)
    ms_utils.write_ms_source(path, uvobj=uv)
    ms_utils.write_ms_spectral_window(path, uvobj=uv)
    return ms


def pol_order_for(uv: Any) -> Any:
    from pyuvdata import utils

    order = utils.pol.determine_pol_order(uv.polarization_array, order="CASA")
    return utils.tools.slicify(order, allow_empty=True)


def _plain(d: dict) -> dict:
    """extra_keywords as casacore-storable values (numpy scalars to Python)."""
    out = {}
    for k, v in d.items():
        out[k] = v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v
    return out


def fix_padding_antennas(path: Path, antenna_numbers: np.ndarray, centre_xyz: np.ndarray) -> int:
    """Flag the ANTENNA rows pyuvdata pads in (rows are indexed by antenna number) and put
    them at the array centre instead of the Earth's centre; return how many there are.

    Keeping row = antenna number means a numeric antenna name and its MS index agree, so
    CASA's ambiguous selection of "24" (name or index?) picks the same antenna either way.
    """
    from casacore import tables

    with tables.table(f"{path}::ANTENNA", readonly=False, ack=False) as t:
        n = t.nrows()
        pad = np.ones(n, dtype=bool)
        pad[np.asarray(antenna_numbers, dtype=int)] = False
        if pad.any():
            pos = t.getcol("POSITION")
            pos[pad] = centre_xyz
            t.putcol("POSITION", pos)
            t.putcol("FLAG_ROW", pad)
            names = t.getcol("NAME")
            for i in np.flatnonzero(pad):
                names[i] = f"PAD{i}"
            t.putcol("NAME", names)
            t.putcol("STATION", names)
        return int(pad.sum())


def write_pointing_drift(path: Path, ra_rad: np.ndarray, dec_rad: np.ndarray,
                         times_mjd_s: np.ndarray) -> None:
    """Replace pyuvdata's placeholder POINTING directions with where the dishes looked.

    The dishes are fixed on the meridian (drift scan), so in ICRS the pointing moves with
    time; one (ra, dec) per unique time, the same for every antenna.
    """
    from casacore import tables

    with tables.table(f"{path}::POINTING", readonly=False, ack=False) as t:
        if t.nrows() == 0:
            return
        tcol = t.getcol("TIME")
        idx = np.searchsorted(times_mjd_s, tcol)
        idx = np.clip(idx, 0, times_mjd_s.size - 1)
        direction = np.zeros((t.nrows(), 1, 2))
        direction[:, 0, 0] = ra_rad[idx]
        direction[:, 0, 1] = dec_rad[idx]
        t.putcol("DIRECTION", direction)
        t.putcol("TARGET", direction)
        t.putcol("NAME", np.asarray(["DRIFT"] * t.nrows()))


def append_history(path: Path, messages: list[str], origin: str = "dsa110-contimg") -> None:
    """Add one HISTORY row per message (what conversion did and which quirks it met)."""
    import time

    from casacore import tables

    if not messages:
        return
    now = (time.time() / 86400.0 + 40587.0) * 86400.0  # MJD seconds (UTC)
    with tables.table(f"{path}::HISTORY", readonly=False, ack=False) as t:
        r0 = t.nrows()
        n = len(messages)
        t.addrows(n)
        t.putcol("APP_PARAMS", np.asarray([""] * n)[:, np.newaxis], startrow=r0, nrow=n)
        t.putcol("CLI_COMMAND", np.asarray([""] * n)[:, np.newaxis], startrow=r0, nrow=n)
        t.putcol("APPLICATION", [origin] * n, startrow=r0, nrow=n)
        t.putcol("MESSAGE", list(messages), startrow=r0, nrow=n)
        t.putcol("OBJECT_ID", np.zeros(n, dtype=np.int32), startrow=r0, nrow=n)
        t.putcol("OBSERVATION_ID", np.full(n, -1, dtype=np.int32), startrow=r0, nrow=n)
        t.putcol("ORIGIN", [origin] * n, startrow=r0, nrow=n)
        t.putcol("PRIORITY", ["INFO"] * n, startrow=r0, nrow=n)
        t.putcol("TIME", np.full(n, now), startrow=r0, nrow=n)
