"""bgem3_lib.retrieval.scoring against hand-worked values, plain-loop references and FlagEmbedding (slow)."""
import numpy as np
import pytest

from bgem3_lib.retrieval.scoring import colbert_score, dense_score, lexical_matching_score


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
