"""Settings slices for alert channels and system monitors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..configbase import Secret, setting

SEVERITIES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class AlertOptions:
    slack_webhook_url: Secret = setting("CONTIMG_SLACK_WEBHOOK_URL", Secret(""), "Slack incoming-webhook URL (secret; empty disables Slack)", credential="contimg-slack-webhook-url")
    slack_min_severity: str = setting("CONTIMG_SLACK_MIN_SEVERITY", "WARNING", "Lowest severity sent to Slack", choices=SEVERITIES)
    email_min_severity: str = setting("CONTIMG_EMAIL_MIN_SEVERITY", "ERROR", "Lowest severity sent by email", choices=SEVERITIES)
    log_min_severity: str = setting("CONTIMG_LOG_ALERT_MIN_SEVERITY", "DEBUG", "Lowest severity written to the log", choices=SEVERITIES)
    smtp_host: str = setting("CONTIMG_SMTP_HOST", "", "SMTP server (empty disables email)")
    smtp_port: int = setting("CONTIMG_SMTP_PORT", 25, "SMTP port", minimum=1, maximum=65535)
    smtp_security: str = setting("CONTIMG_SMTP_SECURITY", "none", "Connection security", choices=("none", "starttls", "tls"))
    smtp_user: str = setting("CONTIMG_SMTP_USER", "", "SMTP login user (empty: no login)")
    smtp_allow_plaintext_login: bool = setting("CONTIMG_SMTP_ALLOW_PLAINTEXT_LOGIN", False, "Allow the SMTP login (CONTIMG_SMTP_USER) without TLS, i.e. with CONTIMG_SMTP_SECURITY=none, sending the password in clear; only for a trusted local relay")
    smtp_password: Secret = setting("CONTIMG_SMTP_PASSWORD", Secret(""), "SMTP login password (secret)", credential="contimg-smtp-password")
    smtp_from: str = setting("CONTIMG_SMTP_FROM", "contimg@localhost", "Sender address")
    smtp_to: tuple[str, ...] = setting("CONTIMG_SMTP_TO", (), "Recipients, comma separated")
    rate_limit_count: int = setting("CONTIMG_ALERT_RATE_LIMIT", 10, "Alerts per category per window before suppression", minimum=1)
    rate_limit_window_s: float = setting("CONTIMG_ALERT_RATE_WINDOW_S", 300.0, "Rate-limit window", minimum=1)
    send_timeout_s: float = setting("CONTIMG_ALERT_TIMEOUT_S", 10.0, "Timeout of one send attempt", minimum=0.1)
    max_retries: int = setting("CONTIMG_ALERT_MAX_RETRIES", 3, "Retries of a failed send before it degrades to the log", minimum=0)
    buffer_size: int = setting("CONTIMG_ALERT_BUFFER", 1000, "Alerts held for sending; beyond this the oldest go to the log only", minimum=1)
    retry_backoff_s: float = setting("CONTIMG_ALERT_RETRY_BACKOFF_S", 2.0, "First delay before retrying a failed send; doubles with each retry", minimum=0)
    retry_max_delay_s: float = setting("CONTIMG_ALERT_RETRY_MAX_DELAY_S", 60.0, "Longest delay between retries, also the cap on a server's Retry-After", minimum=0)
    smtp_ca_file: Path | None = setting("CONTIMG_SMTP_CA_FILE", None, "PEM bundle trusted for SMTP TLS instead of the system store (e.g. a site CA)")


@dataclass(frozen=True)
class MonitorOptions:
    interval_s: float = setting("CONTIMG_MONITOR_INTERVAL_S", 60.0, "How often system monitors run", minimum=0.1)
    disk_warn_gb: float = setting("CONTIMG_DISK_WARN_GB", 200.0, "WARNING when free disk on input/scratch/output falls below this", minimum=0)
    disk_crit_gb: float = setting("CONTIMG_DISK_CRIT_GB", 100.0, "CRITICAL when free disk falls below this", minimum=0)
    state_disk_warn_gb: float = setting("CONTIMG_STATE_DISK_WARN_GB", 5.0, "WARNING when free disk on the state directory (queue database, backups, CASA logs) falls below this; used instead of CONTIMG_DISK_WARN_GB when the state directory has a filesystem to itself", minimum=0)
    state_disk_crit_gb: float = setting("CONTIMG_STATE_DISK_CRIT_GB", 1.0, "CRITICAL when free disk on the state directory falls below this (SQLite cannot commit on a full disk)", minimum=0)
    tmpfs_warn_pct: float = setting("CONTIMG_TMPFS_WARN_PCT", 90.0, "WARNING when tmpfs use exceeds this percentage", minimum=0, maximum=100)
    tmpfs_crit_pct: float = setting("CONTIMG_TMPFS_CRIT_PCT", 95.0, "CRITICAL when tmpfs use exceeds this percentage", minimum=0, maximum=100)
    queue_depth_warn: int = setting("CONTIMG_QUEUE_DEPTH_WARN", 6, "WARNING when more groups than this wait", minimum=1)
    stuck_after_s: float = setting("CONTIMG_STUCK_AFTER_S", 3600.0, "WARNING when a group stays in one active state longer than this", minimum=1)
    cal_age_warn_h: float = setting("CONTIMG_CAL_AGE_WARN_H", 24.0, "WARNING when the newest calibration set is older than this", minimum=0)
    hysteresis_pct: float = setting("CONTIMG_MONITOR_HYSTERESIS_PCT", 5.0, "A raised condition clears only once the value is this percentage of its warning threshold back on the good side (stops flapping)", minimum=0, maximum=50)
    probe_timeout_s: float = setting("CONTIMG_MONITOR_PROBE_TIMEOUT_S", 10.0, "A disk or queue probe not answering within this is reported (hung NFS mount, busy database)", minimum=0.1)
    cal_outlook_interval_s: float = setting("CONTIMG_CAL_OUTLOOK_INTERVAL_S", 600.0, "How often the daemon computes the calibration outlook (sets in force, calibrator transits, field model at the pointing) to warn of calibration gaps ahead", minimum=10)
    cal_outlook_lead_h: float = setting("CONTIMG_CAL_OUTLOOK_LEAD_H", 2.0, "WARNING, once per gap, when the calibration outlook shows groups going without calibration (held) within this many hours", minimum=0)
