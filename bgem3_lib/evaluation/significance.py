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
    d = _differences(a, b, "")
    _check_level(level, n_boot)
    means = _resampled_means(d, np.random.default_rng(seed), n_boot)
    return _interval(means, float(d.mean()), d.size, level)


def _differences(a, b, where: str) -> np.ndarray:
    """b - a [n] of two checked paired 1-d arrays; ``where`` prefixes the errors (e.g. a stratum's name)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{where}paired values need two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"{where}no queries to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{where}per-query values contain NaN or inf")
    return b - a


def _check_level(level: float, n_boot: int) -> None:
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")


def _resampled_means(d: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[n_boot] means of ``d`` resampled with replacement, in blocks that bound the [block, n] index matrix."""
    means = np.empty(n_boot)
    for s in range(0, n_boot, 1000):
        idx = rng.integers(0, d.size, size=(min(1000, n_boot - s), d.size))
        means[s:s + len(idx)] = d[idx].mean(axis=1)
    return means


def _interval(means: np.ndarray, diff: float, n: int, level: float) -> dict:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"diff": diff, "low": float(low), "high": float(high), "n": int(n), "level": level}


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


def macro_bootstrap(pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]], n_boot: int = 10_000,
                    level: float = 0.95, seed: int = 0) -> dict:
    """The difference of two macro averages (mean over strata, e.g. languages, of the mean over their queries)
    and its stratified paired-bootstrap interval: each replicate resamples queries within every stratum.

    ``pairs``: ``{stratum: (a [n_s], b [n_s])}``, paired per-query values. This is the interval for an
    "avg" row that averages per-language means, where a pooled :func:`paired_bootstrap` would weigh large
    languages more. One stratum gives :func:`paired_bootstrap`'s difference.

    >>> r = macro_bootstrap({"x": ([0.0, 0.0], [1.0, 1.0]), "y": ([0.5] * 8, [0.5] * 8)})
    >>> r["diff"], r["n"], r["strata"]                  # (1 + 0) / 2, not the pooled 2/10
    (0.5, 10, 2)
    """
    if not pairs:
        raise ValueError("no strata to compare")
    diffs = [_differences(a, b, f"stratum {name!r}: ") for name, (a, b) in pairs.items()]
    _check_level(level, n_boot)
    rng = np.random.default_rng(seed)
    means = sum(_resampled_means(d, rng, n_boot) for d in diffs) / len(diffs)   # replicate: mean over strata
    r = _interval(means, float(np.mean([d.mean() for d in diffs])), sum(d.size for d in diffs), level)
    return {**r, "strata": len(diffs)}


def mode_differences(per_query: Mapping[tuple, Mapping[str, float]], metric: str,
                     pairs: Sequence[tuple[str, str]], strata: Sequence[tuple] | None = None,
                     n_boot: int = 10_000, seed: int = 0):
    """Macro-averaged difference ``b - a`` of ``metric`` for each ``(a, b)`` pair of modes, with its
    stratified 95% bootstrap interval, as a DataFrame (one row per pair: diff, low, high, n, strata).

    ``per_query``: ``{(task, lang, mode, metric): {qid: value}}`` as
    :func:`~bgem3_lib.evaluation.runner.run_eval` fills it; ``strata``: the ``(task, lang)`` keys to average
    over (default: every one that has ``metric``). Queries are paired within a stratum by id.
    """
    import pandas as pd

    if strata is None:
        strata = sorted({(t, lang) for t, lang, _, m in per_query if m == metric})
    rows = []
    for a, b in pairs:
        by = {}
        for task, lang in strata:
            try:
                by[f"{task}/{lang}"] = paired_values({metric: per_query[task, lang, a, metric]},
                                                     {metric: per_query[task, lang, b, metric]}, metric)
            except KeyError as e:
                raise ValueError(f"no per-query {metric} for {e.args[0]!r}") from None
        rows.append({"a": a, "b": b, **macro_bootstrap(by, n_boot=n_boot, seed=seed)})
    return pd.DataFrame(rows)
