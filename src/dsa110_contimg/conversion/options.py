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
    fill_threads: int = setting("CONTIMG_CONVERT_THREADS", 2, "Threads reading and phasing subbands inside one conversion (they run without Python's lock, and the next block fills while one is written)", minimum=1, maximum=32)
    stage_inputs: bool = setting("CONTIMG_STAGE_INPUTS", False, "Copy the subband files into the staging area before reading them: a snapshot for input directories that are slow or may change under us; costs one copy of the group (3.5 s and 2.3 GB of tmpfs at full size) and is pure overhead when the files were just written and sit in the page cache")
    keep_in_tmpfs: bool = setting("CONTIMG_TMPFS_KEEP_MS", False, "Keep each group's MS in tmpfs from conversion until the group is finished, then move it (with CORRECTED_DATA, twice the size) to its product directory: conversion skips its copy to disk, but the archive at the end copies and fsyncs twice the bytes and the kept MSs take RAM from the page cache; off by default because a full-size bench run was slower with it (README, Performance). A reboot empties tmpfs; groups whose MS was lost are converted again from their raw files")
    tmpfs_reserve_gb: float = setting("CONTIMG_TMPFS_RESERVE_GB", 6.0, "Keep an MS in tmpfs only if, after every kept MS has grown by its calibrated copy, this much memory stays available (and tmpfs free); otherwise publish it to disk at conversion. Warm column files (CONTIMG_WARM_COLUMN_SETS) are kept only while this much memory is available", minimum=0)
    warm_column_sets: int = setting("CONTIMG_WARM_COLUMN_SETS", 2, "After publishing an MS, keep the tile files of its big columns (DATA, FLAG) in the tmpfs work area for the next conversion of the same shape to write into, at most this many groups' worth (one per concurrent conversion): on a VM that hands freed memory back to its host, writing a full group's DATA into fresh tmpfs pages took 4.6-5.3 s, into kept ones 1.5 s. Each set holds one group's DATA and FLAG in RAM (2.1 GB at full size); kept only while CONTIMG_TMPFS_RESERVE_GB stays available, dropped first when staging needs the room, and freed when the daemon stops. 0 turns it off", minimum=0, maximum=16)
    publish_fsync: bool = setting("CONTIMG_CONVERT_FSYNC", True, "fsync the MS before publishing it, so a crash never leaves a published MS with holes (waits for the disk)")
    publish_direct: bool = setting("CONTIMG_PUBLISH_DIRECT", True, "Publish the MS's big files with O_DIRECT: from tmpfs straight to the disk instead of through as many fresh page-cache pages, which on a VM cost more to fault in than the copy itself; calibration then reads the MS from disk. Filesystems that refuse O_DIRECT get a plain copy")
    publish_early: bool = setting("CONTIMG_PUBLISH_EARLY", True, "When DATA is filled in place (warm column files), copy each block of it to disk as soon as it is filled, while the next fills, instead of all of it after the conversion: the disk and the cores work at once (needs CONTIMG_PUBLISH_DIRECT)")
    max_nonfinite_fraction: float = setting("CONTIMG_CONVERT_MAX_NONFINITE_FRACTION", 0.001, "A subband with more than this fraction of NaN/Inf visibilities is bad input; fewer are zeroed and flagged", minimum=0, maximum=1)
    uvw_note_m: float = setting("CONTIMG_CONVERT_UVW_NOTE_M", 0.01, "Report input UVW that differ from the antenna positions by more than this (m); UVW are always recomputed", minimum=0)
