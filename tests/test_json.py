"""palfast._json: reports written as JSON that strict readers accept (non-finite
numbers as null), everything else unchanged."""

import json
import math

import pytest

from palfast._json import dumps, finite_or_none


def _refuse(word):
    raise ValueError(f"not strict JSON: {word}")


def test_non_finite_numbers_become_null_at_any_depth():
    report = {"a": math.nan, "b": [1.5, math.inf, {"c": -math.inf, "d": (2, math.nan)}], "e": "NaN", "f": 0.0}
    text = dumps(report, indent=1)
    assert json.loads(text, parse_constant=_refuse) == {
        "a": None,
        "b": [1.5, None, {"c": None, "d": [2, None]}],
        "e": "NaN",
        "f": 0.0,
    }


def test_finite_values_are_kept_as_they_are():
    value = {"x": [1, 2.25, True, None, "s"], "y": {"z": -3e300}}
    assert finite_or_none(value) == value
    assert json.loads(dumps(value)) == value


def test_a_nan_that_default_makes_is_refused_not_written():
    class Odd:
        pass

    with pytest.raises(ValueError, match="not JSON compliant"):
        dumps({"x": Odd()}, default=lambda o: math.nan)
