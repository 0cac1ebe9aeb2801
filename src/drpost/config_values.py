"""Recipe config values: text typed on the command line or read from YAML, converted to a field's type.

:class:`ConfigError` (every problem, naming the key), :class:`Raw` (command-line text, converted
according to the field's type), :func:`coerce` and :func:`parse_overrides` (``--section.key value``
tokens to ``(key, text)`` pairs). Nothing here knows the schema (:mod:`drpost.config`).
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

__all__ = ["ConfigError", "Raw", "coerce", "parse_overrides"]


class ConfigError(ValueError):
    """A bad recipe file or override; the message names the key."""


class Raw(str):
    """A value typed on the command line (still text: converted according to the field type)."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert ``value`` (from YAML, or :class:`Raw` text from the command line) to ``typ``."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X], or X | Y (the first that converts)
        members = [a for a in typing.get_args(typ) if a is not type(None)]
        inner = members[0]
        if type(None) in typing.get_args(typ) and (
                value is None or (isinstance(value, str) and value.strip().lower() in _NULL and str not in members)
                or (isinstance(value, Raw) and value.strip().lower() in ("null", "none", "~"))):
            return None
        for other in members[1:]:
            try:
                return coerce(value, inner, key)
            except ConfigError:
                inner = other
        return coerce(value, inner, key)

    def bad(expected: str) -> ConfigError:
        kind = "command-line text" if isinstance(value, Raw) else type(value).__name__
        shown = repr(str(value)) if isinstance(value, Raw) else repr(value)
        return ConfigError(f"config key {key!r} must be {expected}, got {shown} ({kind})")

    if typ is Any:
        if isinstance(value, Raw):
            try:
                return yaml.safe_load(str(value))
            except yaml.YAMLError as err:
                raise ConfigError(f"config key {key!r}: cannot parse {value!r} as YAML: {err}") from None
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad("an integer") from None
                if f.is_integer():
                    return int(f)
        raise bad("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad("a number")
    if typ is str:
        if isinstance(value, str):
            return str(value)
        raise bad("a string")
    if typing.get_origin(typ) is list:  # list[X]: a list, each item converted to X
        items = coerce(value, list, key)
        (item_type,) = typing.get_args(typ)
        return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(items)]
    if typ is list:
        if isinstance(value, Raw):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as err:
                    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as a list: {err}") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad("a list")
    raise TypeError(f"no converter for {typ}")  # a schema bug



def parse_overrides(args: list[str]) -> list[tuple[str, Raw]]:
    """``["--train.steps", "2", "--drpost.frac=0.25", "--train.bf16"]`` -> ``[(key, text), ...]``.

    A flag without a value (followed by another ``--flag`` or by nothing) means ``true``."""
    out, i = [], 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key value or "
                              "--section.key=value")
        body = tok[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2
                                        and not _is_number(args[i + 1])):
            key, value = body, args[i + 1]
            i += 2
        else:
            key, value = body, "true"
            i += 1
        out.append((key.replace("-", "_"), Raw(value)))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

