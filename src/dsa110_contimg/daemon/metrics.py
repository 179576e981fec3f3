"""Counters the daemon keeps for the status API and Prometheus ``/metrics``."""

from __future__ import annotations

from collections import defaultdict


class Metrics:
    def __init__(self) -> None:
        self.stage_seconds_sum: dict[str, float] = defaultdict(float)
        self.stage_count: dict[str, int] = defaultdict(int)
        self.stage_last_s: dict[str, float] = {}
        self.qa_failures: dict[str, int] = defaultdict(int)
        self.groups_done = 0

    def stage_done(self, stage: str, seconds: float) -> None:
        self.stage_seconds_sum[stage] += seconds
        self.stage_count[stage] += 1
        self.stage_last_s[stage] = seconds

    def qa_failed(self, stage: str) -> None:
        self.qa_failures[stage] += 1

    def group_done(self) -> None:
        self.groups_done += 1


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(counts: dict[str, int], metrics: Metrics, alert_stats: dict,
                      disk_free: dict[str, int | None]) -> str:
    """Prometheus text exposition (version 0.0.4). Never includes settings or secrets.

    ``disk_free``: free bytes per named filesystem, measured by the caller off the event loop
    (None: unknown, e.g. its mount hangs)."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    family("contimg_groups", "gauge", "Groups by queue state")
    for state, n in sorted(counts.items()):
        out.append(f'contimg_groups{{state="{_esc(state)}"}} {n}')
    family("contimg_stage_duration_seconds", "summary", "Wall time of completed stages")
    for stage in sorted(metrics.stage_count):
        out.append(f'contimg_stage_duration_seconds_sum{{stage="{stage}"}} {metrics.stage_seconds_sum[stage]:.3f}')
        out.append(f'contimg_stage_duration_seconds_count{{stage="{stage}"}} {metrics.stage_count[stage]}')
    family("contimg_qa_failures_total", "counter", "Groups stopped by a QA gate")
    for stage in ("conversion", "calibration", "imaging"):
        out.append(f'contimg_qa_failures_total{{stage="{stage}"}} {metrics.qa_failures.get(stage, 0)}')
    family("contimg_groups_done_total", "counter", "Groups finished by this process")
    out.append(f"contimg_groups_done_total {metrics.groups_done}")
    family("contimg_alerts_total", "counter", "Alerts by outcome")
    for outcome in ("sent", "suppressed", "failed", "dropped"):
        for key, n in sorted(_flatten(alert_stats.get(outcome, {})).items()):
            out.append(f'contimg_alerts_total{{outcome="{outcome}",key="{_esc(key)}"}} {n}')
    family("contimg_disk_free_bytes", "gauge", "Free space on the pipeline's filesystems")
    for name, free in sorted(disk_free.items()):
        if free is None:
            continue
        out.append(f'contimg_disk_free_bytes{{path="{_esc(name)}"}} {free}')
    return "\n".join(out) + "\n"


def _flatten(value: object, prefix: str = "") -> dict[str, int]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {prefix or "all": int(value)}
    if isinstance(value, dict):
        flat: dict[str, int] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {}
