"""The result every QA gate returns: unpacks as ``(passed, metrics)``.

Failures block the group; warnings only alert. Metrics are plain JSON-able values so they
can go into the queue's stage history, qa.json and the status API unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..products import jsonable


@dataclass(frozen=True)
class QAResult:
    gate: str
    passed: bool
    metrics: dict[str, Any]
    failures: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    duration_s: float = 0.0

    def __iter__(self) -> Iterator[Any]:
        yield self.passed
        yield self.metrics

    @property
    def reason(self) -> str:
        return "; ".join(self.failures) if self.failures else "passed"

    def as_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "passed": self.passed, "failures": list(self.failures),
                "warnings": list(self.warnings), "duration_s": round(self.duration_s, 4),
                "metrics": jsonable(self.metrics)}


class GateBuilder:
    """Collects checks so each gate reads as a list of named rules."""

    def __init__(self, gate: str) -> None:
        self.gate = gate
        self.metrics: dict[str, Any] = {}
        self.failures: list[str] = []
        self.warnings: list[str] = []

    def fail_if(self, condition: bool, message: str) -> None:
        if condition:
            self.failures.append(message)

    def warn_if(self, condition: bool, message: str) -> None:
        if condition:
            self.warnings.append(message)

    def result(self, duration_s: float = 0.0) -> QAResult:
        return QAResult(self.gate, not self.failures, jsonable(self.metrics), tuple(self.failures),
                        tuple(self.warnings), duration_s)
