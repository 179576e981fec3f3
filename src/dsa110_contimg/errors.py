"""A small exception tree.

The scheduler translates these at the boundary: ``BadInputError`` and ``QAFailure``
quarantine a group (re-running cannot help), ``StageError`` is retried with backoff (except
``DiskFull``: held without using an attempt until space returns), and
``ConfigError`` stops the daemon at start-up with one line for the operator.
"""

from __future__ import annotations

import errno


class ContimgError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ConfigError(ContimgError):
    """A setting is missing or malformed; names the variable and the problem."""


class BadInputError(ContimgError):
    """The data itself is unusable (truncated, inconsistent, non-finite): quarantine.

    ``path`` names the offending file when there is one, so the operator can find it.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class StageError(ContimgError):
    """A stage could not finish for a reason that may pass (disk full, CASA fault): retry."""


class DiskFull(StageError):
    """A disk filled while the stage wrote: not the group's fault, and no attempt is used.

    The group is held and tried again until space returns."""


def is_no_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when casacore or CASA reports it as a RuntimeError message, or
    SQLite as SQLITE_FULL."""
    if isinstance(exc, DiskFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(t in text for t in ("No space left on device", "Disk quota exceeded",
                                   "database or disk is full"))


class CalSetDamaged(StageError):
    """A registered calibration set's tables are missing or no longer match their seal (a
    power cut, a disk fault): the set is marked failed and the group tries again at once
    with what else is valid, using no attempt."""

    def __init__(self, message: str, set_name: str) -> None:
        self.set_name = set_name
        super().__init__(message)

    def __reduce__(self) -> tuple:  # crosses the worker boundary pickled
        return (type(self), (self.args[0], self.set_name))


class QAFailure(ContimgError):
    """A QA gate blocked a group; carries the metrics that decided it."""

    def __init__(self, message: str, metrics: dict | None = None) -> None:
        self.metrics = metrics or {}
        super().__init__(message)


class IllegalTransition(ContimgError):
    """The queue refused a state change the state machine does not allow."""


class CalibrationUnavailable(ContimgError):
    """No valid calibration set applies to a group (the stale-calibration policy decides)."""


class MeasurementSetLost(ContimgError):
    """A converted group's MS is gone (tmpfs emptied by a reboot): convert the group again."""
