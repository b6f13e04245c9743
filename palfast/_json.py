"""JSON that strict readers accept: the reports of ``palfast demo`` and the benchmarks.

Python's ``json`` writes a float NaN or infinity as the bare words ``NaN`` /
``Infinity``, which are not JSON (RFC 8259) and which strict readers (JavaScript's
``JSON.parse``, ``jq``, most non-Python parsers) refuse. A report holds them where a
number does not exist: a paired difference to a strategy that did not run, a mean over
no seeds, a speed ratio with no baseline. :func:`dumps` writes them as ``null``.
"""

from __future__ import annotations

import json
import math


def finite_or_none(value):
    """``value`` with every non-finite float made None (``null`` in JSON), through dicts,
    lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` of :func:`finite_or_none` ``(value)`` with ``allow_nan=False``: a
    non-finite number left anywhere (inside an object ``default`` turns into one) is a
    ``ValueError`` rather than a file strict readers refuse."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
