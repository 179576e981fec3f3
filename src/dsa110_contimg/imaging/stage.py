"""The imaging stage: MS -> tclean -> FITS (image, residual, beam, pb-corrected) + quick-look.

Called by the daemon in a fresh worker process as ``image_group(inputs, options)``.

- Works in a staging directory beside the product directory (same filesystem, no ':' in its
  name: CASA dislikes colons in table paths) and publishes each file by fsync and atomic
  rename, then fsyncs the directory and writes the ``<stem>.imaging.json`` record last (with
  each product's size and SHA-256), so neither a crash nor a power cut leaves a
  half-published image that a re-run would mistake for a finished one.
- Idempotent: when the record exists, its files match their recorded size and checksum, the
  options match and the MS has not been rewritten since (e.g. re-calibrated), the result is
  returned with ``skipped=True``; a product that does not match (empty or truncated after a
  power cut) is logged (``imaging.redo``) and the group imaged again.
- Unusable input (no rows, all flagged, NaN/zero data) raises ``BadInputError`` before tclean:
  the scheduler quarantines rather than retrying a deterministic failure. CASA faults and bad
  outputs raise ``StageError`` (retried). Quality judgement is the QA gate's job
  (``qa.image.check_image_quality``), not the stage's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ..catalogue import is_catalogue_db
from ..errors import BadInputError, ContimgError, StageError
from ..instrument import PrimaryBeam
from ..products import (
    Record,
    atomic_write,
    dumps,
    fsync_dir,
    make_dirs,
    publish_file,
    safe_stem,
    stamp,
    stamp_mismatch,
)
from .average import make_imaging_copy
from .cleanmask import MaskRules, run_masked_clean
from .export import export_fits, standard_keywords
from .msinfo import count_unflagged_nonfinite, pointing_icrs, summarize_ms
from .options import ImagingOptions
from .params import (
    NMAJOR_AFTER_PEEL,
    SIDELOBETHRESHOLD_AFTER_PEEL,
    params_from_plan,
    plan_imaging,
)
from .pbcor import write_beam_and_pbcor
from .peel import PeeledSource, peel_candidates, peel_sources, restore_sources, select_bright
from .stats import image_statistics
from .tclean_runner import ZERO_MASK, NonFiniteImage, clear_image_products, run_tclean

log = structlog.get_logger(__name__)

RECORD_VERSION = 1


@dataclass(frozen=True)
class ImagingInputs:
    group_id: str
    ms_path: Path
    product_dir: Path
    datacolumn: str = "corrected"   # 'corrected' | 'data'
    calibrator: str | None = None   # catalogue name, for the QA flux check
    field_catalogue: str | None = None  # built sky catalogue or a catalogue file: its survey sources are peeled too
    ms_final: Path | None = None  # where the MS ends up, if imaged from the tmpfs work area
    beam: PrimaryBeam = PrimaryBeam()  # the one beam model (CONTIMG_BEAM_*)


@dataclass(frozen=True)
class ImagingResult(Record):
    group_id: str
    image_fits: Path
    pbcor_fits: Path
    quicklook_png: Path | None
    residual_fits: Path | None
    pb_fits: Path | None
    bmaj_arcsec: float
    bmin_arcsec: float
    bpa_deg: float
    rms_jy: float
    peak_jy: float
    dynamic_range: float
    imsize: int
    cell_arcsec: float
    freq_hz: float
    centre_ra_deg: float
    centre_dec_deg: float
    tclean_params: dict[str, Any]
    duration_s: float
    skipped: bool = False
    tier: str = ""
    noise_expected_jy: float | None = None
    tclean_s: float = 0.0
    iterdone: int = 0
    nmajordone: int = 0
    stopreason: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    peeled: list[dict[str, Any]] = field(default_factory=list)  # see imaging.peel
    selfcal: dict[str, Any] = field(default_factory=dict)
    masks: list[dict[str, Any]] = field(default_factory=list)  # imaging.cleanmask rounds



def product_names(product_dir: Path, group_id: str) -> dict[str, Path]:
    stem = safe_stem(group_id)
    d = Path(product_dir)
    return {"image": d / f"{stem}.image.fits", "pbcor": d / f"{stem}.pbcor.fits",
            "pb": d / f"{stem}.pb.fits", "residual": d / f"{stem}.residual.fits",
            "quicklook": d / "quicklook.png", "record": d / f"{stem}.imaging.json"}


def options_fingerprint(options: ImagingOptions, datacolumn: str,
                        field_catalogue: str | None = None,
                        beam: PrimaryBeam | None = None) -> str:
    """What decides the image besides the MS: a different survey catalogue peels other
    sources, so its content (not its name) is part of it; so is the primary-beam model."""
    cat = None
    if field_catalogue:
        try:
            path = Path(field_catalogue)
            if is_catalogue_db(path):  # rebuilt by an atomic replace: a new file each time
                st = path.stat()
                cat = f"db:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
            else:
                cat = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            cat = f"unreadable:{field_catalogue}"
    extra = {"beam": beam.as_dict()} if beam is not None and beam != PrimaryBeam() else {}
    blob = json.dumps({**dataclasses.asdict(options), "datacolumn": datacolumn,
                       "field_catalogue": cat, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ms_mtime(ms_path: Path) -> float:
    """Latest modification of the MS's main-table data files (changes when a column is rewritten,
    e.g. re-calibration). ``table.lock`` is left out: merely opening the MS touches it."""
    ms_path = Path(ms_path)
    times = [p.stat().st_mtime for p in ms_path.iterdir()
             if p.is_file() and (p.name == "table.dat" or p.name.startswith("table.f"))]
    return max(times) if times else 0.0


def _finished(inputs: ImagingInputs, options: ImagingOptions) -> ImagingResult | None:
    names = product_names(inputs.product_dir, inputs.group_id)
    if not names["record"].exists():
        return None
    try:
        rec = json.loads(names["record"].read_text())
        result = ImagingResult.from_dict(rec["result"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("imaging.record_unreadable", path=str(names["record"]), error=str(exc))
        return None
    if rec.get("fingerprint") != options_fingerprint(options, inputs.datacolumn,
                                                     inputs.field_catalogue, inputs.beam):
        log.info("imaging.redo", group_id=inputs.group_id,
                 reason="imaging options or field catalogue changed")
        return None
    if Path(inputs.ms_path).exists() and ms_mtime(inputs.ms_path) > rec.get("ms_mtime", 0) + 1:
        log.info("imaging.redo", group_id=inputs.group_id, reason="MS rewritten since imaging")
        return None
    needed = {"image": result.image_fits, "pbcor": result.pbcor_fits,
              "quicklook": result.quicklook_png, "residual": result.residual_fits,
              "pb": result.pb_fits}
    stamps = rec.get("stamps") or {}
    for key, path in needed.items():
        if path is None:
            continue
        why = stamp_mismatch(Path(path), stamps.get(key))
        if why is not None:
            log.warning("imaging.redo", group_id=inputs.group_id, path=str(path),
                        reason=f"product does not match its record: {why}")
            return None
    return result


def image_group(inputs: ImagingInputs, options: ImagingOptions) -> ImagingResult:
    """Image one group's MS into ``inputs.product_dir`` (see the module docstring)."""
    t0 = time.monotonic()
    done = _finished(inputs, options)
    if done is not None:
        log.info("imaging.skipped", group_id=inputs.group_id, image=str(done.image_fits))
        return dataclasses.replace(done, skipped=True, duration_s=time.monotonic() - t0)
    ms_path = Path(inputs.ms_path)
    if not ms_path.is_dir():
        raise BadInputError("measurement set does not exist", path=str(ms_path))
    names = product_names(inputs.product_dir, inputs.group_id)
    stem = safe_stem(inputs.group_id)
    product_dir = Path(inputs.product_dir)
    staging = product_dir.parent / f".{stem}.imaging-staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        result = _image(inputs, options, ms_path, staging, stem, names, t0)
    except ContimgError:
        raise
    except Exception as exc:  # disk full, astropy/matplotlib faults: may pass, so retry
        raise StageError(f"imaging of {inputs.group_id} failed: {type(exc).__name__}: {exc}") \
            from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        fsync_dir(staging.parent)  # or a power cut brings the staging directory back
    log.info("imaging.done", group_id=inputs.group_id, image=str(result.image_fits),
             rms_jy=result.rms_jy, peak_jy=result.peak_jy, bmaj=round(result.bmaj_arcsec, 2),
             bmin=round(result.bmin_arcsec, 2), duration_s=round(result.duration_s, 2))
    return result


