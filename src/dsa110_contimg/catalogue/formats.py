"""Parsers for the catalogue files operators hand the daemon; each yields CatalogueSource.

Three formats, detected from the first meaningful line or forced by the caller:

- ``vla``: the VLA Calibrator Manual's plain-text list (per source a J2000 line, a B1950
  line, a band table of quality codes and fluxes). :func:`parse_vla_entries` keeps every
  band; :func:`parse_vla` converts entries with a 20 cm flux to sources.
- ``tdat``: HEASARC's Transportable Database Aggregate Table, as HEASARC distributes NVSS
  (``heasarc_nvss.tdat``): ``<HEADER>`` with ``field[...]`` and ``line[...]`` definitions,
  ``<DATA>`` with one ``|``-separated record per line, ``<END>``.
- ``csv``: the project's ``name,ra_deg,dec_deg,flux_jy[,spectral_index,ref_freq_hz,
  major_arcsec,minor_arcsec]``.

Anything wrong (wrong format, a truncated file, a field that is not a number) raises
:class:`CatalogueFormatError` with a one-line ``<file>:<line>: <problem>`` message, so an
operator can open the file at the line. Parsers are generators: a build streams a 1.8 M row
NVSS file instead of holding it in memory, and stops at the first error.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ContimgError
from .sources import CatalogueSource

FORMATS = ("vla", "tdat", "csv")
VLA_BAND_FREQ_HZ = {"20cm": 1.4e9, "6cm": 4.86e9}


class CatalogueFormatError(ContimgError):
    """A catalogue file cannot be read; the message is ``<file>:<line>: <problem>``, one line."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = " ".join(problem.split())  # one line whatever the cause held
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {self.problem}")


# --------------------------------------------------------------------------- detection


def _is_comment(text: str) -> bool:
    return text.startswith("#") or text.startswith("//")


def detect_format(path: str | Path) -> str:
    """``vla``, ``tdat`` or ``csv`` from the first non-blank, non-comment line of ``path``."""
    for lineno, raw in _lines(path):
        text = raw.strip()
        if not text or _is_comment(text):
            continue
        low = text.lower()
        if low == "<header>" or low.startswith("table_name"):
            return "tdat"
        if text.startswith("IAU NAME") or _VLA_J2000.match(raw):
            return "vla"
        cols = {c.strip().lower() for c in text.split(",")}
        if {"name", "ra_deg", "dec_deg", "flux_jy"} <= cols:
            return "csv"
        raise CatalogueFormatError(path, lineno, "unrecognised catalogue format: expected a "
                                   "TDAT <HEADER>, the VLA list's 'IAU NAME' title or a CSV "
                                   f"header name,ra_deg,dec_deg,flux_jy; found {text[:60]!r}")
    raise CatalogueFormatError(path, 1, "file is empty")


def parse_catalogue(path: str | Path, fmt: str | None = None) -> Iterator[CatalogueSource]:
    """Sources of ``path`` in format ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(path)
    if fmt == "vla":
        return parse_vla(path)
    if fmt == "tdat":
        return parse_tdat(path)
    if fmt == "csv":
        return parse_csv(path)
    raise ValueError(f"unknown catalogue format {fmt!r}; one of {', '.join(FORMATS)}")


def _open(path: str | Path):
    try:
        return open(path, encoding="utf-8", errors="strict", newline="")
    except OSError as exc:
        raise CatalogueFormatError(path, None, f"cannot read: {exc.strerror or exc}") from exc


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the line ending); undecodable bytes are a format error."""
    fh = _open(path)
    lineno = 0
    with fh:
        try:
            for raw in fh:
                lineno += 1
                yield lineno, raw.rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise CatalogueFormatError(path, lineno + 1, f"not a text file ({exc.reason})") from exc


