"""Declarative settings: each field names its ``CONTIMG_*`` variable, default and meaning.

Slices are frozen dataclasses built from these fields; ``load_slice`` reads one from an
environment mapping and reports a bad value as one line naming the variable. A secret may
also name a systemd credential, read from ``$CREDENTIALS_DIRECTORY`` in preference to its
variable (credentials, unlike the environment, are not inherited by worker processes).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError


class Secret:
    """A string that never shows itself in repr, logs or the status API."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def setting(env: str, default: Any, doc: str, choices: tuple[str, ...] | None = None,
            minimum: float | None = None, maximum: float | None = None,
            credential: str | None = None) -> Any:
    """A dataclass field bound to an environment variable (and, for a secret, a credential)."""
    meta = {"env": env, "doc": doc, "choices": choices, "min": minimum, "max": maximum,
            "credential": credential}
    if isinstance(default, list | dict | set):
        raise TypeError("use tuples for sequence defaults")
    if credential is not None and not isinstance(default, Secret):
        raise TypeError(f"{env}: only a Secret setting can name a credential")
    return dataclasses.field(default=default, metadata=meta)


CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"


def read_credential(name: str, env: str, environ: Mapping[str, str]) -> Secret | None:
    """The credential ``name`` from ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``),
    less one trailing newline; None when there is no such directory or file, or it is empty
    (the unit loads every credential, and an unused one is an empty file)."""
    directory = environ.get(CREDENTIALS_DIRECTORY, "")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{env}: cannot read credential {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{env}: credential {path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
    return Secret(text) if text else None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(raw: str, typ: Any, env: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw.strip() == "":
            return None
        return _parse(raw, inner[0], env)
    if typ is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{env}: {raw!r} is not a boolean (use true/false)")
    if typ is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{env}: {raw!r} is not an integer") from None
    if typ is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{env}: {raw!r} is not a number") from None
    if typ is Path:
        if not raw.strip():
            raise ConfigError(f"{env}: empty path")
        return Path(raw.strip()).expanduser()
    if typ is Secret:
        return Secret(raw.strip())
    if origin is tuple:
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        return tuple(_parse(p, args[0], env) for p in parts)
    if typ is str:
        return raw.strip()
    raise TypeError(f"unsupported setting type {typ!r} for {env}")


def load_slice(cls: type, environ: Mapping[str, str]) -> Any:
    """Build one frozen slice from ``environ``; unknown values fail with the variable's name."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        env = f.metadata.get("env")
        if env is None:
            continue
        value = f.default
        credential = f.metadata.get("credential")
        from_file = read_credential(credential, env, environ) if credential else None
        if from_file is not None:
            value = from_file
        elif env in environ:
            value = _parse(environ[env], hints[f.name], env)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{env}: {value!r} is not one of {', '.join(choices)}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value != value:  # NaN
                raise ConfigError(f"{env}: NaN is not allowed")
            if lo is not None and value < lo:
                raise ConfigError(f"{env}: {value} is below the minimum {lo}")
            if hi is not None and value > hi:
                raise ConfigError(f"{env}: {value} is above the maximum {hi}")
        kwargs[f.name] = value
    return cls(**kwargs)


def describe_slice(cls: type) -> list[tuple[str, str, str]]:
    """(variable, default as written in an env file, doc) for every field of a slice."""
    rows = []
    for f in dataclasses.fields(cls):
        env = f.metadata.get("env")
        if env is None:
            continue
        d = f.default
        if isinstance(d, bool):
            text = "true" if d else "false"
        elif isinstance(d, tuple):
            text = ",".join(str(x) for x in d)
        elif isinstance(d, Secret):
            text = ""
        elif d is None:
            text = ""
        else:
            text = str(d)
        doc = f.metadata["doc"]
        if f.metadata.get("choices"):
            doc += f" (one of: {', '.join(f.metadata['choices'])})"
        if f.metadata.get("credential"):
            doc += (f". Better as the systemd credential {f.metadata['credential']} "
                    "(LoadCredential=; read from $CREDENTIALS_DIRECTORY less one trailing "
                    "newline; an empty one counts as unset), which wins over the variable and "
                    "stays out of the environment that worker processes inherit")
        rows.append((env, text, doc))
    return rows


def credential_names(cls: type) -> dict[str, str]:
    """{credential name: variable} for every secret of a slice that can come as a credential."""
    return {f.metadata["credential"]: f.metadata["env"] for f in dataclasses.fields(cls)
            if f.metadata.get("credential")}
