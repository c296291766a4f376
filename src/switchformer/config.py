"""Typed configuration base: validation in one place, JSON round trip and generic overrides.

Every component owns a small dataclass that derives from :class:`Config`. A config validates itself when it is
built, so a bad value fails where it was written rather than deep inside a forward pass. Overrides such as
``moe.capacity_factor=1.25`` are parsed against the field's declared type, so the command line needs no flag per
field.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Self


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is allowed."""


def invalid(owner: str, field: str, value: Any, allowed: str) -> ConfigError:
    """Build the one error format used by all configs: ``Owner.field=value is invalid: allowed``."""
    return ConfigError(f"{owner}.{field}={value!r} is invalid: {allowed}")


@dataclasses.dataclass
class Config:
    """Base for all configs. Subclasses implement :meth:`validate` and call :meth:`check` for each rule."""

    def __post_init__(self) -> None:
        self._coerce_fields()
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        """Raise :class:`ConfigError` for the first invalid field."""

    def check(self, condition: bool, field: str, allowed: str) -> None:
        """Raise a :class:`ConfigError` naming ``field`` unless ``condition`` holds."""
        if not condition:
            raise invalid(type(self).__name__, field, getattr(self, field), allowed)

    # -- conversion ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums become their values, nested configs become dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos never pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_plain(hints[k], v, f"{cls.__name__}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Self:
        text = Path(path_or_text).read_text() if _looks_like_path(path_or_text) else str(path_or_text)
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied (like :func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: typing.Iterable[str]) -> Self:
        """Apply ``path=value`` strings, e.g. ``moe.capacity_factor=1.25`` or ``moe=null``."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like field=value, e.g. moe.capacity_factor=1.25")
            path, raw = item.split("=", 1)
            _set_path(type(self), data, path.strip().split("."), raw.strip())
        return type(self).from_dict(data)

    def _coerce_fields(self) -> None:
        """Check every value against its declared type, accepting what JSON gives: strings for enums, dicts for
        nested configs, lists for tuples, ints for floats. Non-finite floats are refused here, once, for all."""
        hints = typing.get_type_hints(type(self))
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            declared = hints[f.name]
            target = _strip_optional(declared)
            if value is None:
                if target is not declared:
                    continue
                raise invalid(owner, f.name, value, f"must not be null (expected {_type_name(target)})")
            setattr(self, f.name, _coerce_value(owner, f.name, target, value))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce_value(owner: str, name: str, target: Any, value: Any) -> Any:
    if isinstance(target, type) and issubclass(target, enum.Enum):
        if isinstance(value, target):
            return value
        try:
            return target(value)
        except (ValueError, TypeError):
            allowed = ", ".join(repr(m.value) for m in target)
            raise invalid(owner, name, value, f"must be one of {allowed}") from None
    if isinstance(target, type) and issubclass(target, Config):
        if isinstance(value, dict):
            return target.from_dict(value)
        if not isinstance(value, target):
            raise invalid(owner, name, value, f"must be a {target.__name__} (or an object of its fields)")
        return value
    if target is bool:
        if not isinstance(value, bool):
            raise invalid(owner, name, value, "must be true or false")
        return value
    if target is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(owner, name, value, "must be an integer")
        return value
    if target is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(owner, name, value, "must be a number")
        if not math.isfinite(value):
            raise invalid(owner, name, value, "must be a finite number")
        return float(value)
    if target is str:
        if not isinstance(value, str):
            raise invalid(owner, name, value, "must be a string")
        return value
    if typing.get_origin(target) is tuple:
        if not isinstance(value, list | tuple):
            raise invalid(owner, name, value, "must be a list")
        item_types = [a for a in typing.get_args(target) if a is not Ellipsis]
        return tuple(_coerce_value(owner, name, item_types[0] if item_types else Any, v) for v in value)
    return value


def _looks_like_path(value: str | Path) -> bool:
    return isinstance(value, Path) or not str(value).lstrip().startswith("{")


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _from_plain(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    target = _strip_optional(tp)
    if isinstance(target, type) and issubclass(target, Config):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object of {target.__name__} fields, got {value!r}")
        return target.from_dict(value)
    if typing.get_origin(target) in (tuple, list) and isinstance(value, list):
        return tuple(value) if typing.get_origin(target) is tuple else list(value)
    return value


def _parse_scalar(tp: Any, raw: str, where: str) -> Any:
    """Parse an override's text against the field's type (``null`` clears optional fields)."""
    target = _strip_optional(tp)
    if raw.lower() in ("null", "none"):
        if target is tp:
            raise ConfigError(f"override {where}={raw!r}: {where} is required and cannot be null")
        return None
    try:
        if target is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if target is int:
            return int(raw)
        if target is float:
            return float(raw)
        if isinstance(target, type) and issubclass(target, enum.Enum):
            return target(raw).value
        if isinstance(target, type) and issubclass(target, Config):
            parsed = json.loads(raw)
            if not isinstance(parsed, dict):
                raise ConfigError(
                    f"override {where}={raw!r}: a nested config takes a JSON object such as "
                    f'{where}={{"field": value}}, or null, or set one field with {where}.FIELD=VALUE'
                )
            return parsed
    except ConfigError:
        raise
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"override {where}={raw!r}: cannot parse as {getattr(target, '__name__', target)}") from None
    if typing.get_origin(target) in (tuple, list):
        if not raw.startswith("["):  # comma-separated items, each parsed as the declared item type
            item = next((a for a in typing.get_args(target) if a is not Ellipsis), str)
            return [_parse_scalar(item, x.strip(), where) for x in raw.split(",") if x.strip()]
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ConfigError(f"override {where}={raw!r}: not a JSON list such as [0.9,0.98]") from None
    return raw


def _set_path(cls: type[Config], data: dict[str, Any], path: list[str], raw: str) -> None:
    hints = typing.get_type_hints(cls)
    head = path[0]
    if head not in hints:
        known = sorted(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{cls.__name__} has no field {head!r}; known fields: {known}")
    if len(path) == 1:
        data[head] = _parse_scalar(hints[head], raw, f"{cls.__name__}.{head}")
        return
    sub = _strip_optional(hints[head])
    if not (isinstance(sub, type) and issubclass(sub, Config)):
        raise ConfigError(f"{cls.__name__}.{head} is not a nested config, so {'.'.join(path)} cannot be set")
    if data.get(head) is None:
        data[head] = sub().to_dict()  # enabling a sub-config by setting one of its fields starts from defaults
    _set_path(sub, data[head], path[1:], raw)
