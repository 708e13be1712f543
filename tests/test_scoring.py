"""bgem3_lib.retrieval.scoring against hand-worked values, plain-loop references and FlagEmbedding (slow)."""
import numpy as np
import pytest

from bgem3_lib.retrieval.scoring import (
    COMBINED_MODES,
    check_weights,
    colbert_score,
    colbert_score_batch_ms,
    combine_scores,
    dense_score,
    lexical_matching_score,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _random_lexical(rng, vocab=30, size=8):
    ids = rng.choice(vocab, size=size, replace=False)
    return {str(t): float(w) for t, w in zip(ids, rng.random(size).astype(np.float32))}


# ---------------------------------------------------------------- dense

def test_dense_score_matches_loop():
    rng = _rng(1)
    q, p = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    got = dense_score(q, p)
    ref = np.array([[sum(float(a) * float(b) for a, b in zip(qi, pj)) for pj in p] for qi in q])
    assert got.shape == (3, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_dense_score_hand_example():
    got = dense_score(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[0.6, 0.8]]))
    np.testing.assert_allclose(got, [[0.6], [1.6]], rtol=1e-6)


def test_dense_score_rejects_nan_and_shape_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        dense_score(np.array([[np.nan, 1.0]]), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4, 5\)"):
        dense_score(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        dense_score(np.ones(3), np.ones((4, 3)))


# ---------------------------------------------------------------- lexical

def test_lexical_hand_example():
    qw = {"10": 0.5, "7": 0.2, "3": 1.0}
    pw = {"10": 0.4, "3": 0.25, "99": 9.0}
    assert lexical_matching_score(qw, pw) == pytest.approx(0.5 * 0.4 + 1.0 * 0.25)
    assert lexical_matching_score(qw, {}) == 0.0
    assert lexical_matching_score({}, {}) == 0.0


def test_lexical_equals_dot_of_vocab_vectors_and_is_symmetric():
    rng = _rng(2)
    for _ in range(20):
        a, b = _random_lexical(rng), _random_lexical(rng)
        va, vb = np.zeros(30), np.zeros(30)
        for d, v in ((a, va), (b, vb)):
            for t, w in d.items():
                v[int(t)] = w
        assert lexical_matching_score(a, b) == pytest.approx(float(va @ vb), abs=1e-12)
        assert lexical_matching_score(a, b) == pytest.approx(lexical_matching_score(b, a), abs=1e-12)


def test_lexical_rejects_nan_and_non_dicts():
    with pytest.raises(ValueError, match="NaN"):
        lexical_matching_score({"1": float("nan")}, {"1": 1.0})
    with pytest.raises(TypeError, match="dict"):
        lexical_matching_score([("1", 1.0)], {"1": 1.0})


# ---------------------------------------------------------------- colbert

def test_colbert_hand_example():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[0.8, 0.6], [1.0, 0.0], [-1.0, 0.0]])
    # query vector 1 best matches p[1] (1.0), query vector 2 best matches p[0] (0.6)
    assert colbert_score(q, p) == pytest.approx((1.0 + 0.6) / 2)


def test_colbert_matches_loop_reference():
    rng = _rng(3)
    for n, m in ((1, 1), (4, 7), (9, 2)):
        q, p = rng.normal(size=(n, 6)), rng.normal(size=(m, 6))
        ref = sum(max(float(qi @ pj) for pj in p) for qi in q) / n
        assert colbert_score(q, p) == pytest.approx(ref, rel=1e-5)


