"""weight_search: re-ranking from precomputed candidate scores equals HybridRetriever.search for the same
weights, and the fast metrics equal trec_eval (metrics.evaluate_run) on the re-ranked runs."""
import numpy as np
import pytest

from bgem3_lib.analysis.weight_search import (
    CandidateScores,
    best_weights,
    colbert_candidate_scores,
    combine,
    evaluate_weights,
    judgements,
    relevant_ranks,
    score_candidates,
    select_queries,
    simplex_grid,
    ternary_xy,
    to_simplex,
)
from bgem3_lib.retrieval import index
from bgem3_lib.retrieval.index import top_k
from bgem3_lib.retrieval.metrics import evaluate_run
from bgem3_lib.retrieval.modes import PAPER_WEIGHTS
from bgem3_lib.retrieval.retriever import HybridRetriever
from bgem3_lib.retrieval.scoring import colbert_score

VOCAB = 40
H = 8


def _encodings(rng, n, tokens=(3, 9), vectors=(2, 6)):
    dense = rng.normal(size=(n, H)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    lexical = []
    for _ in range(n):
        ids = rng.choice(VOCAB, size=rng.integers(*tokens), replace=False)
        # quantised weights: many equal lexical scores, so the tie rule is exercised
        lexical.append({str(t): float(rng.integers(1, 4)) / 4 for t in ids})
    colbert = [rng.normal(size=(rng.integers(*vectors), H)).astype(np.float32) for _ in range(n)]
    return {"dense_vecs": dense, "lexical_weights": lexical, "colbert_vecs": colbert}


def rerank(cs, weights, k):
    """Top-k candidates of ``combine`` (what the retriever's ``all`` mode returns)."""
    pos, best = top_k(combine(cs, weights), k)
    return np.take_along_axis(cs.ids, pos, axis=1), best


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    corpus = _encodings(rng, 60)
    queries = _encodings(rng, 9, tokens=(1, 4))
    retriever = HybridRetriever(corpus, vocab_size=VOCAB)
    return retriever, queries, rng


WEIGHTS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.3, 1.0), (0.2, 0.8, 0.0),
           (0.15, 0.5, 0.35), (0.7, 0.1, 0.2), (3.0, 3.0, 3.0)]


@pytest.mark.parametrize(("depth", "k"), [(5, 5), (12, 10), (1000, 10)])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_rerank_equals_retriever_all_mode(setup, depth, k, weights):
    retriever, queries, _ = setup
    cs = score_candidates(retriever, queries, depth=depth)
    got_ids, got_scores = rerank(cs, weights, k=k)
    ids, scores = retriever.search(queries, "all", k=k, hybrid_depth=depth, weights=weights, all_candidates="union")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 0.3, 0.0), (0.2, 0.8, 0.0), (0.0, 1.0, 0.0)])
def test_rerank_without_colbert_equals_dense_plus_sparse(setup, weights):
    retriever, queries, _ = setup
    cs = score_candidates(retriever, queries, depth=8, with_colbert=False)
    assert not cs.colbert.any()
    ids, _ = retriever.search(queries, "dense+sparse", k=8, hybrid_depth=8, weights=weights)
    np.testing.assert_array_equal(rerank(cs, weights, k=8)[0], ids)


def test_candidates_are_the_union_sorted_with_pads_last(setup):
    retriever, queries, _ = setup
    cs = score_candidates(retriever, queries, depth=5)
    dense_top, _ = retriever.search(queries, "dense", k=5)
    sparse_top, _ = retriever.search(queries, "sparse", k=5)
    for row, d, s in zip(cs.ids, dense_top, sparse_top):
        real = row[row >= 0]
        assert real.tolist() == sorted(set(d) | set(s))
        assert (row[len(real):] == -1).all()
    assert not cs.dense[~cs.valid].any() and np.isneginf(combine(cs, (1, 1, 1))[~cs.valid]).all()


