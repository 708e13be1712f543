"""Paired bootstrap: against a direct resampling loop, exact shifts, coverage, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from bgem3_lib.evaluation.significance import format_ci, paired_bootstrap, paired_values


def test_matches_a_plain_resampling_loop():
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    r = paired_bootstrap(a, b, n_boot=2000, seed=11)
    gen = np.random.default_rng(11)                             # the same draws, one resample at a time
    idx = np.concatenate([gen.integers(0, 50, size=(1000, 50)) for _ in range(2)])
    means = [(b[i] - a[i]).mean() for i in idx]
    assert r["diff"] == pytest.approx((b - a).mean())
    assert (r["low"], r["high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        a = rng.normal(0.5, 0.2, 80)
        b = a + 0.03 + rng.normal(0, 0.1, 80)                   # true mean difference 0.03
        r = paired_bootstrap(a, b, n_boot=1000, seed=trial)
        hits += r["low"] <= 0.03 <= r["high"]
    assert 0.88 <= hits / 200 <= 0.99


def test_pairs_by_query_and_bad_input():
    a, b = paired_values({"m": {"q1": 0.1, "q2": 0.2}}, {"m": {"q2": 0.5, "q1": 0.3, "q3": 1.0}}, "m")
    assert a.tolist() == [0.1, 0.2] and b.tolist() == [0.3, 0.5]
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap([1, np.nan], [1, 2])
    with pytest.raises(ValueError, match="no queries"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="share no query"):
        paired_values({"m": {"a": 1}}, {"m": {"b": 1}}, "m")
    assert format_ci({"diff": -0.05, "low": -0.08, "high": -0.02}) == "-5.0 [-8.0, -2.0]"
