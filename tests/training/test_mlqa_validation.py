"""Tests for bgem3_lib.training.mlqa_validation: ranking metrics by hand, scores against direct NumPy."""
from __future__ import annotations

import numpy as np
import pytest

from bgem3_lib.training.mlqa_validation import encode_from_states, mode_scores, rank_metrics, validate


def test_rank_metrics_hand_worked():
    s = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.0, 1.0]])
    out = rank_metrics(s, [0, 0, 1])          # ranks 1, 2 and 2.5 (tied with one other: expected rank)
    assert out == pytest.approx({"mrr@10": (1 + 0.5 + 0.4) / 3, "recall@1": 1 / 3})
    assert rank_metrics(np.zeros((1, 4)), [2]) == pytest.approx({"mrr@10": 1 / 2.5, "recall@1": 0.0})
    with pytest.raises(ValueError):
        rank_metrics(s, [0])


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    ids = [[0, *rng.integers(4, 30, n).tolist(), 2] for n in (4, 6, 5, 9, 7)]
    states = [rng.normal(size=(len(x), 8)).astype(np.float16) for x in ids]
    heads = {"colbert_linear.weight": rng.normal(size=(8, 8)).astype(np.float32),
             "colbert_linear.bias": np.zeros(8, np.float32),
             "sparse_linear.weight": np.abs(rng.normal(size=(1, 8))).astype(np.float32),
             "sparse_linear.bias": np.array([0.5], np.float32)}
    return ids, states, heads


def test_scores_match_direct_numpy():
    ids, states, heads = _setup()
    q = encode_from_states(lambda i: states[i], ids, [0, 1], heads, "mean")
    p = encode_from_states(lambda i: states[i], ids, [2, 3, 4], heads, "mean")
    s = mode_scores(q, p)
    h0, h3 = states[0].astype(np.float32), states[3].astype(np.float32)
    d0, d3 = h0.mean(0) / np.linalg.norm(h0.mean(0)), h3.mean(0) / np.linalg.norm(h3.mean(0))
    assert s["dense"][0, 1] == pytest.approx(float(d0 @ d3), abs=1e-5)
    c0, c3 = h0[1:] @ heads["colbert_linear.weight"].T, h3[1:] @ heads["colbert_linear.weight"].T
    c0 /= np.linalg.norm(c0, axis=1, keepdims=True)
    c3 /= np.linalg.norm(c3, axis=1, keepdims=True)
    assert s["colbert"][0, 1] == pytest.approx(float((c0 @ c3.T).max(1).mean()), abs=1e-5)
    assert np.allclose(s["all"], s["dense"] + 0.3 * s["sparse"] + s["colbert"])
    v = validate(lambda i: states[i], ids, [(0, 2, "en", "en"), (1, 3, "en", "de")], heads, "mean")
    assert set(v) == {"overall", "mono", "xling"} and set(v["overall"]) == set(s)
    with pytest.raises(ValueError):
        validate(lambda i: states[i], ids, [], heads, "mean")