@pytest.mark.parametrize("block", [1 << 25, 64])       # one block for all queries / one block per query
def test_batched_colbert_scores_equal_per_pair_scores(setup, monkeypatch, block):
    retriever, queries, _ = setup
    monkeypatch.setattr(index, "_TOKEN_BLOCK", block)
    ids = np.array([[0, 5, 7, -1], [3, 5, 59, 2], [-1, -1, -1, -1], [1, 2, 3, 4], [8, 9, 10, 11], [0, 1, 2, 3],
                    [59, 58, -1, -1], [4, 4, 4, 4], [6, 7, 8, 9]])
    got = colbert_candidate_scores(queries["colbert_vecs"], retriever.colbert_vecs, ids)
    ref = np.array([[colbert_score(queries["colbert_vecs"][i], retriever.colbert_vecs[d]) if d >= 0 else 0.0
                     for d in row] for i, row in enumerate(ids)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32 and not got[ids < 0].any()
    with pytest.raises(ValueError, match="candidate ids"):
        colbert_candidate_scores(queries["colbert_vecs"], retriever.colbert_vecs, ids + 1)


def _random_qrels(rng, nq, n):
    """1-3 relevant docs per query, graded 1 or 2, plus a judged non-relevant one."""
    qrels = {}
    for i in range(nq):
        docs = rng.choice(n, size=rng.integers(2, 5), replace=False)
        qrels[f"q{i}"] = {f"d{j}": int(rng.integers(1, 3)) for j in docs[1:]} | {f"d{docs[0]}": 0}
    return qrels


@pytest.mark.parametrize("depth", [6, 1000])
def test_metrics_equal_trec_eval_on_the_reranked_runs(setup, depth):
    retriever, queries, rng = setup
    cs = score_candidates(retriever, queries, depth=depth)
    qids = [f"q{i}" for i in range(len(cs.ids))]
    docids = [f"d{j}" for j in range(len(retriever))]
    qrels = _random_qrels(np.random.default_rng(depth), len(qids), len(docids))
    judged = judgements(cs, qids, docids, qrels)
    metrics = ("ndcg@10", "recall@20", "mrr@10", "ndcg@3", "recall@5")
    grid = np.array(WEIGHTS)
    fast = evaluate_weights(cs, judged, grid, metrics)
    each = evaluate_weights(cs, judged, grid, metrics, per_query=True)           # {metric: [W, Nq]}
    for w, weights in enumerate(WEIGHTS):
        ids, _ = rerank(cs, weights, k=cs.ids.shape[1])
        run = {}
        for q, row in zip(qids, ids):
            row = row[row >= 0]
            run[q] = {docids[j]: float(len(row) - r) for r, j in enumerate(row)}   # tie-free ranks
        ref = evaluate_run(run, qrels, metrics)
        for m in metrics:
            assert fast[m][w] == pytest.approx(np.mean(list(ref[m].values())), abs=1e-9), (weights, m)
            np.testing.assert_allclose(each[m][w], [ref[m][q] for q in qids], atol=1e-9, err_msg=m)


def test_hand_worked_metrics():
    # one query, three candidates; candidate 1 is relevant (rel 1)
    cs = CandidateScores(ids=np.array([[0, 1, 2]]), dense=np.array([[0.9, 0.5, 0.1]], np.float32),
                         sparse=np.array([[0.0, 1.0, 0.0]], np.float32), colbert=np.zeros((1, 3), np.float32))
    judged = judgements(cs, ["q"], ["a", "b", "c"], {"q": {"b": 1}})
    got = evaluate_weights(cs, judged, [(1, 0, 0), (0, 1, 0), (0.5, 0.5, 0)], ("ndcg@10", "mrr@10", "recall@1"))
    # dense: b is 2nd -> nDCG 1/log2(3), MRR 1/2, R@1 0; sparse and the half/half mix put b first
    np.testing.assert_allclose(got["ndcg@10"], [1 / np.log2(3), 1.0, 1.0])
    np.testing.assert_allclose(got["mrr@10"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(got["recall@1"], [0.0, 1.0, 1.0])
    # ties: with (0, 0, 1) every score is 0 and candidates keep corpus order -> b is 2nd
    assert relevant_ranks(cs, judged, (0, 0, 1)).tolist() == [[[1]]]


def test_relevant_document_outside_the_candidates_counts_as_missed():
    cs = CandidateScores(ids=np.array([[0, 2, -1]]), dense=np.array([[0.3, 0.2, 0.0]], np.float32),
                         sparse=np.zeros((1, 3), np.float32), colbert=np.zeros((1, 3), np.float32))
    judged = judgements(cs, ["q"], ["a", "b", "c"], {"q": {"b": 1, "c": 1}})   # b not a candidate
    got = evaluate_weights(cs, judged, (1, 0, 0), ("recall@20", "ndcg@10"))
    assert got["recall@20"][0] == pytest.approx(0.5)
    # c at rank 2 (0-based 1): DCG 1/log2(3); ideal 1 + 1/log2(3)
    assert got["ndcg@10"][0] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))


def test_scaling_the_weights_keeps_the_ranking(setup):
    retriever, queries, _ = setup
    cs = score_candidates(retriever, queries, depth=1000)
    w = np.array(PAPER_WEIGHTS["miracl"]["all"])
    np.testing.assert_array_equal(rerank(cs, w, 10)[0], rerank(cs, to_simplex(w), 10)[0])


def test_simplex_grid():
    for steps in (1, 4, 20):
        g = simplex_grid(steps)
        assert g.shape == ((steps + 1) * (steps + 2) // 2, 3)
        np.testing.assert_allclose(g.sum(1), 1.0)
        assert (g >= 0).all() and len(np.unique(g.round(9), axis=0)) == len(g)
        for corner in np.eye(3):
            assert (np.abs(g - corner).sum(1) < 1e-12).any()
    with pytest.raises(ValueError, match="steps"):
        simplex_grid(0)


def test_ternary_coordinates():
    xy = ternary_xy([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [2, 2, 0]])
    np.testing.assert_allclose(xy, [[0, 0], [1, 0], [0.5, np.sqrt(3) / 2], [0.5, np.sqrt(3) / 6], [0.5, 0]],
                               atol=1e-12)


def test_best_weights_prefers_the_point_nearest_the_default_on_a_plateau():
    grid = simplex_grid(2)                          # [1,0,0] [.5,.5,0] [.5,0,.5] [0,1,0] [0,.5,.5] [0,0,1]
    values = np.array([0.2, 0.9, 0.9, 0.1, 0.9, 0.3])
    assert best_weights(grid, values)[0].tolist() == [0.5, 0.5, 0.0]
    w, v = best_weights(grid, values, prefer=(0.0, 1.0, 1.0))
    assert w.tolist() == [0.0, 0.5, 0.5] and v == 0.9


def test_bad_inputs_give_clear_errors(setup):
    retriever, queries, _ = setup
    cs = score_candidates(retriever, queries, depth=4)
    qids = [f"q{i}" for i in range(len(cs.ids))]
    docids = [f"d{j}" for j in range(len(retriever))]
    with pytest.raises(ValueError, match="no relevance judgements"):
        judgements(cs, qids, docids, {"q0": {"d1": 1}})
    with pytest.raises(ValueError, match="no relevant"):
        judgements(cs, qids, docids, {q: {"d1": 0} for q in qids})
    with pytest.raises(ValueError, match="qids"):
        judgements(cs, qids[:2], docids, {})
    judged = judgements(cs, qids, docids, {q: {"d0": 1} for q in qids})
    with pytest.raises(ValueError, match=r"\[W, 3\]"):
        evaluate_weights(cs, judged, [[1.0, 0.0]])
    with pytest.raises(ValueError, match="all zero"):
        evaluate_weights(cs, judged, [(0, 0, 0)])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_weights(cs, judged, (1, 0, 0), ("map@10",))
    with pytest.raises(ValueError, match="dense and sparse"):
        score_candidates(HybridRetriever({"dense_vecs": retriever.dense_vecs}), queries)
    with pytest.raises(ValueError, match="depth"):
        score_candidates(retriever, queries, depth=0)
    with pytest.raises(ValueError, match="shape"):
        CandidateScores(cs.ids, cs.dense[:, :1], cs.sparse, cs.colbert)


def test_select_queries_equals_scoring_those_queries_alone(setup):
    retriever, queries, _ = setup
    cs = score_candidates(retriever, queries, depth=1000)
    qids = [f"q{i}" for i in range(len(cs.ids))]
    docids = [f"d{j}" for j in range(len(retriever))]
    qrels = _random_qrels(np.random.default_rng(3), len(qids), len(docids))
    rows = [1, 4, 5]
    sub_cs, sub_judged = select_queries(cs, judgements(cs, qids, docids, qrels), rows)
    alone = score_candidates(retriever, {k: [v[i] for i in rows] if isinstance(v, list) else v[rows]
                                         for k, v in queries.items()}, depth=1000)
    ref = evaluate_weights(alone, judgements(alone, [qids[i] for i in rows], docids, qrels), WEIGHTS)
    got = evaluate_weights(sub_cs, sub_judged, WEIGHTS)
    for m in got:
        np.testing.assert_allclose(got[m], ref[m], atol=1e-12)
    with pytest.raises(ValueError, match="no queries"):
        select_queries(cs, sub_judged, [])
