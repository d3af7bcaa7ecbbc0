"""The schema machinery of a typed config: number types with ranges, the check of one value against its type, and
the update of a tree of dataclasses from a nested mapping. Every error is a `ConfigError` naming the dotted key.

It knows no section: `mimkit.config` declares the shared sections with these types, each method its `Options`,
and whoever builds a run attaches the method sections (`mimkit.run_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from .errors import ConfigError

__all__ = ["Range", "PositiveInt", "NonNegInt", "PositiveFloat", "NonNegFloat", "Probability", "check_value",
           "apply_updates", "closest_name"]  # fmt: skip


@dataclass(frozen=True)
class Range:
    """Bounds of a number in the schema: `Annotated[int, Range(1)]` is an integer >= 1."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False  # True: the value must be strictly above `min`

    def check(self, key: str, value) -> None:
        low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        if low or (self.max is not None and value > self.max):
            if self.min is not None and self.max is not None:
                bounds = f"in {'(' if self.min_open else '['}{self.min:g}, {self.max:g}]"
            elif self.min is not None:
                bounds = f"{'>' if self.min_open else '>='} {self.min:g}"
            else:
                bounds = f"<= {self.max:g}"
            raise ConfigError(f"{key} must be {bounds}, got {value:g}")


PositiveInt = Annotated[int, Range(1)]
NonNegInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, min_open=True)]
NonNegFloat = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]


def check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *marks = typing.get_args(tp)
        value = check_value(key, value, base)
        for mark in marks:
            if isinstance(mark, Range):
                mark.check(key, value)
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            names = [repr(c) for c in choices]
            raise ConfigError(f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' expects a list of {len(args)} values, got {value!r}")
        return tuple(check_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads '1e-4' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        if not math.isfinite(number):  # NaN passes every range comparison; no setting means infinity
            raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def extra_sections(obj: Any) -> dict[str, Any] | None:
    """A dataclass's sections beyond its fields: the dict in its `sections` field (a run config's method sections,
    reached as attributes), or None when it has none."""
    sections = getattr(obj, "sections", None) if dataclasses.is_dataclass(obj) else None
    return sections if isinstance(sections, dict) else None


def apply_updates(obj: Any, updates: dict, prefix: str = "") -> None:
    """Set `obj`'s fields (and its extra sections' fields) from the nested mapping `updates`, each value checked
    against its type; an unknown key says the closest known one, a renamed key (`renamed` on the class) its new
    place."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj), include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    sections = extra_sections(obj)
    if sections is None:
        sections = {}
    else:
        del fields["sections"]  # the dict itself is no key: its sections are
    names = sorted(set(fields) | set(sections))
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            renamed = getattr(type(obj), "renamed", {})
            if k in renamed:
                raise ConfigError(f"config key '{key}' was renamed: use '{renamed[k]}'")
            raise ConfigError(f"unknown config key '{key}'{_did_you_mean(k, names, prefix)}")
        current = sections[k] if k in sections else getattr(obj, k)
        if dataclasses.is_dataclass(current):
            apply_updates(current, v, key + ".")
        else:
            setattr(obj, k, check_value(key, v, hints[k]))


def closest_name(name: str, names: list[str], cutoff: float = 0.6) -> str | None:
    """The one of `names` closest to a misspelt `name`, or None."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=cutoff)
    return close[0] if close else None


def _did_you_mean(name: str, names: list[str], prefix: str) -> str:
    close = closest_name(name, names)
    if close:
        return f"; did you mean '{prefix}{close}'?"
    return f" (known: {', '.join(names)})"
