"""Turning table cells (floats, NaN, None, numpy scalars) into what templates show."""
from __future__ import annotations

import math


def num(x):
    """A float, or None for missing / NaN / non-numeric."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def integer(x):
    """An int, or None for missing / NaN / non-numeric."""
    v = num(x)
    return None if v is None else int(v)
