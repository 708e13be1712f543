"""bgem3_lib.retrieval.index against brute force built from bgem3_lib.retrieval.scoring and a plain sorted() ranking."""
import numpy as np
import pytest

from bgem3_lib.retrieval.index import DenseIndex, SparseIndex, colbert_rerank, lexical_weights_to_csr, top_k
from bgem3_lib.retrieval.scoring import colbert_score, dense_score, lexical_matching_score


def _ranking(row_scores, k):
    """Reference order: score descending, then index ascending (full Python sort)."""
    order = sorted(range(len(row_scores)), key=lambda j: (-row_scores[j], j))[:k]
    return order, [row_scores[j] for j in order]


def _lexical_corpus(rng, n, vocab=60, nnz=6):
    out = []
    for _ in range(n):
        ids = rng.choice(vocab, size=rng.integers(0, nnz + 1), replace=False)
        out.append({str(t): float(w) for t, w in zip(ids, rng.random(len(ids)).astype(np.float32))})
    return out


# ---------------------------------------------------------------- top_k

def test_top_k_tie_order_across_the_cut():
    s = np.array([[0.1, 0.5, 0.1, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ids, scores = top_k(s, 3)
    assert ids.tolist() == [[1, 4, 0], [0, 1, 2]]
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, [[0.5, 0.5, 0.1], [0, 0, 0]])


def test_top_k_matches_full_sort_with_many_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(20, 50)).astype(np.float32)      # heavy ties
    for k in (1, 7, 50, 80):
        ids, scores = top_k(s, k)
        for row, got in zip(s, ids):
            assert got.tolist() == _ranking(row.tolist(), k)[0]
        assert ids.shape == (20, min(k, 50))


def test_top_k_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(ValueError, match="positive integer"):
        top_k(np.ones((1, 3)), 0)
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        top_k(np.ones((1, 0)), 1)


# ---------------------------------------------------------------- dense

def test_dense_flat_matches_brute_force():
    rng = np.random.default_rng(1)
    docs, queries = rng.normal(size=(300, 16)), rng.normal(size=(7, 16))
    ids, scores = DenseIndex(docs).search(queries, 10)
    full = dense_score(queries, docs)
    for i in range(7):
        ref_ids, ref_scores = _ranking(full[i].tolist(), 10)
        assert ids[i].tolist() == ref_ids
        np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-5, atol=1e-5)


def test_dense_flat_ties_by_index_even_at_the_cut():
    base = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    docs = np.concatenate([base[[1, 0, 2, 0, 1, 0]]])            # doc 1, 3, 5 identical
    ids, scores = DenseIndex(docs).search(np.array([[1.0, 0.0], [0.0, 1.0]]), 2)
    assert ids.tolist() == [[1, 3], [0, 4]]
    np.testing.assert_allclose(scores, [[1, 1], [1, 1]])


def test_dense_k_larger_than_corpus_is_clipped():
    ids, scores = DenseIndex(np.eye(3)).search(np.array([[0.0, 1.0, 0.0]]), 10)
    assert ids.tolist() == [[1, 0, 2]] and scores.shape == (1, 3)


def test_dense_ivf_with_all_lists_probed_is_exact_and_hnsw_recalls():
    rng = np.random.default_rng(2)
    docs, queries = rng.normal(size=(400, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    exact, _ = DenseIndex(docs).search(queries, 5)
    ivf, _ = DenseIndex(docs, kind="ivf", nlist=8, nprobe=8).search(queries, 5)
    assert ivf.tolist() == exact.tolist()
    hnsw, _ = DenseIndex(docs, kind="hnsw", ef_search=200).search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(hnsw, exact)])
    assert recall >= 0.9


def test_dense_rejects_bad_input():
    with pytest.raises(ValueError, match="empty corpus"):
        DenseIndex(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="NaN"):
        DenseIndex(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="unknown index kind"):
        DenseIndex(np.eye(2), kind="lsh")
    with pytest.raises(ValueError, match="query dim 3 != index dim 2"):
        DenseIndex(np.eye(2)).search(np.ones((1, 3)), 1)


# ---------------------------------------------------------------- sparse

def test_sparse_matches_lexical_matching_score_loop():
    rng = np.random.default_rng(3)
    corpus, queries = _lexical_corpus(rng, 120), _lexical_corpus(rng, 9, nnz=10)
    index = SparseIndex(corpus, vocab_size=60)
    ids, scores = index.search(queries, 15)
    for i, qw in enumerate(queries):
        ref_ids, ref_scores = _ranking([lexical_matching_score(qw, d) for d in corpus], 15)
        assert ids[i].tolist() == ref_ids
        np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-5, atol=1e-6)


