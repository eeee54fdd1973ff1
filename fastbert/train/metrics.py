"""Metrics as standard JSON. ``json.dumps`` writes a non-finite float as ``NaN`` or ``Infinity``,
which strict JSON readers (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``) reject;
here such a value is written as ``null``, and ``allow_nan=False`` guards the rest."""

import json
import math

__all__ = ["dumps", "finite"]


def finite(obj):
    """``obj`` with every non-finite float (in dicts, lists and tuples) replaced by ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs):
    """``json.dumps`` of :func:`finite` ``(obj)``: always standard JSON."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
