"""Typed options: unknown keys, wrong types and values outside a field's declared range are errors naming the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from vlprompt.errors import ConfigError
from vlprompt.options import RANGE, Range, options_from_dict


@dataclass
class _Opts:
    n: int = 1
    words: str = "x"


def test_options_from_dict():
    opts = options_from_dict(_Opts, {"n": 3}, where="method (demo)")
    assert isinstance(opts, _Opts) and opts.n == 3 and opts.words == "x"
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['m'\] for method \(demo\); valid options: n, words"):
        options_from_dict(_Opts, {"m": 3}, where="method (demo)")
    with pytest.raises(ConfigError, match=r"bad option for method \(demo\)"):
        options_from_dict(_Opts, {"n": "three"}, where="method (demo)")


@dataclass
class _RangedOpts:
    n: int = dataclasses.field(default=1, metadata={RANGE: Range(ge=1)})
    rates: list[float] = dataclasses.field(default_factory=list, metadata={RANGE: Range(gt=0, lt=1)})


def test_options_from_dict_checks_ranges_under_the_given_prefix():
    assert options_from_dict(_RangedOpts, {"n": 1, "rates": [0.5]}, where="x").rates == [0.5]
    with pytest.raises(ConfigError, match=r"^method\.n = 0: must be an integer >= 1$"):
        options_from_dict(_RangedOpts, {"n": 0}, where="method (demo)")
    with pytest.raises(ConfigError, match=r"^method\.base\.rates = \[0\.5, 1\.0\]: each must be a finite number in"):
        options_from_dict(_RangedOpts, {"rates": [0.5, 1.0]}, where="x", prefix="method.base.")
