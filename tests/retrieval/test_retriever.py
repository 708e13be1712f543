"""HybridRetriever on a hand-made six-document corpus whose ranking per mode is worked out by hand.

One query: dense e_q = [1, 0, 0]; lexical {"10": 1.0, "11": 0.5}; multi-vector rows [1,0,0], [0,1,0].

doc  role              s_dense  s_lex             s_mul                 d+s (1, .3)   all (1, .3, 1)
d0   dense winner      1.0      0                 0                     1.00          1.00
d1   lexical winner    0        2.5*1.0 = 2.5     0                     0.75          0.75
d2   colbert winner    0.6      0                 (1 + 1)/2 = 1.0       0.60          1.60
d3   all-round         0.8      1.6*0.5 = 0.8     (0.8 + 0.6)/2 = 0.7   1.04          1.74
d4   unrelated         0        0                 0                     0             0
d5   opposite          -1.0     0.1*1.0 = 0.1     (-1 + 0)/2 = -0.5     -0.97         -1.47
"""
import numpy as np
import pytest

from bgem3_lib.retrieval.modes import MODES, PAPER_WEIGHTS
from bgem3_lib.retrieval.retriever import HybridRetriever


def _corpus():
    dense = np.array([[1, 0, 0], [0, 0, 1], [0.6, 0, 0.8], [0.8, 0.6, 0], [0, 1, 0], [-1, 0, 0]], np.float32)
    lexical = [{}, {"10": 2.5}, {}, {"11": 1.6}, {"99": 1.0}, {"10": 0.1}]
    colbert = [np.array(v, np.float32) for v in (
        [[0, 0, 1]], [[0, 0, 1]], [[1, 0, 0], [0, 1, 0]], [[0.8, 0.6, 0]], [[0, 0, 1]], [[-1, 0, 0]])]
    return {"dense_vecs": dense, "lexical_weights": lexical, "colbert_vecs": colbert}


def _query():
    return {"dense_vecs": np.array([[1, 0, 0]], np.float32), "lexical_weights": [{"10": 1.0, "11": 0.5}],
            "colbert_vecs": [np.array([[1, 0, 0], [0, 1, 0]], np.float32)]}


EXPECTED = {   # (ranking, scores) from the table above; equal scores ordered by doc index
    "dense": ([0, 3, 2, 1, 4, 5], [1.0, 0.8, 0.6, 0, 0, -1.0]),
    "sparse": ([1, 3, 5, 0, 2, 4], [2.5, 0.8, 0.1, 0, 0, 0]),
    "colbert": ([2, 3, 0, 1, 4, 5], [1.0, 0.7, 0, 0, 0, -0.5]),
    "dense+sparse": ([3, 0, 1, 2, 4, 5], [1.04, 1.0, 0.75, 0.6, 0, -0.97]),
    "all": ([3, 2, 0, 1, 4, 5], [1.74, 1.6, 1.0, 0.75, 0, -1.47]),
}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_ranks_as_worked_out_by_hand(mode):
    ids, scores = HybridRetriever(_corpus()).search(_query(), mode, k=6)
    ranking, expected_scores = EXPECTED[mode]
    assert ids.tolist() == [ranking]
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores[0], expected_scores, atol=1e-6)


def test_every_mode_has_a_different_winner():
    r = HybridRetriever(_corpus())
    winners = {m: int(r.search(_query(), m, k=1)[0][0, 0]) for m in MODES}
    assert winners == {"dense": 0, "sparse": 1, "colbert": 2, "dense+sparse": 3, "all": 3}


def test_colbert_only_reranks_the_dense_candidates():
    # dense top-2 is {d0, d3}: the colbert winner d2 is not a candidate
    ids, scores = HybridRetriever(_corpus()).search(_query(), "colbert", k=2, colbert_depth=2)
    assert ids.tolist() == [[3, 0]]
    np.testing.assert_allclose(scores, [[0.7, 0.0]], atol=1e-6)


def test_dense_plus_sparse_uses_only_the_union_of_candidates():
    # depth 1: dense top-1 {d0} ∪ sparse top-1 {d1}; d3 (best overall) is in neither
    r = HybridRetriever(_corpus())
    assert r.search(_query(), "dense+sparse", k=1, hybrid_depth=1)[0].tolist() == [[0]]
    assert r.search(_query(), "all", k=1, hybrid_depth=1, all_candidates="union")[0].tolist() == [[0]]
    assert r.search(_query(), "dense+sparse", k=1, hybrid_depth=2)[0].tolist() == [[3]]


def test_all_reranks_the_dense_top_candidates_as_the_paper():
    """Sec. 4.1: All re-ranks the Dense top-200 (``colbert_depth``), whatever the sparse hits are."""
    r = HybridRetriever(_corpus())
    # dense top-1 is {d0}: All must return d0 even though the union would hold d1 (sparse winner)
    assert r.search(_query(), "all", k=1, colbert_depth=1, hybrid_depth=1)[0].tolist() == [[0]]
    assert r.search(_query(), "all", k=1, colbert_depth=2)[0].tolist() == [[3]]       # {d0, d3}: d3 (1.74)
    # lexical-heavy weights (0.2, 0.8, 0): the sparse winner d1 scores 2.0, but it is not in the dense top-2
    w = (0.2, 0.8, 0.0)
    assert r.search(_query(), "all", k=1, colbert_depth=2, weights=w)[0].tolist() == [[3]]     # 0.16 + 0.64
    union = r.search(_query(), "all", k=1, hybrid_depth=2, weights=w, all_candidates="union")
    assert union[0].tolist() == [[1]]                                           # {d0, d3} ∪ {d1, d3}: d1
    with pytest.raises(ValueError, match="all_candidates"):
        r.search(_query(), "all", all_candidates="sparse")


