"""The alert record shared by every producer (ingest, scheduler, monitors) and channel."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class Severity(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50

    @classmethod
    def parse(cls, name: str | Severity) -> Severity:
        if isinstance(name, Severity):
            return name
        return cls[name.strip().upper()]


@dataclass(frozen=True)
class Alert:
    severity: Severity
    category: str
    title: str
    message: str
    context: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"severity": self.severity.name, "category": self.category, "title": self.title,
                "message": self.message, "context": dict(self.context), "created": self.created}
