"""Subband file names and group ids.

The correlator names each file ``YYYY-MM-DDTHH:MM:SS_sbNN.hdf5``. The name is the only thing
ingest trusts before the file is complete, so it is parsed strictly: a name that does not match
exactly (spaces, path separators, ``..``, non-ASCII digits, another suffix, an impossible date)
is rejected with a reason instead of being guessed at.

A group id is the ISO timestamp of the group's anchor file, produced here from a parsed
``datetime`` and nowhere else. Ids can therefore be used as directory names without escaping;
ids that arrive from outside (CLI, HTTP API) go through :func:`validate_group_id`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import ContimgError

__all__ = [
    "GROUP_ID_FORMAT",
    "InvalidName",
    "SubbandName",
    "group_id_for",
    "group_time",
    "parse_subband_name",
    "validate_group_id",
]

GROUP_ID_FORMAT = "%Y-%m-%dT%H:%M:%S"

# re.ASCII keeps \d from matching other scripts' digits (e.g. Arabic-Indic or fullwidth).
_TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"
_NAME_RE = re.compile(rf"({_TIMESTAMP})_sb(\d{{2}})\.hdf5", re.ASCII)
_GROUP_ID_RE = re.compile(_TIMESTAMP, re.ASCII)
_MAX_NAME = 64


class InvalidName(ContimgError, ValueError):
    """A file name or group id that is not in the one accepted form; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name!r}: {reason}")


@dataclass(frozen=True, order=True)
class SubbandName:
    """What a subband file name says: when the correlator stamped it and which subband it is."""

    timestamp: datetime
    subband: int


def _why_not(name: str) -> str:
    """Pick the most useful reason for a rejected name (checked in order of likelihood)."""
    if not name:
        return "empty name"
    if len(name) > _MAX_NAME:
        return f"longer than {_MAX_NAME} characters"
    if "/" in name or "\\" in name or "\x00" in name:
        return "contains a path separator or NUL"
    if ".." in name:
        return "contains '..'"
    if not name.isascii():
        return "contains non-ASCII characters"
    if any(c.isspace() for c in name):
        return "contains whitespace"
    if not name.endswith(".hdf5"):
        return "suffix is not .hdf5"
    return "does not match <YYYY-MM-DDTHH:MM:SS>_sbNN.hdf5"


def _parse_timestamp(text: str, original: str) -> datetime:
    try:
        ts = datetime.strptime(text, GROUP_ID_FORMAT)
    except ValueError:
        raise InvalidName(original, f"{text} is not a valid date and time") from None
    return ts.replace(tzinfo=UTC)


def parse_subband_name(name: str) -> SubbandName:
    """Parse a bare file name (not a path); raise :class:`InvalidName` with a reason otherwise."""
    if not isinstance(name, str):
        raise InvalidName(repr(name), "not a string")
    m = _NAME_RE.fullmatch(name) if len(name) <= _MAX_NAME else None
    if m is None:
        raise InvalidName(name, _why_not(name))
    return SubbandName(_parse_timestamp(m.group(1), name), int(m.group(2)))


def group_id_for(timestamp: datetime) -> str:
    """The group id for an anchor timestamp (naive datetimes are taken as UTC)."""
    if timestamp.tzinfo is not None:
        timestamp = timestamp.astimezone(UTC)
    return timestamp.strftime(GROUP_ID_FORMAT)


def validate_group_id(text: str) -> str:
    """Accept an id from the CLI or API only in the exact form ingest produces."""
    if not isinstance(text, str):
        raise InvalidName(repr(text), "not a string")
    stripped = text.strip()
    if not _GROUP_ID_RE.fullmatch(stripped):
        raise InvalidName(text, "a group id looks like YYYY-MM-DDTHH:MM:SS")
    _parse_timestamp(stripped, text)
    return stripped


def group_time(group_id: str) -> datetime:
    """The anchor timestamp (UTC) of a valid group id."""
    return _parse_timestamp(validate_group_id(group_id), group_id)
