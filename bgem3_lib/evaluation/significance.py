"""Is a difference between two systems real? Paired bootstrap confidence intervals over queries.

Two systems scored on the same queries give per-query values a_i, b_i (e.g. nDCG@10). The difference of
their means is d = mean(b - a). Resampling the queries with replacement ``n_boot`` times and taking the
2.5th and 97.5th percentiles of the resampled mean differences gives a 95% interval for d (the
percentile bootstrap, paired: both systems keep each resampled query). An interval that excludes 0
says the difference is unlikely to be an accident of which queries were drawn.

>>> a = np.array([0.2, 0.5, 0.9, 0.4]); b = a + 0.1
>>> r = paired_bootstrap(a, b)
>>> round(r["diff"], 3), round(r["low"], 3), round(r["high"], 3), r["n"]
(0.1, 0.1, 0.1, 4)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean difference ``b - a`` over paired per-query values [n] and its percentile-bootstrap interval.

    -> ``{"diff", "low", "high", "n", "level"}``; ValueError on unpaired, empty or non-finite input.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no queries to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-query values contain NaN or inf")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for s in range(0, n_boot, 1000):                     # blocks bound the [n_boot, n] index matrix
        idx = rng.integers(0, d.size, size=(min(1000, n_boot - s), d.size))
        means[s:s + len(idx)] = d[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": float(d.mean()), "low": float(low), "high": float(high), "n": int(d.size), "level": level}


def paired_values(run_a: Mapping[str, Mapping[str, float]], run_b: Mapping[str, Mapping[str, float]],
                  metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``metric`` of each query scored in both runs, in one query order. ``run_a`` / ``run_b``: per-query
    values as :func:`~bgem3_lib.retrieval.metrics.evaluate_run` gives them, ``{metric: {qid: value}}``."""
    a, b = run_a[metric], run_b[metric]
    qids = sorted(set(a) & set(b))
    if not qids:
        raise ValueError("the two runs share no query")
    return np.array([a[q] for q in qids]), np.array([b[q] for q in qids])


def format_ci(r: Mapping, scale: float = 100.0, digits: int = 1) -> str:
    """``+1.2 [0.4, 2.0]`` (points by default).

    >>> format_ci({"diff": 0.012, "low": 0.004, "high": 0.02})
    '+1.2 [+0.4, +2.0]'
    """
    f = f"{{:+.{digits}f}}"
    return f"{f.format(r['diff'] * scale)} [{f.format(r['low'] * scale)}, {f.format(r['high'] * scale)}]"