def test_colbert_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        colbert_score(np.zeros((0, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3, 5\)"):
        colbert_score(np.ones((2, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        colbert_score(np.ones((2, 4)), np.full((3, 4), np.nan))


# ---------------------------------------------------------------- combination

def test_combine_scores_hand_worked():
    out = combine_scores(0.5, 0.2, 0.4, weights=(1.0, 0.3, 1.0))
    assert set(out) == set(COMBINED_MODES)
    assert float(out["dense"]) == 0.5 and float(out["sparse"]) == 0.2 and float(out["colbert"]) == 0.4
    assert float(out["sparse+dense"]) == pytest.approx((0.3 * 0.2 + 1.0 * 0.5) / 1.3)
    assert float(out["colbert+sparse+dense"]) == pytest.approx((0.5 + 0.06 + 0.4) / 2.3)


def test_combine_scores_arrays_and_default_weights():
    d, s, c = np.array([0.9, 0.1]), np.array([0.0, 0.6]), np.array([0.3, 0.3])
    out = combine_scores(d, s, c)
    np.testing.assert_allclose(out["sparse+dense"], [0.45, 0.35])
    np.testing.assert_allclose(out["colbert+sparse+dense"], [0.4, 1.0 / 3])


def test_combine_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="all zero"):
        combine_scores(0.1, 0.2, 0.3, weights=(0, 0, 0))
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        combine_scores(np.ones(2), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        combine_scores(np.nan, 0.2, 0.3)
    with pytest.raises(ValueError, match="sparse\\+dense"):
        combine_scores(0.1, 0.2, 0.3, weights=(0, 0, 1))
    with pytest.raises(ValueError, match="3 values|got 2"):
        check_weights((1.0, 0.3))
    with pytest.raises(ValueError, match=">= 0"):
        check_weights((1.0, -0.3, 1.0))


# ---------------------------------------------------------------- batched MindSpore colbert

def test_colbert_batch_ms_matches_per_pair_numpy():
    rng = _rng(4)
    b, n, m, h = 4, 5, 7, 8
    q = rng.normal(size=(b, n, h)).astype(np.float32)
    p = rng.normal(size=(b, m, h)).astype(np.float32)
    q_len, p_len = [5, 1, 3, 4], [7, 2, 1, 5]
    q_mask = (np.arange(n)[None] < np.array(q_len)[:, None]).astype(np.int32)
    p_mask = (np.arange(m)[None] < np.array(p_len)[:, None]).astype(np.int32)
    for i in range(b):
        p[i, p_len[i]:] = 100.0 * q[i, 0]              # padding would win every max if it leaked in
    got = colbert_score_batch_ms(q, q_mask, p, p_mask).asnumpy()
    ref = [colbert_score(q[i, :q_len[i]], p[i, :p_len[i]]) for i in range(b)]
    assert got.shape == (b,)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_colbert_batch_ms_padding_is_not_a_zero_vector():
    q = np.array([[[1.0, 0.0]]], np.float32)
    p = np.array([[[-1.0, 0.0], [0.0, 0.0]]], np.float32)     # second row is padding
    got = colbert_score_batch_ms(q, np.ones((1, 1)), p, np.array([[1, 0]])).asnumpy()
    assert got[0] == pytest.approx(-1.0)


def test_colbert_batch_ms_rejects_bad_input():
    q, p = np.ones((2, 3, 4), np.float32), np.ones((2, 5, 4), np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        colbert_score_batch_ms(q, np.ones((2, 4)), p, np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"p_mask: row\(s\) \[1\]"):
        colbert_score_batch_ms(q, np.ones((2, 3)), p, np.array([[1, 1, 0, 0, 0], [0] * 5]))
    with pytest.raises(ValueError, match="NaN"):
        colbert_score_batch_ms(np.full_like(q, np.nan), np.ones((2, 3)), p, np.ones((2, 5)))


# ---------------------------------------------------------------- FlagEmbedding 1.4.2 cross-check

@pytest.mark.slow
def test_against_flagembedding_formulas():
    pytest.importorskip("FlagEmbedding")
    from FlagEmbedding.inference.embedder.encoder_only.m3 import M3Embedder
    rng = _rng(5)
    for _ in range(5):
        a, b = _random_lexical(rng), _random_lexical(rng)
        # instance state is not used by these two methods
        reference = M3Embedder.compute_lexical_matching_score(None, a, b)
        assert lexical_matching_score(a, b) == pytest.approx(reference)
        q, p = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(9, 6)).astype(np.float32)
        assert colbert_score(q, p) == pytest.approx(float(M3Embedder.colbert_score(None, q, p)), rel=1e-5)
