"""Two sets of runs compared: the difference of their means with a confidence interval
from Welch's t (unequal variances, Welch-Satterthwaite degrees of freedom)."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """mean(a) - mean(b) with its `confidence` interval and two-sided p-value by Welch's t
    (scipy's `ttest_ind(equal_var=False)`). With fewer than two values on a side, or no
    spread on either, the interval is None; what scipy warns of (values that differ only by
    rounding) is the result's "note", not a warning."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: expected a number in (0, 1)")
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not len(x) or not len(y):
        raise ValueError(f"welch needs values on both sides, got {len(x)} and {len(y)}")
    out: dict[str, Any] = {"mean_a": float(x.mean()), "mean_b": float(y.mean()),
                           "n_a": len(x), "n_b": len(y),
                           "difference": float(x.mean() - y.mean()),
                           "confidence": confidence, "low": None, "high": None,
                           "df": None, "p": None}
    if len(x) < 2 or len(y) < 2:
        out["note"] = "fewer than two runs on a side: no interval"
        return out
    if x.var() == 0 and y.var() == 0:
        out["note"] = "no spread on either side: no interval"
        return out
    with warnings.catch_warnings(record=True) as caught:  # scipy's word goes in the result
        warnings.simplefilter("always")
        test = stats.ttest_ind(x, y, equal_var=False)
        interval = test.confidence_interval(confidence)
    if caught:  # e.g. values equal but for rounding: "Precision loss occurred ..."
        out["note"] = str(caught[0].message).split(". ")[0]
    out.update(low=float(interval.low), high=float(interval.high), df=float(test.df),
               p=float(test.pvalue))
    return out


def compare_runs(a: dict[str, list[float]], b: dict[str, list[float]],
                 confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """For each metric both sides have (name -> values): `welch(a, b)`."""
    return {name: welch(a[name], b[name], confidence) for name in a if name in b}