def _selfcal_threshold(inputs: ImagingInputs, options: ImagingOptions) -> float:
    """Self-calibrate only groups whose gains came from an earlier group (they drift by
    degrees in minutes). A group that solved on its own calibrator has nothing to gain, and
    phase solutions against a model that lacks the field would only absorb part of the field
    (flux suppression)."""
    if inputs.calibrator is not None or options.selfcal_min_apparent_jy <= 0:
        return float("inf")
    return options.selfcal_min_apparent_jy


def _after_peel(params: dict[str, Any]) -> None:
    """Only faint emission is left for clean once the bright sources are peeled (see
    imaging.params): automask at a lower sidelobe threshold, fewer major cycles."""
    if params.get("usemask") == "auto-multithresh":
        params["sidelobethreshold"] = SIDELOBETHRESHOLD_AFTER_PEEL
        cap = int(params["nmajor"])
        params["nmajor"] = NMAJOR_AFTER_PEEL if cap < 0 else min(cap, NMAJOR_AFTER_PEEL)


def _clean(params: dict[str, Any], peeled: bool, options: ImagingOptions, threshold_jy: float,
           ms_path: Path, inputs: ImagingInputs) -> tuple[Any, list[dict[str, Any]]]:
    """Run tclean (with scipy-built masks after peeling, when so configured); returns its
    outcome and the mask rounds. ``params`` records what was finally run."""
    masks: list[dict[str, Any]] = []
    try:
        if peeled and params.get("usemask") == "auto-multithresh" and options.masker == "scipy":
            out, rounds = run_masked_clean(params, MaskRules(
                noisethreshold=float(params["noisethreshold"]),
                sidelobethreshold=float(params["sidelobethreshold"]),
                lownoisethreshold=float(params["lownoisethreshold"]),
                minbeamfrac=float(params["minbeamfrac"])))
            masks = [r.as_dict() for r in rounds]
        else:
            out = run_tclean(params)
    except NonFiniteImage as exc:
        # the sampled pre-check missed them: look at every row before blaming CASA
        bad = count_unflagged_nonfinite(ms_path, inputs.datacolumn)
        if bad:
            raise BadInputError(f"{bad} unflagged NaN/Inf visibilities in {inputs.datacolumn} "
                                "blank the image (flag them upstream)", path=str(ms_path)) from exc
        raise
    if (out.stopcode == ZERO_MASK and out.iterdone == 0 and out.peak_jy > threshold_jy
            and params.get("usemask") == "auto-multithresh"):
        # PSF sidelobes above ~1/sidelobethreshold of the peak (a sparse array, a short
        # group) leave auto-multithresh nothing to mask: clean unmasked and shallower instead
        log.warning("imaging.automask_empty", group_id=inputs.group_id, peak_jy=out.peak_jy,
                    action="cleaning again without a mask, cyclefactor 1")
        params.update(usemask="user", cyclefactor=max(1.0, float(params["cyclefactor"])))
        out = run_tclean(params)
    return out, masks


