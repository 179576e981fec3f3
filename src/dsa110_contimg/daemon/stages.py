"""The pipeline's stages, declared once.

Each :class:`StageSpec` says what the queue and the scheduler need to know of a stage:

- its states: the group waits in the previous stage's ``done`` state (the first stage in
  ``pending``), is ``active`` while a worker runs it, and rests in ``done`` after it;
- ``task``: the function a worker runs (the stage and its QA gate, see :mod:`.tasks`);
- ``result``: the stage's typed result (a :class:`~dsa110_contimg.products.Record`), kept in
  the group's flags under the stage's name and read back by later stages
  (:meth:`StageSpec.handoff`);
- ``prepare``: builds the task's arguments from the claim (daemon side, in the event loop);
- ``finish``: what the daemon does with the (result, verdict): record and judge the verdict,
  then register, archive, alert; returns the verdict the queue records with the run. Its
  database writes go through ``ctx.bookkeep``: retried while the database is locked or its
  disk full, since the stage's work is done and must not be charged as a failed attempt.

The queue's states and transitions and the scheduler's dispatch are derived from
:data:`PIPELINE`; adding a stage is one declaration here plus the stage's own package (see
docs/design.md). Stored state names never change: databases written by earlier releases
keep working.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..alerting.alert import Alert, Severity
from ..errors import QAFailure
from ..products import Record, jsonable, product_dir
from ..qa.result import QAResult
from .tasks import calibrate_and_check, convert_and_check, image_and_check

if TYPE_CHECKING:
    from ..config import Settings
    from ..conversion.storage import MSStorage
    from .queue import Claim

FIRST_WAITING = "pending"  # where a complete group waits for the first stage
FINAL_STATE = "done"
HOLD_FLAG = "held"  # flag of a group held for want of calibration


class StageContext(Protocol):
    """What a stage's daemon-side hooks may use (the scheduler provides it)."""

    s: Settings
    queue: Any
    registry: Any
    catalog: Any
    emit: Callable[[Alert], None]
    ms: MSStorage

    def wake(self) -> None: ...
    async def locate_ms(self, claim: Claim) -> Path: ...
    def final_ms(self, group_id: str) -> Path: ...
    async def archive(self, claim: Claim, must: bool = False) -> None: ...
    async def judge(self, stage: str, claim: Claim, qa: QAResult) -> QAResult: ...
    async def record_qa(self, stage: str, claim: Claim, qa: QAResult) -> None: ...
    async def bookkeep(self, what: str, write: Callable[[], Awaitable[Any]]) -> Any: ...


Prepare = Callable[[StageContext, "Claim"], Awaitable[tuple[tuple[Any, ...], int]]]
Finish = Callable[[StageContext, "Claim", Any, QAResult | None], Awaitable[QAResult]]


@dataclass(frozen=True)
class StageSpec:
    name: str      # stage name in stage_runs, alerts and qa.json
    active: str    # state while a worker runs it
    done: str      # state after it passes
    task: Callable[..., tuple[Any, QAResult | None]]
    result: str  # "module:Class" of its Record, imported on first use (the daemon process
    #              must not import a stage's CASA stack)
    prepare: Prepare
    finish: Finish
    waiting: str = ""  # filled in by _chain: the previous stage's done state

    def handoff(self, flags: Mapping[str, Any]) -> Any:
        """This stage's typed result as recorded in a group's flags (None if not run)."""
        value = flags.get(self.name)
        return None if value is None else _record_type(self.result).from_dict(value)


# ------------------------------------------------------------------------------ conversion
async def _prepare_conversion(ctx: StageContext, claim: Claim) -> tuple[tuple[Any, ...], int]:
    from ..conversion.convert import ConversionInputs

    p = ctx.s.paths
    inputs = ConversionInputs(group_id=claim.group_id,
                              files=tuple(claim.files[k] for k in sorted(claim.files)),
                              output_dir=p.output_dir, scratch_dir=p.scratch_dir,
                              tmpfs_path=p.tmpfs_path,
                              work_dir=ctx.ms.work_dir)
    return (inputs, ctx.s.conversion, ctx.s.qa_ms), 0


async def _finish_conversion(ctx: StageContext, claim: Claim, res: Any,
                             qa: QAResult | None) -> QAResult:
    assert qa is not None
    return await ctx.judge(CONVERSION.name, claim, qa)


# ----------------------------------------------------------------------------- calibration
async def _prepare_calibration(ctx: StageContext, claim: Claim) -> tuple[tuple[Any, ...], int]:
    from ..calibration.stage import CalibrationInputs
    from ..instrument import PrimaryBeam

    conv = CONVERSION.handoff(claim.flags)
    gid, s = claim.group_id, ctx.s
    mid, dec = conv.mid_mjd, conv.pointing_dec_deg
    apply_set = await ctx.registry.find_valid(mid, dec, s.calibration)
    bandpass_set = await ctx.registry.find_bandpass(mid, dec, s.calibration)
    checked_by = None
    if bandpass_set is not None and s.calibration.field_check_bandpass:
        checked_by = await ctx.registry.bandpass_checked(
            bandpass_set.name, mid, dec, s.calibration.field_check_bandpass_every_h,
            max_noise_deg=s.qa_cal.max_bp_residual_phase_deg)
    catalogue = s.catalogue_db
    inputs = CalibrationInputs(group_id=gid, ms_path=await ctx.locate_ms(claim),
                               caltable_dir=product_dir(s.paths.output_dir, gid) / "caltables",
                               pointing_dec_deg=dec, mid_mjd=mid, apply_set=apply_set,
                               bandpass_set=bandpass_set,
                               catalogue_db=catalogue if catalogue.exists() else None,
                               beam=PrimaryBeam.from_options(s.beam),
                               bandpass_checked_by=checked_by)
    return (inputs, s.calibration, s.qa_cal), s.executor.background_nice


