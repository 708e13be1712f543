"""Paired bootstrap: against a direct resampling loop, exact shifts, coverage, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from bgem3_lib.evaluation.significance import (
    format_ci,
    macro_bootstrap,
    mode_differences,
    paired_bootstrap,
    paired_values,
)


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


def test_macro_bootstrap_resamples_within_strata_and_averages_strata():
    rng = np.random.default_rng(5)
    pairs = {"x": (rng.random(40), rng.random(40)), "y": (rng.random(7), rng.random(7) + 0.5)}
    r = macro_bootstrap(pairs, n_boot=3000, seed=2)
    assert r["diff"] == pytest.approx(np.mean([(b - a).mean() for a, b in pairs.values()]))   # macro, not pooled
    assert r["n"] == 47 and r["strata"] == 2
    gen = np.random.default_rng(2)                              # reference: stratum by stratum, the same draws
    means = np.zeros(3000)
    for a, b in pairs.values():
        idx = np.concatenate([gen.integers(0, len(a), size=(1000, len(a))) for _ in range(3)])
        means += np.array([(b[i] - a[i]).mean() for i in idx]) / 2
    assert (r["low"], r["high"]) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    one = macro_bootstrap({"x": pairs["x"]}, n_boot=3000, seed=2)
    assert one == {**paired_bootstrap(*pairs["x"], n_boot=3000, seed=2), "strata": 1}


def test_mode_differences_pairs_queries_by_id_within_each_language():
    pq = {("t", "de", "dense", "m"): {"q1": 0.0, "q2": 1.0}, ("t", "de", "all", "m"): {"q2": 1.0, "q1": 1.0},
          ("t", "zh", "dense", "m"): {"q1": 0.5}, ("t", "zh", "all", "m"): {"q1": 0.5, "extra": 1.0}}
    df = mode_differences(pq, "m", [("dense", "all")], n_boot=500)
    row = df.iloc[0]
    assert (row.a, row.b, row.strata, row.n) == ("dense", "all", 2, 3)
    assert row["diff"] == pytest.approx((0.5 + 0.0) / 2)          # de: +0.5 over paired ids; zh: 0 ("extra" unpaired)
    with pytest.raises(ValueError, match="no per-query m"):
        mode_differences(pq, "m", [("dense", "sparse")])


@pytest.mark.parametrize("bad, match", [({}, "no strata"), ({"x": ([1.0], [1.0, 2.0])}, "stratum 'x'"),
                                        ({"x": ([np.nan], [1.0])}, "NaN")])
def test_macro_bootstrap_names_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        macro_bootstrap(bad)