def _export(out: Any, staged: dict[str, Path], keywords: dict[str, Any]) -> None:
    """The CASA image and residual as FITS with the product's standard keywords."""
    try:
        export_fits(out.image, staged["image"], keywords)
        export_fits(out.residual, staged["residual"], keywords)
    except Exception as exc:  # exportfits raises bare RuntimeErrors
        raise StageError(f"FITS export failed: {exc}") from exc


def _image_stats(image_fits: Path, inbeam: np.ndarray) -> tuple[dict[str, Any],
                                                                 tuple[float, float]]:
    """(rms / peak / dynamic range inside the beam, the image centre (RA, Dec) in degrees)."""
    from astropy.io import fits

    with fits.open(image_fits) as hdul:
        image = np.squeeze(hdul[0].data).astype(np.float64)
        header = hdul[0].header
        centre = (float(header["CRVAL1"]), float(header["CRVAL2"]))
    stats = image_statistics(image, inbeam)
    if not np.isfinite(stats["rms_jy"]):
        raise StageError("exported image has no finite pixels inside the primary beam")
    return stats, centre


def _quicklook(inputs: ImagingInputs, options: ImagingOptions, staged: dict[str, Path],
               pb: np.ndarray, rms: float) -> Path | None:
    """The quick-look PNG, or None (a missing picture must not lose the image)."""
    if not options.quicklook:
        return None
    try:
        from .quicklook import write_quicklook

        return write_quicklook(staged["image"], staged["quicklook"],
                               title=f"DSA-110 {inputs.group_id}", pb=pb,
                               pb_level=options.pb_level, rms=rms)
    except Exception as exc:
        log.warning("imaging.quicklook_failed", group_id=inputs.group_id, error=repr(exc))
        return None


