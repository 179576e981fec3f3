"""What a calibration set is: antenna-based CASA tables plus the facts needed to reuse them.

A set is what one calibrator transit produced (K, BP, G solved together) or, when the
registry combines the newest valid bandpass with the newest valid gain, what is applied to a
later group. Plain frozen data: it crosses process boundaries (worker -> daemon) by pickle and
goes into SQLite and the status API as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CalSetDamaged
from ..products import seal_mismatch

# Order in which tables are applied (and listed); 'Gp' is the intermediate phase-only solve
# the bandpass is solved through: kept on disk for diagnosis, never applied with G.
APPLY_ORDER: tuple[str, ...] = ("K", "BP", "G")
KINDS: tuple[str, ...] = ("K", "BP", "G", "Gp")
# Tables that travel with the bandpass (a K without the BP it was solved with is meaningless).
BANDPASS_KINDS: tuple[str, ...] = ("K", "BP")
FIELD_CALIBRATOR = "field"  # the calibrator name of a gain solved on a group's own field


@dataclass(frozen=True)
class CalTable:
    kind: str
    path: Path
    valid_start_mjd: float
    valid_end_mjd: float

    def covers(self, mjd: float) -> bool:
        return self.valid_start_mjd <= mjd <= self.valid_end_mjd

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path),
                "valid_start_mjd": self.valid_start_mjd, "valid_end_mjd": self.valid_end_mjd}


@dataclass(frozen=True)
class CalSet:
    name: str
    tables: tuple[CalTable, ...]
    refant: str
    calibrator: str
    mid_mjd: float
    dec_deg: float
    params: dict[str, Any] = field(default_factory=dict)
    qa: dict[str, Any] = field(default_factory=dict)

    def table(self, kind: str) -> CalTable | None:
        return next((t for t in self.tables if t.kind == kind), None)

    def owner_of(self, table: CalTable) -> str:
        """The registered set a table belongs to: this one, or for a set combined from a
        bandpass set and a gain set (``params`` bp_set/g_set), the one it came from."""
        key = "bp_set" if table.kind in BANDPASS_KINDS else "g_set"
        return str(self.params.get(key) or self.name)

    def require_intact(self, tables: tuple[CalTable, ...] | list[CalTable]) -> None:
        """CalSetDamaged, naming the registered set that owns it, for the first of ``tables``
        missing on disk or no longer matching its seal (a power cut, a disk fault)."""
        for t in tables:
            if not (Path(t.path) / "table.dat").exists():
                why = "is missing on disk"
            else:
                mismatch = seal_mismatch(Path(t.path))
                if mismatch is None:
                    continue
                why = f"does not match its seal: {mismatch}"
            owner = self.owner_of(t)
            raise CalSetDamaged(f"calibration set {owner}: table {t.path} {why}", owner)

    def applied_tables(self) -> tuple[CalTable, ...]:
        """The tables applycal uses, in CASA's order (K, then BP, then G)."""
        return tuple(t for k in APPLY_ORDER for t in self.tables if t.kind == k)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tables": [t.as_dict() for t in self.tables],
                "refant": self.refant, "calibrator": self.calibrator, "mid_mjd": self.mid_mjd,
                "dec_deg": self.dec_deg, "params": self.params, "qa": self.qa}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalSet:
        tables = tuple(CalTable(t["kind"], Path(t["path"]), float(t["valid_start_mjd"]),
                                float(t["valid_end_mjd"])) for t in d["tables"])
        return cls(d["name"], tables, d["refant"], d["calibrator"], float(d["mid_mjd"]),
                   float(d["dec_deg"]), dict(d.get("params") or {}), dict(d.get("qa") or {}))