def _number(path: str | Path, lineno: int, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CatalogueFormatError(path, lineno, f"{what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise CatalogueFormatError(path, lineno, f"{what} is not finite: {text!r}")
    return value


def _check_position(path: str | Path, lineno: int, ra: float, dec: float) -> float:
    """RA folded into [0, 360); a declination outside [-90, 90] is an error."""
    if not -90.0 <= dec <= 90.0:
        raise CatalogueFormatError(path, lineno, f"declination {dec} is outside [-90, 90]")
    if not 0.0 <= ra <= 360.0:
        raise CatalogueFormatError(path, lineno, f"right ascension {ra} is outside [0, 360]")
    return ra % 360.0


def _sexagesimal(text: str) -> tuple[float, float, float, bool]:
    """(a, b, c, negative) of 'a b c' or 'a:b:c' (c may be missing); ValueError when malformed."""
    parts = text.replace(":", " ").split()
    if not 2 <= len(parts) <= 3:
        raise ValueError(text)
    negative = parts[0].startswith("-")
    a, b = abs(float(parts[0])), float(parts[1])
    c = float(parts[2]) if len(parts) == 3 else 0.0
    if not (0 <= b < 60 and 0 <= c < 60):
        raise ValueError(text)
    return a, b, c, negative


def _angle_deg(path: str | Path, lineno: int, what: str, text: str, hours: bool) -> float:
    """Degrees from decimal degrees or sexagesimal ('hh mm ss.s' for RA, '+dd mm ss' for Dec)."""
    text = text.strip()
    if " " not in text and ":" not in text:
        return _number(path, lineno, f"field {what!r}", text)
    try:
        a, b, c, negative = _sexagesimal(text)
    except ValueError:
        raise CatalogueFormatError(path, lineno, f"field {what!r} is not an angle: {text!r}") from None
    value = (a + b / 60.0 + c / 3600.0) * (15.0 if hours else 1.0)
    return -value if negative else value


# --------------------------------------------------------------------------- VLA list

_VLA_J2000 = re.compile(
    r"^(?P<name>\S+)\s+J2000\s+(?P<pc>[A-Z])\s+"
    r"(?P<rh>\d{1,2})h(?P<rm>\d{1,2})m(?P<rs>\d{1,2}(?:\.\d*)?)s\s+"
    r"(?P<sign>[-+]?)(?P<dd>\d{1,2})d(?P<dm>\d{1,2})'(?P<ds>\d{1,2}(?:\.\d*)?)\"(?:\s+(?P<rest>.*))?$")
_VLA_B1950 = re.compile(r"^\S+\s+B1950\s")
_VLA_BAND = re.compile(r"^\s*(?P<band>\d+(?:\.\d+)?cm)\s+(?P<letter>[A-Z])(?=\s|$)")
_VLA_CODES = set("PSWXC?")
# Columns of the band table relative to the band letter (column 10 in the real list), from its
# header 'BAND        A B C D    FLUX(Jy)    UVMIN(kL)  UVMAX(kL)': the quality letters sit 3, 5,
# 7 and 9 columns after the letter; numbers are right-aligned under their titles, so a number
# is the flux, UVMIN or UVMAX by the column where it ends (flux <= 31, UVMIN 42-44, UVMAX 54-56
# in the real list; the limits below sit half-way between).
_CODE_OFFSETS = (3, 5, 7, 9)
_NUMBERS_OFFSET = 11
_FLUX_LAST_END = 27  # relative to the letter: column 36
_UVMIN_LAST_END = 38  # relative to the letter: column 47


@dataclass(frozen=True, slots=True)
class VlaBand:
    """One band line: quality codes for configurations A-D ('?' unknown), flux (None: not given)."""

    codes: str
    flux_jy: float | None
    uvmin_kl: float | None = None
    uvmax_kl: float | None = None
    letter: str = ""


@dataclass(frozen=True, slots=True)
class VlaEntry:
    """One source of the VLA list, with every band line, keyed by wavelength ('20cm', '6cm', ...)."""

    name: str
    ra_deg: float
    dec_deg: float
    pos_code: str
    bands: dict[str, VlaBand] = field(default_factory=dict)
    line: int = 0

    def to_source(self) -> CatalogueSource | None:
        """The 20 cm (1.4 GHz) source, spectral index from the 20 and 6 cm fluxes; None without a 20 cm flux > 0."""
        lband = self.bands.get("20cm")
        if lband is None or not lband.flux_jy or lband.flux_jy <= 0:
            return None  # no 20 cm line, '?' or 0.00 (the list's "not measured")
        alpha = None
        cband = self.bands.get("6cm")
        if cband is not None and cband.flux_jy is not None and cband.flux_jy > 0:
            alpha = math.log(cband.flux_jy / lband.flux_jy) / math.log(
                VLA_BAND_FREQ_HZ["6cm"] / VLA_BAND_FREQ_HZ["20cm"])
        return CatalogueSource(self.name, self.ra_deg, self.dec_deg, lband.flux_jy, alpha,
                               VLA_BAND_FREQ_HZ["20cm"], None, None, "vla", lband.codes)


def _vla_band(path: str | Path, lineno: int, text: str) -> tuple[str, VlaBand]:
    m = _VLA_BAND.match(text)
    if m is None:
        raise CatalogueFormatError(path, lineno, f"not a band line: {text.strip()!r}")
    at = m.start("letter")
    padded = text.ljust(at + _NUMBERS_OFFSET)
    codes = ""
    for off in _CODE_OFFSETS:
        letter = padded[at + off].upper()
        letter = "?" if letter == " " else letter
        if letter not in _VLA_CODES or padded[at + off - 1] != " ":
            raise CatalogueFormatError(path, lineno, f"quality code {padded[at + off]!r} in column "
                                       f"{at + off + 1} is not one of P, S, W, X, C, ?")
        codes += letter
    if padded[at + _CODE_OFFSETS[-1] + 1:at + _NUMBERS_OFFSET].strip():
        raise CatalogueFormatError(path, lineno, f"unexpected text after the quality codes: {text.strip()!r}")
    flux = uvmin = uvmax = None
    for tok in re.finditer(r"\S+", padded[at + _NUMBERS_OFFSET:]):
        word, end = tok.group(), tok.end() + _NUMBERS_OFFSET
        if word.isalpha():
            continue  # trailing notes such as 'visplot'
        if end <= _FLUX_LAST_END:
            if word != "?":  # '?': no flux measured (0.00 is kept as written)
                flux = _number(path, lineno, "flux", word)
        elif end <= _UVMIN_LAST_END:
            uvmin = _number(path, lineno, "UVMIN", word)
        else:
            uvmax = _number(path, lineno, "UVMAX", word)
    return m.group("band"), VlaBand(codes, flux, uvmin, uvmax, m.group("letter"))


def parse_vla_entries(path: str | Path) -> Iterator[VlaEntry]:
    """Every source block of the VLA Calibrator Manual's plain-text list.

    Variants of the real list handled: one-digit declination degrees (``4d15'11.978"``),
    '-00d' declinations, quality codes '?' or blank (missing) or lower case, fluxes '?' or
    blank (None) or 0.00 (kept; 13 20 cm lines say it), UVMIN/UVMAX either or both, trailing
    'visplot', a block with no band line, a 20 cm line mislabelled 'X' (1657+570; the
    wavelength decides), duplicate names. Each block must end with a blank line: a block
    cut short is an error, not a source with fewer bands.
    """
    expect = "title"  # title -> j2000 -> b1950 -> dashes -> bandhead -> rule -> bands
    entry: dict | None = None
    bands: dict[str, VlaBand] = {}
    lineno = 0
    for lineno, text in _lines(path):
        blank = not text.strip()
        if expect in ("title", "j2000"):
            if blank or text.startswith("IAU NAME") or set(text.strip()) == {"="}:
                continue
            m = _VLA_J2000.match(text)
            if m is None:
                raise CatalogueFormatError(path, lineno, f"expected a source's J2000 line, found {text.strip()[:60]!r}")
            ra = (int(m["rh"]) + int(m["rm"]) / 60 + float(m["rs"]) / 3600) * 15.0
            dec = int(m["dd"]) + int(m["dm"]) / 60 + float(m["ds"]) / 3600
            dec = -dec if m["sign"] == "-" else dec
            ra = _check_position(path, lineno, ra, dec)
            entry = {"name": m["name"], "ra_deg": ra, "dec_deg": dec, "pos_code": m["pc"], "line": lineno}
            bands = {}
            expect = "b1950"
        elif expect == "b1950":
            if not _VLA_B1950.match(text):
                raise CatalogueFormatError(path, lineno, f"expected the B1950 line of {entry['name']}")
            expect = "dashes"
        elif expect == "dashes":
            if not text.strip() or set(text.strip()) != {"-"}:
                raise CatalogueFormatError(path, lineno, f"expected the '-----' line of {entry['name']}")
            expect = "bandhead"
        elif expect == "bandhead":
            if not text.startswith("BAND"):
                raise CatalogueFormatError(path, lineno, f"expected the BAND header of {entry['name']}")
            expect = "rule"
        elif expect == "rule":
            if not text.strip() or set(text.strip()) != {"="}:
                raise CatalogueFormatError(path, lineno, f"expected the '=====' line of {entry['name']}")
            expect = "bands"
        elif blank:
            yield VlaEntry(bands=bands, **entry)
            entry, expect = None, "j2000"
        else:
            band, value = _vla_band(path, lineno, text)
            if band in bands:
                raise CatalogueFormatError(path, lineno, f"second {band} line for {entry['name']}")
            bands[band] = value
    if entry is not None:
        raise CatalogueFormatError(path, lineno + 1, f"file ends inside the block of {entry['name']} "
                                   f"(line {entry['line']}): truncated?")
    if expect == "title":
        raise CatalogueFormatError(path, lineno + 1, "no source in the VLA calibrator list")


def parse_vla(path: str | Path) -> Iterator[CatalogueSource]:
    """Sources of the VLA list that have a 20 cm flux (see :meth:`VlaEntry.to_source`)."""
    for entry in parse_vla_entries(path):
        src = entry.to_source()
        if src is not None:
            yield src


# --------------------------------------------------------------------------- HEASARC TDAT

_TDAT_FIELD = re.compile(r"^field\[(?P<name>\w+)\]\s*=\s*(?P<spec>.*)$", re.IGNORECASE)
_TDAT_LINE = re.compile(r"^line\[(?P<n>\d+)\]\s*=\s*(?P<names>.*)$", re.IGNORECASE)
_TDAT_KEY = re.compile(r"^(?P<key>\w+)\s*=\s*(?P<value>.*)$")
_FLUX_UNITS = {"jy": 1.0, "mjy": 1e-3, "ujy": 1e-6, "microjy": 1e-6}
_SIZE_UNITS = {"arcsec": 1.0, "arcmin": 60.0, "deg": 3600.0, "degree": 3600.0, "degrees": 3600.0}
_FLUX_FIELDS = ("flux_20_cm", "flux_1400_mhz", "flux", "flux_jy")
_MAJOR_FIELDS = ("major_axis", "major_axis_deconv", "major")
_MINOR_FIELDS = ("minor_axis", "minor_axis_deconv", "minor")


@dataclass(frozen=True, slots=True)
class _TdatField:
    name: str
    unit: str | None  # lower case; from 'type:fmt_unit', else a bracketed unit such as '[mJy]'


def _tdat_field(name: str, spec: str) -> _TdatField:
    """Field spec ``type[:fmt][_unit] [ucd] (index) // description``: only the unit matters here."""
    spec = spec.split("//", 1)[0].strip()
    head = spec.split()[0] if spec else ""
    unit = None
    if "_" in head:
        unit = head.split("_", 1)[1]
    else:
        for bracket in re.findall(r"\[([^\]]*)\]", spec):
            if bracket.strip().lower() in _FLUX_UNITS or bracket.strip().lower() in _SIZE_UNITS:
                unit = bracket.strip()
    return _TdatField(name.lower(), unit.lower() if unit else None)


def _split_record(line: str, delimiters: str) -> list[str]:
    """Fields of a data line; a backslash escapes a delimiter inside a value."""
    if "\\" not in line:  # the usual case, at str.split speed
        if len(delimiters) == 1:
            return line.split(delimiters)
        return re.split(f"[{re.escape(delimiters)}]", line)
    out, cur, escaped = [], [], False
    for ch in line:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in delimiters:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse_tdat(path: str | Path) -> Iterator[CatalogueSource]:
    """Sources of a HEASARC TDAT table (NVSS: fields ra, dec, flux_20_cm [mJy], major/minor_axis [arcsec]).

    The record layout is ``line[1] = ...`` (``line[2]``... for multi-line records) when given,
    else the order of the ``field[...]`` lines. RA/Dec may be decimal degrees or sexagesimal.
    Fluxes convert to Jy by the field's unit (mJy when none is given, as HEASARC's NVSS).
    ``<END>`` is required: without it the file may have been cut short.
    """
    lines = _lines(path)
    lineno = 0
    for lineno, text in lines:
        t = text.strip()
        if not t or _is_comment(t):
            continue
        if t.upper() == "<HEADER>":
            break
        raise CatalogueFormatError(path, lineno, f"expected <HEADER> (a HEASARC TDAT file), found {t[:60]!r}")
    else:
        raise CatalogueFormatError(path, lineno + 1, "no <HEADER> line: not a TDAT file")

    fields: dict[str, _TdatField] = {}
    layout: dict[int, list[str]] = {}
    keywords: dict[str, str] = {}
    for lineno, text in lines:
        t = text.strip()
        if not t or _is_comment(t):
            continue
        if t.upper() == "<DATA>":
            break
        if m := _TDAT_FIELD.match(t):
            fields[m["name"].lower()] = _tdat_field(m["name"], m["spec"])
        elif m := _TDAT_LINE.match(t):
            layout[int(m["n"])] = [n.lower() for n in m["names"].split("//")[0].split()]
        elif m := _TDAT_KEY.match(t):
            keywords[m["key"].lower()] = m["value"].strip().strip("\"'`")
        elif t.lower().startswith("relate["):
            continue  # obsolete relation keyword: nothing to do with the records
        else:
            raise CatalogueFormatError(path, lineno, f"not a TDAT header line: {t[:60]!r}")
    else:
        raise CatalogueFormatError(path, lineno + 1, "file ends in the header, before <DATA>: truncated?")

    if "record_delimiter" in keywords and keywords["record_delimiter"] not in ("", "\\n"):
        raise CatalogueFormatError(path, lineno, "record_delimiter other than a new line is not supported")
    delimiters = keywords.get("field_delimiter") or "|"
    if layout:
        groups = [layout[k] for k in sorted(layout)]
    else:
        groups = [list(fields)]
    names = [n for g in groups for n in g]
    if not names:
        raise CatalogueFormatError(path, lineno, "the header defines no field")
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise CatalogueFormatError(path, lineno, f"line[] names field {unknown[0]!r}, which no field[] defines")

    def pick(candidates: tuple[str, ...], required: bool) -> str | None:
        for c in candidates:
            if c in names:
                return c
        if required:
            raise CatalogueFormatError(path, lineno, f"the header has no field {candidates[0]!r}")
        return None

    ra_f, dec_f = pick(("ra",), True), pick(("dec",), True)
    flux_f = pick(_FLUX_FIELDS, True)
    major_f, minor_f = pick(_MAJOR_FIELDS, False), pick(_MINOR_FIELDS, False)
    name_f = pick(("name",), False)
    flux_scale = _unit_scale(path, lineno, flux_f, fields[flux_f].unit, _FLUX_UNITS, "mjy")
    major_scale = _unit_scale(path, lineno, major_f, fields[major_f].unit, _SIZE_UNITS, "arcsec") if major_f else 1.0
    minor_scale = _unit_scale(path, lineno, minor_f, fields[minor_f].unit, _SIZE_UNITS, "arcsec") if minor_f else 1.0
    width = [len(g) for g in groups]
    convert = _TdatConverter(path, {n: i for i, n in enumerate(names)}, name_f, ra_f, dec_f, flux_f,
                             major_f, minor_f, flux_scale, major_scale, minor_scale)

    pending: list[str] = []
    chunk = first_line = 0  # which line of a multi-line record comes next; where it began
    for lineno, text in lines:
        t = text.strip()
        if t.upper() == "<END>":
            if chunk:
                raise CatalogueFormatError(path, lineno, "<END> inside a multi-line record")
            return
        if not t:
            continue
        part = _split_record(t, delimiters)
        expected = width[chunk]
        if len(part) == expected + 1 and part[-1].strip() == "":
            part.pop()  # the usual trailing delimiter
        if len(part) != expected:
            raise CatalogueFormatError(path, lineno, f"record has {len(part)} fields, the header "
                                       f"defines {expected}: truncated or not this table?")
        if len(groups) == 1:
            yield convert(lineno, part)
            continue
        if chunk == 0:
            first_line = lineno
        pending.extend(part)
        chunk += 1
        if chunk == len(groups):
            yield convert(first_line, pending)
            pending, chunk = [], 0
    raise CatalogueFormatError(path, lineno + 1, "file ends without <END>: truncated?")


def _unit_scale(path, lineno, name: str, unit: str | None, table: dict[str, float], default: str) -> float:
    unit = unit or default
    if unit not in table:
        raise CatalogueFormatError(path, lineno, f"field {name!r} has unit {unit!r}; expected one of {', '.join(table)}")
    return table[unit]


class _TdatConverter:
    """Turns one record's values into a CatalogueSource (built once per table: 1.8 M calls)."""

    def __init__(self, path, index: dict[str, int], name_f, ra_f, dec_f, flux_f, major_f, minor_f,
                 flux_scale: float, major_scale: float, minor_scale: float) -> None:
        self.path = path
        self.fields = (ra_f, dec_f, flux_f, major_f, minor_f)
        self.i_name = index[name_f] if name_f else None
        self.i_ra, self.i_dec, self.i_flux = index[ra_f], index[dec_f], index[flux_f]
        self.i_major = index[major_f] if major_f else None
        self.i_minor = index[minor_f] if minor_f else None
        self.scales = (flux_scale, major_scale, minor_scale)

    def __call__(self, lineno: int, values: list[str]) -> CatalogueSource:
        try:
            ra = float(values[self.i_ra])
            dec = float(values[self.i_dec])
            flux = float(values[self.i_flux]) * self.scales[0]
            major = values[self.i_major].strip() if self.i_major is not None else ""
            minor = values[self.i_minor].strip() if self.i_minor is not None else ""
            major_v = float(major) * self.scales[1] if major else None
            minor_v = float(minor) * self.scales[2] if minor else None
            ok = (math.isfinite(flux) and -90.0 <= dec <= 90.0 and 0.0 <= ra < 360.0
                  and (major_v is None or math.isfinite(major_v))
                  and (minor_v is None or math.isfinite(minor_v)))
        except ValueError:
            ok = False
        if not ok:  # the slow path finds the field at fault and says which
            ra, dec, flux, major_v, minor_v = self._checked(lineno, values)
        name = values[self.i_name].strip() if self.i_name is not None else ""
        return CatalogueSource(name or _position_name("NVSS", ra, dec), ra, dec, flux, None, 1.4e9,
                               major_v, minor_v, "nvss", None)

    def _checked(self, lineno: int, values: list[str]) -> tuple:
        path = self.path
        ra_f, dec_f, flux_f, major_f, minor_f = self.fields

        def required(f: str, i: int) -> str:
            v = values[i].strip()
            if not v:
                raise CatalogueFormatError(path, lineno, f"field {f!r} is blank")
            return v

        def optional(f: str | None, i: int | None, scale: float) -> float | None:
            if i is None or not values[i].strip():
                return None
            return _number(path, lineno, f"field {f!r}", values[i].strip()) * scale

        ra = _angle_deg(path, lineno, ra_f, required(ra_f, self.i_ra), hours=True)
        dec = _angle_deg(path, lineno, dec_f, required(dec_f, self.i_dec), hours=False)
        ra = _check_position(path, lineno, ra, dec)
        flux = _number(path, lineno, f"field {flux_f!r}", required(flux_f, self.i_flux)) * self.scales[0]
        return (ra, dec, flux, optional(major_f, self.i_major, self.scales[1]),
                optional(minor_f, self.i_minor, self.scales[2]))


def _position_name(prefix: str, ra: float, dec: float) -> str:
    """'PREFIX Jhhmmss.s+ddmmss' for sources that come without a name."""
    h, rem = divmod(ra / 15.0 * 3600.0, 3600.0)
    m, s = divmod(rem, 60.0)
    sign = "-" if dec < 0 else "+"
    d, drem = divmod(abs(dec) * 3600.0, 3600.0)
    dm, ds = divmod(drem, 60.0)
    return f"{prefix} J{int(h):02d}{int(m):02d}{s:04.1f}{sign}{int(d):02d}{int(dm):02d}{int(ds):02d}"


# --------------------------------------------------------------------------- project CSV

CSV_REQUIRED = ("name", "ra_deg", "dec_deg", "flux_jy")
CSV_OPTIONAL = ("spectral_index", "ref_freq_hz", "major_arcsec", "minor_arcsec", "lband_codes")


def parse_csv(path: str | Path, origin: str = "csv") -> Iterator[CatalogueSource]:
    """Sources of the project's CSV; '#' lines are comments; optional columns may be blank.

    ``lband_codes`` (the bundled VLA list carries it) fills ``vla_lband_codes``; other
    extra columns are ignored. ``ref_freq_hz`` defaults to 1.4 GHz.
    """
    header: list[str] | None = None
    col: dict[str, int] = {}
    lineno = 0
    for lineno, text in _lines(path):
        t = text.strip()
        if not t or t.startswith("#"):
            continue
        row = [v.strip() for v in next(csv.reader([text]))]
        if header is None:
            header = [h.lower() for h in row]
            missing = [c for c in CSV_REQUIRED if c not in header]
            if missing:
                raise CatalogueFormatError(path, lineno, f"CSV header lacks {', '.join(missing)} "
                                           f"(expected {','.join(CSV_REQUIRED)}[,...])")
            col = {h: i for i, h in enumerate(header)}
            continue
        if len(row) != len(header):
            raise CatalogueFormatError(path, lineno, f"row has {len(row)} fields, the header has "
                                       f"{len(header)}: truncated?")

        name = row[col["name"]]
        if not name:
            raise CatalogueFormatError(path, lineno, "field 'name' is blank")
        ra = _number(path, lineno, "field 'ra_deg'", row[col["ra_deg"]])
        dec = _number(path, lineno, "field 'dec_deg'", row[col["dec_deg"]])
        ra = _check_position(path, lineno, ra, dec)
        flux = _number(path, lineno, "field 'flux_jy'", row[col["flux_jy"]])
        codes = row[col["lband_codes"]].upper() if "lband_codes" in col else ""
        if codes and (len(codes) != 4 or not set(codes) <= _VLA_CODES):
            raise CatalogueFormatError(path, lineno, f"field 'lband_codes' is not 4 quality letters: {codes!r}")
        ref = _csv_optional(path, lineno, row, col, "ref_freq_hz")
        if ref is not None and ref <= 0:
            raise CatalogueFormatError(path, lineno, f"field 'ref_freq_hz' is not positive: {ref}")
        yield CatalogueSource(name, ra, dec, flux, _csv_optional(path, lineno, row, col, "spectral_index"),
                              ref or 1.4e9, _csv_optional(path, lineno, row, col, "major_arcsec"),
                              _csv_optional(path, lineno, row, col, "minor_arcsec"), origin, codes or None)
    if header is None:
        raise CatalogueFormatError(path, lineno + 1, "no CSV header: empty file?")


def _csv_optional(path: str | Path, lineno: int, row: list[str], col: dict[str, int],
                  name: str) -> float | None:
    if name not in col or not row[col[name]]:
        return None
    return _number(path, lineno, f"field {name!r}", row[col[name]])
