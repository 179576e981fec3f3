"""The leaf every layer may use for what a group is called and where its products go.

- Names: the correlator names each subband file ``YYYY-MM-DDTHH:MM:SS_sbNN.hdf5``; a group id
  is the ISO timestamp of its anchor file. Both are parsed strictly here and nowhere else.
- Paths: a group's products live in OUTPUT_DIR/YYYY-MM-DD/<group-id>/ (never deleted
  automatically).
- Writes: :func:`atomic_write` (temporary file, fsync, rename, fsync of the directory), so a
  reader or a power cut sees the old file or the new one, never half of one.
- JSON: :func:`jsonable` and :func:`dumps` for numpy values, paths and non-finite floats;
  :class:`Record`, the base of the stage results, to and from JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from .errors import BadInputError, ContimgError

#: MS table keyword holding the conversion stage's completion record (read by later stages)
CONVERSION_RECORD = "contimg_conversion"

GROUP_ID_FORMAT = "%Y-%m-%dT%H:%M:%S"

# re.ASCII keeps \d from matching other scripts' digits (e.g. Arabic-Indic or fullwidth).
_TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}"
_SUBBAND_SUFFIX = r"_sb(\d{2})\.hdf5"
_NAME_RE = re.compile(rf"({_TIMESTAMP}){_SUBBAND_SUFFIX}", re.ASCII)
_SUFFIX_RE = re.compile(rf"{_SUBBAND_SUFFIX}$", re.ASCII)
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


def subband_number(name: str | Path) -> int | None:
    """The NN of a file name ending ``_sbNN.hdf5`` (any prefix), else None."""
    m = _SUFFIX_RE.search(Path(name).name)
    return int(m.group(1)) if m else None


def product_dir(output_dir: Path, group_id: str) -> Path:
    """The group's product directory; refuses ids that are not plain timestamps (no '..')."""
    try:
        gid = validate_group_id(group_id)
    except InvalidName as exc:
        raise BadInputError(f"group id {group_id!r} is not a YYYY-MM-DDTHH:MM:SS timestamp "
                            f"({exc.reason})") from None
    if gid != group_id:
        raise BadInputError(f"group id {group_id!r} is not a YYYY-MM-DDTHH:MM:SS timestamp")
    return Path(output_dir) / gid[:10] / gid


def safe_stem(group_id: str) -> str:
    """The group id as a file-name stem CASA tolerates (no ':' in table names)."""
    product_dir(Path("."), group_id)
    return group_id.replace(":", "")


def jsonable(value: Any) -> Any:
    """numpy scalars/arrays, paths and non-finite floats made safe for JSON (NaN -> null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def dumps(obj: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """JSON text of ``obj``; numpy values become numbers, anything else unknown its str()."""
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default)


def fsync_dir(directory: Path) -> None:
    """Make a rename or creation in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: str | bytes, durable: bool = True) -> Path:
    """Replace ``path`` with ``data`` all at once: a temporary file beside it, fsync, rename,
    and fsync of the directory (``durable=False`` skips the two fsyncs for scratch files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


class Record:
    """A frozen dataclass result that crosses process and restart boundaries as JSON.

    :meth:`to_dict` gives plain JSON values (paths as text, tuples as lists, nested records
    and anything with ``as_dict`` as dicts); :meth:`from_dict` rebuilds the instance from the
    field types, ignoring keys it does not know (written by a newer release) and using the
    defaults of fields that are missing (written by an older one)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                kwargs[f.name] = _from_json(hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__}: field {f.name!r} missing from {sorted(data)}")
        return cls(**kwargs)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a record class (cached: resolving them is slow)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _from_json(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _from_json(options[0], value) if len(options) == 1 else value
    if tp is Path:
        return Path(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in value)
        if args:
            return tuple(_from_json(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if isinstance(tp, type) and isinstance(value, Mapping) and hasattr(tp, "from_dict"):
        return tp.from_dict(value)
    return value