def test_weights_change_the_hybrid_ranking():
    r = HybridRetriever(_corpus(), weights=PAPER_WEIGHTS["mldr"]["dense+sparse"])     # (0.2, 0.8, 0)
    ids, scores = r.search(_query(), "dense+sparse", k=3)
    assert ids.tolist() == [[1, 3, 0]]                 # 0.8*2.5 = 2.0; 0.16 + 0.64 = 0.8; 0.2
    np.testing.assert_allclose(scores, [[2.0, 0.8, 0.2]], atol=1e-6)
    ids, _ = r.search(_query(), "all", k=2, weights=(0.0, 0.0, 1.0))
    assert ids.tolist() == [[2, 3]]


def test_batch_of_queries_and_aliases():
    q = _query()
    two = {"dense_vecs": np.concatenate([q["dense_vecs"], [[0, 1, 0]]]).astype(np.float32),
           "lexical_weights": q["lexical_weights"] + [{"99": 1.0}],
           "colbert_vecs": q["colbert_vecs"] + [np.array([[0, 1, 0]], np.float32)]}
    r = HybridRetriever(_corpus())
    ids, _ = r.search(two, "colbert+sparse+dense", k=2)
    assert ids[0].tolist() == [3, 2]
    # query 2: d4 = 1 + 0.3 + 0 = 1.3; d3 = 0.6 + 0 + 0.6 = 1.2
    assert ids[1].tolist() == [4, 3]
    assert r.search(two, "sparse+dense", k=99)[0].shape == (2, 6)


def test_bad_input_gives_clear_errors():
    r = HybridRetriever(_corpus())
    with pytest.raises(ValueError, match="unknown mode 'hybrid'"):
        r.search(_query(), "hybrid")
    with pytest.raises(ValueError, match="empty corpus"):
        HybridRetriever({"dense_vecs": np.zeros((0, 3), np.float32), "lexical_weights": [],
                         "colbert_vecs": []})
    with pytest.raises(ValueError, match="disagree"):
        HybridRetriever({**_corpus(), "lexical_weights": [{}]})
    with pytest.raises(ValueError, match="all zero"):
        HybridRetriever(_corpus(), weights=(0, 0, 0))
    with pytest.raises(ValueError, match="needs corpus 'colbert_vecs'"):
        HybridRetriever({k: v for k, v in _corpus().items() if k != "colbert_vecs"}).search(_query(), "all")
    with pytest.raises(ValueError, match="needs query 'lexical_weights'"):
        r.search({"dense_vecs": _query()["dense_vecs"]}, "sparse")
    with pytest.raises(ValueError, match="positive integer"):
        r.search(_query(), "dense", k=0)
    with pytest.raises(TypeError, match="BGEM3.encode"):
        HybridRetriever([1, 2, 3])


def test_paper_weights_are_well_formed():
    for task, modes in PAPER_WEIGHTS.items():
        assert set(modes) == {"dense+sparse", "all"}, task
        assert modes["dense+sparse"][2] == 0.0


def test_hybrid_in_query_blocks_equals_one_block(monkeypatch):
    rng = np.random.default_rng(0)
    n, nq, h = 30, 5, 4

    def unit(*shape):
        x = rng.normal(size=shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    corpus = {"dense_vecs": unit(n, h),
              "lexical_weights": [{str(t): float(rng.random()) for t in rng.choice(20, 3)} for _ in range(n)],
              "colbert_vecs": [unit(rng.integers(1, 4), h) for _ in range(n)]}
    queries = {"dense_vecs": unit(nq, h),
               "lexical_weights": [{str(t): 1.0 for t in rng.choice(20, 2)} for _ in range(nq)],
               "colbert_vecs": [unit(2, h) for _ in range(nq)]}
    r = HybridRetriever(corpus)
    whole = r.search(queries, "all", k=4, hybrid_depth=6)
    monkeypatch.setattr("bgem3_lib.retrieval.retriever._BLOCK", n)            # one query per block
    blocked = r.search(queries, "all", k=4, hybrid_depth=6)
    assert blocked[0].tolist() == whole[0].tolist()
    np.testing.assert_allclose(blocked[1], whole[1], rtol=1e-6)


def test_all_reuses_the_colbert_scores_of_multi_vec_only_for_the_same_queries(monkeypatch):
    calls = []
    import bgem3_lib.retrieval.retriever as retriever_module
    real = retriever_module.colbert_rerank
    monkeypatch.setattr(retriever_module, "colbert_rerank", lambda *a: calls.append(1) or real(*a))
    r, q = HybridRetriever(_corpus()), _query()
    first = {m: r.search(q, m, k=6) for m in ("colbert", "dense+sparse", "all")}
    assert len(calls) == 1                      # All re-ranks Multi-vec's candidates: scored once
    for mode, (ids, scores) in first.items():   # and ranks exactly as a fresh retriever
        fresh = HybridRetriever(_corpus()).search(_query(), mode, k=6)
        assert ids.tolist() == fresh[0].tolist() and np.array_equal(scores, fresh[1])
    calls.clear()
    other = _query()
    other["colbert_vecs"] = [np.array([[0, 0, 1]], np.float32)]     # same dense top-k, new multi-vectors
    ids, scores = r.search(other, "colbert", k=6)
    assert len(calls) == 1 and ids[0, 0] in (0, 1, 4) and scores[0, 0] == 1.0
    r.search(q, "colbert", k=2, colbert_depth=2)  # other candidates: scored again
    assert len(calls) == 2