def test_sparse_score_matrix_and_ties():
    index = SparseIndex([{"1": 1.0}, {"2": 3.0}, {"1": 1.0, "2": 0.5}, {}], vocab_size=4)
    s = index.score_matrix([{"1": 2.0}, {}])
    np.testing.assert_allclose(s, [[2.0, 0.0, 2.0, 0.0], [0, 0, 0, 0]])
    ids, _ = index.search([{"1": 2.0}, {}], 3)
    assert ids.tolist() == [[0, 2, 1], [0, 1, 2]]
    assert index.search([{"1": 1.0}], 99)[0].shape == (1, 4)


def test_lexical_weights_to_csr_layout():
    m = lexical_weights_to_csr([{"3": 0.5, "0": 1.5}, {}, {"2": 2.0}], vocab_size=4)
    assert m.shape == (3, 4)
    np.testing.assert_allclose(m.toarray(), [[1.5, 0, 0, 0.5], [0, 0, 0, 0], [0, 0, 2.0, 0]])


def test_sparse_rejects_bad_input():
    with pytest.raises(ValueError, match="empty corpus"):
        SparseIndex([])
    with pytest.raises(ValueError, match="NaN"):
        SparseIndex([{"1": float("nan")}], vocab_size=4)
    with pytest.raises(ValueError, match="token ids"):
        SparseIndex([{"▁hello": 0.3}])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SparseIndex([{"7": 0.3}], vocab_size=4)
    with pytest.raises(TypeError, match="single dict"):
        SparseIndex([{"1": 1.0}], vocab_size=4).search({"1": 1.0}, 1)


# ---------------------------------------------------------------- colbert re-ranking

def test_colbert_rerank_matches_colbert_score():
    rng = np.random.default_rng(4)
    docs = [rng.normal(size=(rng.integers(1, 6), 8)).astype(np.float32) for _ in range(30)]
    queries = [rng.normal(size=(n, 8)).astype(np.float32) for n in (1, 4, 3)]
    cand = np.array([[0, 5, 29, 5], [3, 2, 1, 0], [7, 8, -1, 9]])
    got = colbert_rerank(queries, docs, cand)
    assert got.shape == (3, 4) and got.dtype == np.float32
    for i, row in enumerate(cand):
        for j, doc in enumerate(row):
            if doc < 0:
                assert got[i, j] == -np.inf
            else:
                assert got[i, j] == pytest.approx(colbert_score(queries[i], docs[doc]), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("token_block, stack_bytes", [
    (1 << 25, 1 << 29),   # one block over the whole stack
    (60, 1 << 29),        # several blocks: some multiply the whole stack, some gather their own rows
    (60, 16),             # nothing stacked up front: each block copies its documents
])
def test_colbert_rerank_blocks_and_stacking_agree_with_colbert_score(monkeypatch, token_block, stack_bytes):
    import bgem3_lib.retrieval.index as index
    monkeypatch.setattr(index, "_TOKEN_BLOCK", token_block)
    monkeypatch.setattr(index, "_STACK_BYTES", stack_bytes)
    rng = np.random.default_rng(5)
    docs = [rng.normal(size=(rng.integers(1, 6), 8)).astype(np.float16) for _ in range(40)]
    queries = [rng.normal(size=(rng.integers(1, 5), 8)).astype(np.float32) for _ in range(12)]
    cand = np.stack([rng.choice(40, size=6, replace=False) if i % 3 else np.r_[rng.choice(3, 2, replace=False),
                                                                              [-1] * 4] for i in range(12)])
    got = index.colbert_rerank(queries, docs, cand)
    for i, row in enumerate(cand):
        for j, doc in enumerate(row):
            want = -np.inf if doc < 0 else colbert_score(queries[i], docs[doc].astype(np.float32))
            assert got[i, j] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_colbert_rerank_rejects_bad_input():
    docs = [np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32)]
    q = [np.ones((1, 4), np.float32)]
    with pytest.raises(ValueError, match=r"doc_vecs\[1\]"):
        colbert_rerank(q, docs, np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        colbert_rerank(q, docs, np.array([[5]]))
    with pytest.raises(ValueError, match=r"\[Nq, K\]"):
        colbert_rerank(q, docs, np.array([[0], [0]]))
    with pytest.raises(ValueError, match="hidden sizes differ"):
        colbert_rerank([np.ones((1, 3), np.float32)], docs, np.array([[0]]))


def test_sparse_search_in_query_blocks_equals_one_block(monkeypatch):
    rng = np.random.default_rng(5)
    corpus, queries = _lexical_corpus(rng, 40), _lexical_corpus(rng, 7, nnz=10)
    index = SparseIndex(corpus, vocab_size=60)
    whole = index.search(queries, 5)
    monkeypatch.setattr("bgem3_lib.retrieval.index._BLOCK", 2 * 40)          # two queries per block
    blocked = index.search(queries, 5)
    assert blocked[0].tolist() == whole[0].tolist()
    np.testing.assert_array_equal(blocked[1], whole[1])
