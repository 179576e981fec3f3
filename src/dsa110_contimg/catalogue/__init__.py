"""Sky catalogues as real, indexed data: parsers, one SQLite store, calibrator selection.

A leaf package: it imports nothing of the pipeline stages (simulate, calibration, imaging,
qa, daemon); they import it. The primary beam is passed in by the caller as a function.
"""

from __future__ import annotations

from .calibrators import (
    CoverageRow,
    bundled_reference_sources,
    bundled_sources,
    bundled_vla_calibrators,
    coverage_by_declination,
    is_unresolved,
    select_calibrators,
    transit_coverage,
)
from .formats import (
    CatalogueFormatError,
    VlaBand,
    VlaEntry,
    detect_format,
    parse_catalogue,
    parse_csv,
    parse_tdat,
    parse_vla,
    parse_vla_entries,
)
from .sources import CatalogueSource, angular_separation_deg
from .store import (
    BuildReport,
    CatalogueSummary,
    CatalogueUnavailable,
    InputRecord,
    SkyCatalogue,
    build_catalogue,
    catalogue_is_current,
    is_catalogue_db,
    survey_sources,
    write_sources,
)

__all__ = [
    "BuildReport", "CatalogueFormatError", "CatalogueSource", "CatalogueSummary",
    "CatalogueUnavailable", "CoverageRow", "InputRecord", "SkyCatalogue", "VlaBand", "VlaEntry",
    "angular_separation_deg", "build_catalogue", "bundled_reference_sources", "bundled_sources",
    "bundled_vla_calibrators", "catalogue_is_current", "coverage_by_declination",
    "detect_format", "is_unresolved", "parse_catalogue", "parse_csv", "parse_tdat", "parse_vla",
    "parse_vla_entries", "select_calibrators", "survey_sources", "transit_coverage",
    "write_sources", "is_catalogue_db",
]
