"""Settings slices for ingest, the queue, the executor and the status API."""

from __future__ import annotations

from dataclasses import dataclass

from ..configbase import Secret, setting


@dataclass(frozen=True)
class IngestOptions:
    expected_subbands: int = setting("CONTIMG_EXPECTED_SUBBANDS", 16, "Subband files per group", minimum=1, maximum=64)
    group_tolerance_s: float = setting("CONTIMG_GROUP_TOLERANCE_S", 60.0, "Subband timestamps within this many seconds form one group", minimum=0)
    stable_seconds: float = setting("CONTIMG_FILE_STABLE_S", 5.0, "A file counts as written once its size is unchanged this long", minimum=0)
    group_timeout_s: float = setting("CONTIMG_GROUP_TIMEOUT_S", 600.0, "An incomplete group is handled by the timeout policy after this long", minimum=1)
    timeout_policy: str = setting("CONTIMG_TIMEOUT_POLICY", "process", "What to do with a group still incomplete at the timeout", choices=("process", "quarantine"))
    min_subbands: int = setting("CONTIMG_MIN_SUBBANDS", 12, "Fewest subbands the 'process' timeout policy accepts", minimum=1)
    poll_interval_s: float = setting("CONTIMG_INGEST_POLL_S", 1.0, "How often pending files are re-checked for completeness", minimum=0.05)


@dataclass(frozen=True)
class QueueOptions:
    max_attempts: int = setting("CONTIMG_MAX_ATTEMPTS", 3, "Tries per stage before a group is marked failed", minimum=1)
    backoff_base_s: float = setting("CONTIMG_BACKOFF_BASE_S", 30.0, "First retry delay; doubles with each attempt", minimum=0)
    backoff_max_s: float = setting("CONTIMG_BACKOFF_MAX_S", 1800.0, "Longest retry delay", minimum=0)
    heartbeat_s: float = setting("CONTIMG_HEARTBEAT_S", 10.0, "How often a running stage refreshes its claim", minimum=0.1)
    claim_timeout_s: float = setting("CONTIMG_CLAIM_TIMEOUT_S", 300.0, "A claim without heartbeat this long is taken back", minimum=1)
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
    token: Secret = setting("CONTIMG_API_TOKEN", Secret(""), "Bearer token required by state-changing endpoints (empty disables them)")
