"""Summaries over seeds: a mean with its standard deviation and Student's t interval.

Pure NumPy and SciPy; the examples and the study scripts report every model this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["interval"]


def interval(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "ci95", "n", "values"}`` of per-seed ``values``: the sample
    standard deviation and Student's t 95 % interval for the mean (both ``None`` for
    one value)."""
    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "std": None, "ci95": None, "n": len(v), "values": list(values)}
    if len(v) > 1:
        import scipy.stats  # here, not at the top: its import (~1 s) would slow every start

        std = float(v.std(ddof=1))
        half = float(scipy.stats.t.ppf(0.975, len(v) - 1)) * std / np.sqrt(len(v))
        out |= {"std": std, "ci95": [out["mean"] - half, out["mean"] + half]}
    return out
