"""The one settings object, built once at the entrypoint from ``CONTIMG_*`` variables.

Each component receives only its slice (``settings.conversion``, ``settings.qa_ms`` ...),
never the whole object, so a stage's inputs are visible in its signature.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .alerting.options import AlertOptions, MonitorOptions
from .calibration.options import CalibrationOptions
from .configbase import Secret, credential_names, describe_slice, load_slice, setting
from .conversion.options import ConversionOptions
from .errors import ConfigError
from .imaging.options import ImagingOptions
from .instrument import BeamOptions
from .qa.options import CalQAThresholds, ImageQAThresholds, MSQAThresholds


# --------------------------------------------------------------- the daemon's own slices
@dataclass(frozen=True)
class IngestOptions:
    expected_subbands: int = setting("CONTIMG_EXPECTED_SUBBANDS", 16, "Subband files per group", minimum=1, maximum=64)
    group_tolerance_s: float = setting("CONTIMG_GROUP_TOLERANCE_S", 60.0, "Subband timestamps within this many seconds form one group", minimum=0)
    stable_seconds: float = setting("CONTIMG_FILE_STABLE_S", 5.0, "A file counts as written once its size is unchanged this long", minimum=0)
    group_timeout_s: float = setting("CONTIMG_GROUP_TIMEOUT_S", 600.0, "An incomplete group is handled by the timeout policy after this long", minimum=1)
    timeout_policy: str = setting("CONTIMG_TIMEOUT_POLICY", "process", "What to do with a group still incomplete at the timeout", choices=("process", "quarantine"))
    min_subbands: int = setting("CONTIMG_MIN_SUBBANDS", 12, "Fewest subbands the 'process' timeout policy accepts", minimum=1)
    poll_interval_s: float = setting("CONTIMG_INGEST_POLL_S", 1.0, "How often pending files are re-checked for completeness", minimum=0.05)
    fs_timeout_s: float = setting("CONTIMG_INPUT_FS_TIMEOUT_S", 30.0, "A filesystem call on the input mount (stat, listing, header read) that takes longer marks the mount hung: ingest pauses (no group times out), /health says so and an alert goes out, until the call returns", minimum=0.1)


@dataclass(frozen=True)
class QueueOptions:
    max_attempts: int = setting("CONTIMG_MAX_ATTEMPTS", 3, "Tries per stage before a group is marked failed", minimum=1)
    backoff_base_s: float = setting("CONTIMG_BACKOFF_BASE_S", 30.0, "First retry delay; doubles with each attempt", minimum=0)
    backoff_max_s: float = setting("CONTIMG_BACKOFF_MAX_S", 1800.0, "Longest retry delay", minimum=0)
    heartbeat_s: float = setting("CONTIMG_HEARTBEAT_S", 10.0, "How often a running stage refreshes its claim", minimum=0.1)
    claim_timeout_s: float = setting("CONTIMG_CLAIM_TIMEOUT_S", 300.0, "A claim without heartbeat this long is taken back", minimum=1)
    disk_full_retry_s: float = setting("CONTIMG_DISK_FULL_RETRY_S", 60.0, "A stage stopped by a full disk is held (no attempt used) and tried again this often, until space returns", minimum=1)
    poison_starts: int = setting("CONTIMG_POISON_STARTS", 3, "A group found in flight at this many consecutive unclean daemon starts (crash, kill, power cut) is quarantined as a suspected poison group rather than crash-looping the daemon", minimum=1)
    hold_retry_s: float = setting("CONTIMG_CAL_HOLD_RETRY_S", 120.0, "A group held for want of calibration is re-tried this often", minimum=0.1)


@dataclass(frozen=True)
class ExecutorOptions:
    executor: str = setting("CONTIMG_EXECUTOR", "local", "'local' (process pool) or 'dask://host:port' (Dask distributed scheduler)")
    max_workers: int = setting("CONTIMG_MAX_WORKERS", 2, "Worker processes in the local pool", minimum=1, maximum=256)
    background_nice: int = setting("CONTIMG_BACKGROUND_NICE", 10, "Calibration and imaging workers run this much nicer than conversion, so a newly arrived group is converted (short; frees its input's page cache and tmpfs) while they wait a few seconds; 0 = all equal", minimum=0, maximum=19)
    shutdown_timeout_s: float = setting("CONTIMG_SHUTDOWN_TIMEOUT_S", 120.0, "On SIGTERM, how long in-flight stages may run before they are abandoned", minimum=0)
    stage_timeout_s: float = setting("CONTIMG_STAGE_TIMEOUT_S", 3600.0, "A stage running longer than this is abandoned and retried", minimum=1)


@dataclass(frozen=True)
class ApiOptions:
    enabled: bool = setting("CONTIMG_API_ENABLED", True, "Serve the status/metrics HTTP endpoint")
    host: str = setting("CONTIMG_API_HOST", "127.0.0.1", "Address the status API binds to (keep it on loopback unless proxied)")
    port: int = setting("CONTIMG_API_PORT", 8787, "Port of the status API (0 = any free port)", minimum=0, maximum=65535)
    token: Secret = setting("CONTIMG_API_TOKEN", Secret(""), "Bearer token required by state-changing endpoints (empty disables them)", credential="contimg-api-token")


@dataclass(frozen=True)
class PathsConfig:
    input_dir: Path = setting("CONTIMG_INPUT_DIR", Path("/data/dsa110/incoming"), "Directory the correlator writes UVH5 subband files into (watched)")
    output_dir: Path = setting("CONTIMG_OUTPUT_DIR", Path("/data/dsa110/products"), "Products: OUTPUT_DIR/YYYY-MM-DD/<group-id>/")
    scratch_dir: Path = setting("CONTIMG_SCRATCH_DIR", Path("/data/dsa110/scratch"), "Disk staging area used when tmpfs has no room")
    state_dir: Path = setting("CONTIMG_STATE_DIR", Path("/var/lib/contimg"), "SQLite queue, registries and CASA's own files")
    tmpfs_path: Path = setting("CONTIMG_TMPFS_PATH", Path("/dev/shm"), "tmpfs used for staging")


@dataclass(frozen=True)
class DatabaseOptions:
    startup_check: str = setting("CONTIMG_DB_STARTUP_CHECK", "integrity", "Check of the queue database before the daemon opens it: 'integrity' (PRAGMA integrity_check, also every index against its table: 3 s on a 380 MB database of 100k groups) or 'quick' (PRAGMA quick_check, pages and records only: 1 s on that database); a failed check restores the newest sound backup", choices=("integrity", "quick"))
    backup_interval_s: float = setting("CONTIMG_DB_BACKUP_INTERVAL_S", 3600.0, "How often the queue database is copied (SQLite online backup, integrity-checked) into STATE_DIR/backups; a restore after corruption loses at most this much queue history, which the products on disk then fill in", minimum=60)
    backup_keep: int = setting("CONTIMG_DB_BACKUP_KEEP", 24, "Backups kept in STATE_DIR/backups; older ones are deleted after each new one", minimum=1, maximum=10000)


@dataclass(frozen=True)
class StateLogOptions:
    prune_interval_s: float = setting("CONTIMG_STATE_PRUNE_INTERVAL_S", 600.0, "How often CASA's logs under STATE_DIR/casa/logs are pruned and worker-stderr.log rotated", minimum=10)
    casa_log_max_age_d: float = setting("CONTIMG_CASA_LOG_MAX_AGE_D", 14.0, "CASA logs (one per worker process) older than this many days are deleted; 0 keeps them regardless of age", minimum=0)
    casa_log_max_mb: float = setting("CONTIMG_CASA_LOG_MAX_MB", 2000.0, "The oldest CASA logs and rotated worker-stderr logs are deleted while STATE_DIR/casa/logs holds more than this many MB; 0 = no size limit", minimum=0)
    stderr_rotate_mb: float = setting("CONTIMG_WORKER_STDERR_ROTATE_MB", 100.0, "worker-stderr.log is renamed to .1 (older ones shifted up) once larger than this many MB", minimum=0.001)
    stderr_keep: int = setting("CONTIMG_WORKER_STDERR_KEEP", 5, "Rotated worker-stderr.log files kept (.1 .. .N)", minimum=1, maximum=1000)


@dataclass(frozen=True)
class LogOptions:
    level: str = setting("CONTIMG_LOG_LEVEL", "INFO", "Log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = setting("CONTIMG_LOG_FORMAT", "auto", "auto: JSON lines when stdout is not a TTY (journald), console otherwise", choices=("auto", "json", "console"))


SLICES: dict[str, type] = {
    "paths": PathsConfig,
    "log": LogOptions,
    "ingest": IngestOptions,
    "queue": QueueOptions,
    "executor": ExecutorOptions,
    "api": ApiOptions,
    "database": DatabaseOptions,
    "state_logs": StateLogOptions,
    "conversion": ConversionOptions,
    "beam": BeamOptions,
    "calibration": CalibrationOptions,
    "imaging": ImagingOptions,
    "qa_ms": MSQAThresholds,
    "qa_cal": CalQAThresholds,
    "qa_img": ImageQAThresholds,
    "alerts": AlertOptions,
    "monitors": MonitorOptions,
}


@dataclass(frozen=True)
class Settings:
    paths: PathsConfig
    log: LogOptions
    ingest: IngestOptions
    queue: QueueOptions
    executor: ExecutorOptions
    api: ApiOptions
    database: DatabaseOptions
    state_logs: StateLogOptions
    conversion: ConversionOptions
    beam: BeamOptions
    calibration: CalibrationOptions
    imaging: ImagingOptions
    qa_ms: MSQAThresholds
    qa_cal: CalQAThresholds
    qa_img: ImageQAThresholds
    alerts: AlertOptions
    monitors: MonitorOptions

    @property
    def queue_db(self) -> Path:
        return self.paths.state_dir / "contimg.sqlite"

    @property
    def db_backup_dir(self) -> Path:
        """Where the periodic backups of ``queue_db`` go (names sort by time)."""
        return self.paths.state_dir / "backups"

    @property
    def catalogue_db(self) -> Path:
        """The sky catalogue `contimg catalog build` writes (NVSS, calibrator lists)."""
        return self.paths.state_dir / "catalogue.sqlite"


def known_variables() -> set[str]:
    return {env for cls in SLICES.values() for env, _, _ in describe_slice(cls)}


def known_credentials() -> dict[str, str]:
    """{systemd credential name: variable} of every secret that may come as a credential."""
    return {name: env for cls in SLICES.values() for name, env in credential_names(cls).items()}


def load_settings(environ: Mapping[str, str] | None = None,
                  overrides: Mapping[str, str] | None = None) -> Settings:
    """Read every slice; CLI flags arrive as ``overrides`` keyed by variable name."""
    env = dict(os.environ if environ is None else environ)
    env.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = known_variables()
    unknown = sorted(k for k in env if k.startswith("CONTIMG_") and k not in known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting (typo?); see systemd/contimg.env")
    settings = Settings(**{name: load_slice(cls, env) for name, cls in SLICES.items()})
    _cross_check(settings)
    return settings


def _cross_check(s: Settings) -> None:
    if s.monitors.disk_crit_gb > s.monitors.disk_warn_gb:
        raise ConfigError("CONTIMG_DISK_CRIT_GB: must not exceed CONTIMG_DISK_WARN_GB")
    a = s.alerts
    if a.smtp_host and a.smtp_user and a.smtp_security == "none" and not a.smtp_allow_plaintext_login:
        raise ConfigError("CONTIMG_SMTP_USER: a login with CONTIMG_SMTP_SECURITY=none would send "
                          "the password in clear; set CONTIMG_SMTP_SECURITY to starttls or tls, "
                          "or CONTIMG_SMTP_ALLOW_PLAINTEXT_LOGIN=true for a trusted relay")
    if s.monitors.state_disk_crit_gb > s.monitors.state_disk_warn_gb:
        raise ConfigError("CONTIMG_STATE_DISK_CRIT_GB: must not exceed CONTIMG_STATE_DISK_WARN_GB")
    if s.ingest.min_subbands > s.ingest.expected_subbands:
        raise ConfigError("CONTIMG_MIN_SUBBANDS: must not exceed CONTIMG_EXPECTED_SUBBANDS")
    if s.calibration.field_catalogue:
        # Cheap: the file is there and is a format the catalogue builder reads; the daemon
        # parses it fully when it builds the catalogue at start-up.
        from .catalogue import CatalogueFormatError, detect_format

        source = Path(s.calibration.field_catalogue)
        if not source.is_file():
            raise ConfigError(f"CONTIMG_CAL_FIELD_CATALOGUE: {source} does not exist or is not "
                              "a file")
        try:
            detect_format(source)
        except CatalogueFormatError as exc:
            raise ConfigError(f"CONTIMG_CAL_FIELD_CATALOGUE: {exc}") from None
    ex = s.executor.executor
    if ex != "local" and not ex.startswith("dask://") and not ex.startswith("tcp://"):
        raise ConfigError(f"CONTIMG_EXECUTOR: {ex!r} is neither 'local' nor 'dask://host:port'")


def check_directories(paths: PathsConfig, need_input: bool = True) -> None:
    """Fail at start-up, one line per problem, rather than on the first group."""
    if need_input and not paths.input_dir.is_dir():
        raise ConfigError(f"CONTIMG_INPUT_DIR: {paths.input_dir} does not exist or is not a directory")
    for env, path in (("CONTIMG_STATE_DIR", paths.state_dir),
                      ("CONTIMG_OUTPUT_DIR", paths.output_dir),
                      ("CONTIMG_SCRATCH_DIR", paths.scratch_dir)):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{env}: cannot create {path}: {exc.strerror}") from None
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".contimg-write-test-"):
                pass
        except OSError as exc:
            raise ConfigError(f"{env}: {path} is not writable: {exc.strerror}") from None


def render_env_file() -> str:
    """The documented EnvironmentFile: every variable with its default."""
    lines = [
        "# dsa110-contimg settings: systemd EnvironmentFile (also read by `contimg` from the environment).",
        "# Every variable is listed with its default; uncomment and edit to change one.",
        "# Generated by `contimg config env`; tests check it lists every setting.",
        "",
    ]
    for name, cls in SLICES.items():
        lines.append(f"## {name}")
        for env, default, doc in describe_slice(cls):
            lines.append(f"# {doc}")
            lines.append(f"#{env}={default}")
        lines.append("")
    return "\n".join(lines)


def public_view(obj: object) -> dict:
    """Settings as plain data for the status API: secrets become '***'."""
    from .configbase import Secret

    out = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = public_view(v)
        elif isinstance(v, Secret):
            out[f.name] = "***" if v else ""
        elif isinstance(v, Path):
            out[f.name] = str(v)
        else:
            out[f.name] = v
    return out