async def _finish_calibration(ctx: StageContext, claim: Claim, res: Any,
                              qa: QAResult | None) -> QAResult:
    from ..calibration.fieldsolve import registered_part

    gid = claim.group_id
    if res.mode == "uncalibrated":
        qa = QAResult(CALIBRATION.name, True, {"mode": "uncalibrated"},
                      warnings=("no valid calibration: imaged uncalibrated",))
        await ctx.record_qa(CALIBRATION.name, claim, qa)
        ctx.emit(Alert(Severity.WARNING, "calibration.stale",
                       f"Calibration stale: {gid} imaged uncalibrated",
                       "no valid calibration set; policy 'uncalibrated'", {"group_id": gid}))
    else:
        assert qa is not None
        try:
            qa = await ctx.judge(CALIBRATION.name, claim, qa)
        except QAFailure:
            if res.new_set is not None:
                name = res.new_set.name
                await ctx.bookkeep("calset_failed", lambda: ctx.registry.mark_failed(
                    name, "calibration QA failed"))
            raise
        if res.new_set is not None:
            part = registered_part(dataclasses.replace(res.new_set, qa=qa.metrics))
            await ctx.bookkeep("calset", lambda: ctx.registry.register(part))
            if await ctx.bookkeep("wake", lambda: ctx.queue.wake_flagged(HOLD_FLAG)):
                ctx.wake()
            if res.mode == "solved":
                ctx.emit(Alert(Severity.INFO, "calibration.new",
                               f"New calibration set {res.new_set.name}",
                               f"solved on {res.calibrator} in {gid}", {"group_id": gid}))
    if claim.flags.get(HOLD_FLAG):
        await ctx.bookkeep("unhold", lambda: ctx.queue.set_flag(gid, HOLD_FLAG, None))
    return qa


# --------------------------------------------------------------------------------- imaging
def _sky_catalogue(s: Settings) -> str | None:
    """The built sky catalogue, else the catalogue file named in the settings."""
    if s.catalogue_db.exists():
        return str(s.catalogue_db)
    return s.calibration.field_catalogue or None


async def _prepare_imaging(ctx: StageContext, claim: Claim) -> tuple[tuple[Any, ...], int]:
    from ..imaging.stage import ImagingInputs
    from ..instrument import PrimaryBeam

    cal = CALIBRATION.handoff(claim.flags)
    gid, s = claim.group_id, ctx.s
    mode = cal.mode if cal is not None else "uncalibrated"
    calibrator = cal.calibrator if cal is not None and mode == "solved" else None
    inputs = ImagingInputs(group_id=gid, ms_path=await ctx.locate_ms(claim),
                           ms_final=ctx.final_ms(gid),
                           product_dir=product_dir(s.paths.output_dir, gid),
                           datacolumn="data" if mode == "uncalibrated" else "corrected",
                           calibrator=calibrator, field_catalogue=_sky_catalogue(s),
                           beam=PrimaryBeam.from_options(s.beam))
    return (inputs, s.imaging, s.qa_img, calibrator), s.executor.background_nice


async def _finish_imaging(ctx: StageContext, claim: Claim, res: Any,
                          qa: QAResult | None) -> QAResult:
    assert qa is not None
    qa = await ctx.judge(IMAGING.name, claim, qa)
    await ctx.archive(claim, must=True)
    await ctx.bookkeep("catalogue", lambda: ctx.catalog.record(res, qa))
    return qa


@functools.cache
def _record_type(ref: str) -> type[Record]:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


CONVERSION = StageSpec("conversion", "converting", "converted", convert_and_check,
                       "dsa110_contimg.conversion.convert:ConversionResult",
                       _prepare_conversion, _finish_conversion)
CALIBRATION = StageSpec("calibration", "calibrating", "calibrated", calibrate_and_check,
                        "dsa110_contimg.calibration.stage:CalibrationResult",
                        _prepare_calibration, _finish_calibration)
IMAGING = StageSpec("imaging", "imaging", FINAL_STATE, image_and_check,
                    "dsa110_contimg.imaging.stage:ImagingResult",
                    _prepare_imaging, _finish_imaging)


def _chain(*stages: StageSpec) -> tuple[StageSpec, ...]:
    out, waiting = [], FIRST_WAITING
    for st in stages:
        out.append(dataclasses.replace(st, waiting=waiting))
        waiting = st.done
    if waiting != FINAL_STATE:
        raise ValueError(f"the last stage must end in {FINAL_STATE!r}, not {waiting!r}")
    return tuple(out)


#: The stages in order.
PIPELINE: tuple[StageSpec, ...] = _chain(CONVERSION, CALIBRATION, IMAGING)
CONVERSION, CALIBRATION, IMAGING = PIPELINE
BY_NAME: dict[str, StageSpec] = {st.name: st for st in PIPELINE}


def record(result: Record) -> dict[str, Any]:
    """What the queue keeps of a stage's result (flags and the run's metrics)."""
    return jsonable(result.to_dict())
