"""Arithmetic on figures read from submitted logs, which may print 1e308, inf or nan: never raise on them."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def fmean(values: Iterable[float]) -> float:
    """statistics.fmean, but inf or nan where its exact sum raises (1e308 + 1e308 overflows, inf + -inf is invalid).
    Raises statistics.StatisticsError on no values, as fmean does."""
    xs = list(values)
    try:
        return statistics.fmean(xs)
    except statistics.StatisticsError:
        raise
    except (OverflowError, ValueError):
        return sum(xs) / len(xs)  # plain float addition: inf or nan, no exception
