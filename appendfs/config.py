"""Configuration: one frozen dataclass per daemon, loaded from TOML, environment and flags.

Precedence, lowest first: the dataclass default, the daemon's table in the TOML file
(``--config FILE`` or ``APPENDFS_CONFIG``), the environment (``APPENDFS_<SECTION>_<KEY>``),
then command-line flags. Every key is documented in its field's metadata and validated
when loaded; anything wrong raises :class:`~appendfs.errors.ConfigError` with one line
naming the key and its source, which the CLI prints before exiting with status 2.

Daemon config classes live beside their daemons (``store/datanode/config.py`` …) and use
:func:`option` to declare keys.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from appendfs.errors import ConfigError

T = TypeVar("T")
Check = Callable[[Any], str | None]


def option(default: Any, doc: str, check: Check | None = None) -> Any:
    """Declare a config key with its default, its documentation and an optional check.

    ``check(value)`` returns None when the value is fine, else the reason it is not.
    """
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def host_port(value: Any) -> str | None:
    try:
        parse_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6); raise ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        port_num = int(port)
    except ValueError:
        raise ValueError(f"{text!r}: port {port!r} is not a number") from None
    if not 0 <= port_num <= 65535:
        raise ValueError(f"{text!r}: port {port_num} out of range")
    return host, port_num


def _coerce(name: str, source: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (from TOML or a string from the environment) to ``typ``."""
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(name, source, value, args[0])
    if origin is tuple:
        (item,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
        if not isinstance(value, str | list | tuple):
            raise ConfigError(f"config {name} = {value!r} (from {source}): expected a list")
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(name, source, i.strip() if isinstance(i, str) else i, item) for i in items if i != "")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool | float):  # int(3.7) would silently drop the fraction
                raise ValueError(value)
            if not isinstance(value, str):
                return int(value)
            text = value.replace("_", "").strip()
            # base 0 understands 0x/0o/0b but refuses "010"; plain decimal otherwise
            return int(text, 0) if text[:2].lower() in ("0x", "0o", "0b") else int(text)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is Path:
            return Path(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"config {name} = {value!r} (from {source}): expected {getattr(typ, '__name__', typ)}") from None
    raise ConfigError(f"config {name}: unsupported type {typ!r}")


def read_toml(path: Path | None) -> dict[str, Any]:
    """Read the config file, or {} when none is given. Errors are one-line ConfigErrors."""
    if path is None:
        env = os.environ.get("APPENDFS_CONFIG")
        if not env:
            return {}
        path = Path(env)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def load(cls: type[T], section: str, *, file: Path | None = None, flags: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from defaults, the TOML ``[section]`` table, environment and flags."""
    environ = os.environ if environ is None else environ
    table = read_toml(file).get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file: [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(table) - set(fields)
    if unknown:
        raise ConfigError(f"config file: unknown key {section}.{sorted(unknown)[0]}")
    prefix = f"APPENDFS_{section.upper()}_"
    stray = sorted(k for k in environ if k.startswith(prefix) and k[len(prefix):].lower() not in fields)
    if stray:
        raise ConfigError(f"environment: {stray[0]} is not a [{section}] key (typo?)")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        env_key = f"APPENDFS_{section.upper()}_{name.upper()}"
        if flags and flags.get(name) is not None:
            raw, source = flags[name], f"--{name.replace('_', '-')}"
        elif env_key in environ:
            raw, source = environ[env_key], env_key
        elif name in table:
            raw, source = table[name], f"[{section}] in the config file"
        else:
            raw, source = f.default, "the default"
        # Defaults are checked too: a required key (say, the MetaNode list) has an empty default.
        value = raw if source == "the default" else _coerce(f"{section}.{name}", source, raw, hints[name])
        check = f.metadata.get("check")
        reason = check(value) if check and value is not None else None
        if reason and source == "the default":
            raise ConfigError(f"config {section}.{name} is not set: {reason}")
        if reason:
            raise ConfigError(f"config {section}.{name} = {value!r} (from {source}): {reason}")
        values[name] = value
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config [{section}]: {exc}") from None


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every key of a config class, for docs and `--help`."""
    return [(f.name, f.default, f.metadata.get("doc", "")) for f in dataclasses.fields(cls)]
