"""kdvae.stats: the summary over seeds."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from kdvae import stats as kstats


def test_interval_is_students_t():
    stats = kstats.interval([1, 2, 3, 6])
    assert stats["mean"] == 3.0 and stats["n"] == 4 and stats["values"] == [1, 2, 3, 6]
    assert stats["std"] == pytest.approx(np.sqrt(14 / 3))
    half = 3.182446305284263 * np.sqrt(14 / 3) / 2  # t(0.975, 3) from the tables
    assert stats["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
    assert kstats.interval([5]) == {"mean": 5.0, "std": None, "ci95": None, "n": 1, "values": [5]}


def test_interval_is_scipys_t_interval():
    values = [3.1, 2.7, 3.9, 3.3, 2.8]
    low, high = scipy.stats.t.interval(
        0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values)
    )
    assert kstats.interval(values)["ci95"] == pytest.approx([low, high])