def _image(inputs: ImagingInputs, options: ImagingOptions, ms_path: Path, staging: Path,
           stem: str, names: dict[str, Path], t0: float) -> ImagingResult:
    timings: dict[str, float] = {}
    tick = time.monotonic()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.monotonic()
        timings[name] = round(now - tick, 3)
        tick = now

    mtime = ms_mtime(ms_path)
    summary = summarize_ms(ms_path, inputs.datacolumn)
    plan = plan_imaging(summary, options, inputs.beam)
    imagename = str(staging / stem)
    params = params_from_plan(summary, plan, options, imagename)
    lap("summarize_and_plan")
    times = np.asarray(summary.times_mjd_s)
    track_ra, track_dec = pointing_icrs(summary.pointing_az_deg, summary.pointing_alt_deg,
                                        np.asarray(summary.array_itrf_m), times)
    tweights = np.asarray(summary.time_weights)
    bright = []
    if inputs.datacolumn == "corrected":  # fitting fluxes to uncalibrated data means nothing
        bright = select_bright(track_ra, track_dec, tweights, plan.ref_freq_hz,
                               inputs.beam, options.peel_min_apparent_jy,
                               peel_candidates(inputs.field_catalogue,
                                               _track_centre(track_ra, track_dec)))
    peeled: list[PeeledSource] = []
    selfcal: dict[str, Any] = {"applied": False}
    if options.max_smearing_loss > 0 or bright:
        chanbin = plan.chanbin if options.max_smearing_loss > 0 else 1
        copy = make_imaging_copy(ms_path, staging / f"{stem}.img.ms", inputs.datacolumn,
                                 chanbin, summary.n_channels // chanbin)
        params.update(vis=str(copy), datacolumn="data")
        lap("imaging_copy")
        if bright:
            peeled, selfcal = peel_sources(copy, bright, summary.pointing_az_deg,
                                           summary.pointing_alt_deg, plan.ref_freq_hz,
                                           inputs.beam, track_ra, track_dec, tweights,
                                           _selfcal_threshold(inputs, options))
            if peeled:
                _after_peel(params)
            lap("peel")
    out, masks = _clean(params, bool(peeled), options, plan.threshold_jy, ms_path, inputs)
    lap("tclean")

    staged = {k: staging / p.name for k, p in names.items()}
    _export(out, staged, standard_keywords(
        group_id=inputs.group_id, observer=summary.observer,
        start_mjd_s=min(summary.times_mjd_s) - summary.integration_s / 2,
        end_mjd_s=max(summary.times_mjd_s) + summary.integration_s / 2,
        freq_hz=plan.ref_freq_hz, array_itrf_m=summary.array_itrf_m,
        datacolumn=summary.datacolumn, tier=plan.tier, noise_expected_jy=plan.noise_expected_jy,
        bandwidth_hz=summary.freq_max_hz - summary.freq_min_hz, ms_name=ms_path.name))
    clear_image_products(imagename)  # CASA images are large and no longer needed
    shutil.rmtree(staging / f"{stem}.img.ms", ignore_errors=True)
    lap("export")
    if peeled:
        peeled = restore_sources(staged["image"], peeled, out.bmaj_arcsec, out.bmin_arcsec,
                                 out.bpa_deg)
        lap("restore")

    pb = write_beam_and_pbcor(staged["image"], staged["pb"], staged["pbcor"], track_ra,
                              track_dec, tweights, plan.ref_freq_hz,
                              inputs.beam, options.pb_level)
    stats, centre = _image_stats(staged["image"], pb >= options.pb_level)
    lap("pbcor_and_stats")

    quicklook = _quicklook(inputs, options, staged, pb, stats["rms_jy"])
    if not options.keep_residual:
        staged["residual"].unlink()
    lap("quicklook")

    published = {k: names[k] for k in ("image", "pbcor", "pb")}
    if options.keep_residual:
        published["residual"] = names["residual"]
    if quicklook is not None:
        published["quicklook"] = names["quicklook"]
    result = ImagingResult(
        group_id=inputs.group_id, image_fits=names["image"], pbcor_fits=names["pbcor"],
        quicklook_png=published.get("quicklook"), residual_fits=published.get("residual"),
        pb_fits=names["pb"], bmaj_arcsec=out.bmaj_arcsec, bmin_arcsec=out.bmin_arcsec,
        bpa_deg=out.bpa_deg, rms_jy=float(stats["rms_jy"]), peak_jy=float(stats["peak_jy"]),
        dynamic_range=float(stats["dynamic_range"]), imsize=plan.imsize,
        cell_arcsec=plan.cell_arcsec, freq_hz=plan.ref_freq_hz, centre_ra_deg=centre[0],
        centre_dec_deg=centre[1], tclean_params=params, duration_s=time.monotonic() - t0,
        skipped=False, tier=plan.tier, noise_expected_jy=plan.noise_expected_jy,
        tclean_s=out.duration_s, iterdone=out.iterdone, nmajordone=out.nmajordone,
        stopreason=out.stopreason, plan={**plan.as_dict(), "beam": inputs.beam.as_dict()},
        timings_s=timings,
        peeled=[p.as_dict() for p in peeled], selfcal=selfcal, masks=masks)
    record = {"version": RECORD_VERSION,
              "stamps": {k: stamp(staged[k]) for k in published},
              "fingerprint": options_fingerprint(options, inputs.datacolumn,
                                                 inputs.field_catalogue, inputs.beam),
              "ms_mtime": mtime, "ms_path": str(inputs.ms_final or ms_path), "pointing_source": summary.pointing_source,
              "result": result.to_dict()}
    _publish(staged, published, names["record"], dumps(record, indent=1))
    return result


def _track_centre(ra_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[float, float]:
    """Mean direction of the beam-centre track (a plain mean of RA fails across RA 0)."""
    a, d = np.radians(ra_deg), np.radians(dec_deg)
    v = np.array([np.mean(np.cos(d) * np.cos(a)), np.mean(np.cos(d) * np.sin(a)),
                  np.mean(np.sin(d))])
    return (float(np.degrees(np.arctan2(v[1], v[0])) % 360.0),
            float(np.degrees(np.arcsin(v[2] / np.linalg.norm(v)))))



def _publish(staged: dict[str, Path], published: dict[str, Path], record: Path,
             text: str) -> None:
    """fsync and atomic rename of each product into place, the directory fsynced, then the
    record (written durably) last marks completion."""
    make_dirs(record.parent)
    if record.exists():
        record.unlink()  # an older record must not vouch for half-replaced files
        fsync_dir(record.parent)
    for key, dest in published.items():
        publish_file(staged[key], dest)
    fsync_dir(record.parent)
    atomic_write(record, text)
