"""Declared ranges and choices of typed options: every numeric field states its allowed range and every enumerated
string field its allowed values once, in the field (:func:`ranged`, :func:`choice`, :func:`subset` and the shortcuts
:func:`count`, :func:`nonneg`, :func:`positive`, :func:`unit`); :func:`check_fields` enforces them.

Used by the run config's sections (:mod:`vlprompt.config`) and by every method's ``Options`` dataclass
(:func:`options_from_dict`), so it sits below both. ``key=`` or ``key=null`` unsets an optional key
(:func:`unset_nulls`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlprompt.errors import ConfigError

#: Field metadata keys of the declarations below.
RANGE, CHOICES = "range", "choices"
#: Field metadata key of :func:`subset`: a list whose items must be among the allowed names.
SUBSET = "subset"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: optional bounds (``ge``/``gt`` below, ``le``/``lt`` above) and one
    optional ``off`` value outside them (e.g. ``0`` = "off"). Floats must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    off: float | None = None

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.off is not None and value == self.off:
            return True
        if not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self, integer: bool) -> str:
        """``"an integer >= 1"``, ``"a finite number in [0, 1)"``, ``"0 or an integer >= 3"``..."""
        kind = "an integer" if integer else "a finite number"
        low = (self.ge, "[", ">=") if self.ge is not None else (self.gt, "(", ">") if self.gt is not None else None
        high = (self.le, "]", "<=") if self.le is not None else (self.lt, ")", "<") if self.lt is not None else None
        if low and high:
            text = f"{kind} in {low[1]}{_num(low[0])}, {_num(high[0])}{high[1]}"
        elif low or high:
            bound, _, op = low or high
            text = f"{kind} {op} {_num(bound)}"
        else:
            text = kind
        return text if self.off is None else f"{_num(self.off)} or {text}"


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    off: float | None = None,
) -> Any:
    """A dataclass field whose value (or each element, for lists and tuples) must lie in the given range."""
    meta = {RANGE: Range(ge, gt, le, lt, off)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def count(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field holding a count: an integer >= 1."""
    return ranged(default, ge=1, **kw)


def nonneg(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field >= 0 (weights, decays, "0 = off / all / automatic" counts)."""
    return ranged(default, ge=0, **kw)


def positive(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field > 0 (learning rates, temperatures, epsilons)."""
    return ranged(default, gt=0, **kw)


def unit(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field in [0, 1] (fractions, interpolation weights)."""
    return ranged(default, ge=0, le=1, **kw)


def choice(default: str, *allowed: str) -> Any:
    """A string field that must be one of ``allowed`` (``default`` included)."""
    return field(default=default, metadata={CHOICES: (default, *[a for a in allowed if a != default])})


def subset(*allowed: str) -> Any:
    """A list-of-names field (default empty) whose items must be among ``allowed``; see :func:`name_list`."""
    return field(default_factory=list, metadata={SUBSET: allowed})


def name_list(value: Any) -> Any:
    """A :func:`subset` field's value as a list: ``"a,b"`` and ``"a, b"`` become ``["a", "b"]``, ``None``, ``""`` and
    ``"none"`` become ``[]`` (so both open_clip's ``--report-to a,b`` and a YAML list work); anything else is kept
    for :func:`check_fields` to reject."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        names = [v.strip() if isinstance(v, str) else v for v in value]
        return [v for v in names if v not in ("", "none")]
    return value


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every declared range and choice of dataclass ``obj`` (recursing into nested dataclasses);
    the :class:`ConfigError` names the key (``prefix`` + field name), the value and what is allowed."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, key + ".")
        elif RANGE in f.metadata:
            rng: Range = f.metadata[RANGE]
            items = list(value) if isinstance(value, list | tuple) else [value]
            if any(v not in rng for v in items):
                integer = all(isinstance(v, int) for v in items)
                each = "each must be" if isinstance(value, list | tuple) else "must be"
                raise ConfigError(f"{key} = {value!r}: {each} {rng.describe(integer)}")
        elif CHOICES in f.metadata and value not in f.metadata[CHOICES]:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(f.metadata[CHOICES])}")
        elif SUBSET in f.metadata and (
            not isinstance(value, list) or any(v not in f.metadata[SUBSET] for v in value)
        ):
            raise ConfigError(f"{key} = {value!r}: each must be one of {', '.join(f.metadata[SUBSET])}")


def _empty_value(hint: Any, f: dataclasses.Field, key: str) -> Any:
    """What unsetting field ``f`` means: None for optional fields, ``""`` for strings, ``[]`` for lists."""
    origin = typing.get_origin(hint)
    if hint is Any or (origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)):
        return None
    if CHOICES in f.metadata:
        raise ConfigError(f"{key} cannot be unset: it must be one of {', '.join(f.metadata[CHOICES])}")
    if hint is str:
        return ""
    if origin is list:
        return []
    if RANGE in f.metadata:
        what = f.metadata[RANGE].describe(hint is int or typing.get_args(hint)[:1] == (int,))
        what = f"a list, each {what}" if origin is tuple else what
    else:
        what = "true or false" if hint is bool else getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key} cannot be unset ({key}= or {key}=null): it takes {what}; give a value")


def unset_nulls(values: Any, schema: type, prefix: str = "") -> Any:
    """``values`` (plain dicts, as parsed from YAML or ``key=value``) with every null replaced by what unsetting that
    key of dataclass ``schema`` means (:func:`_empty_value`), recursing into nested sections; a key that cannot be
    unset (a number, a flag, an enumerated choice) is a :class:`ConfigError` naming it. Unknown keys are kept for the
    merge to report."""
    if not isinstance(values, dict) or not dataclasses.is_dataclass(schema):
        return values
    try:
        hints = typing.get_type_hints(schema)
    except (NameError, TypeError):  # an annotation that cannot be resolved: leave the nulls to OmegaConf's message
        return values
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = {}
    for key, value in values.items():
        f, hint = fields.get(key), hints.get(key)
        if f is not None and value is None:
            value = _empty_value(hint, f, prefix + key)
        elif f is not None and isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = unset_nulls(value, hint, f"{prefix}{key}.")
        out[key] = value
    return out


def options_from_dict(schema: type, values: dict[str, Any], where: str, prefix: str = "method.") -> Any:
    """Typed options dataclass from a plain dict; unknown keys, wrong types and values outside the fields'
    declared ranges or choices are :class:`ConfigError` (range errors name the key as ``prefix`` + field)."""
    valid = [f.name for f in dataclasses.fields(schema)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {where}; valid options: {', '.join(valid) or '(none)'}")
    values = unset_nulls(values, schema, prefix)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad option for {where}: {getattr(err, 'msg', err)}") from None
    options = OmegaConf.to_object(merged)
    check_fields(options, prefix)
    return options
