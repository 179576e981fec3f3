"""Settings slice for the conversion stage."""

from __future__ import annotations

from dataclasses import dataclass

from ..configbase import setting


@dataclass(frozen=True)
class ConversionOptions:
    phase_mode: str = setting("CONTIMG_PHASE_MODE", "midtime", "Phase centre: one sidereal centre at the group's mid-time on the meridian", choices=("midtime",))
    stage_to_tmpfs: bool = setting("CONTIMG_STAGE_TO_TMPFS", True, "Stage inputs and the MS through tmpfs when it has room")
    tmpfs_headroom: float = setting("CONTIMG_TMPFS_HEADROOM", 2.0, "tmpfs must hold this multiple of the group's input size", minimum=1)
    parallel_subbands: int = setting("CONTIMG_CONVERT_PROCESSES", 1, "Processes writing subbands in parallel inside one conversion", minimum=1, maximum=32)
