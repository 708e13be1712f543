"""Hybrid weights explored cheaply: score the candidates once, re-rank for any (w_dense, w_sparse, w_colbert).

Here every weight vector ranks the union of the dense and the sparse top-``depth`` hits (the candidates of
Dense+Sparse, and of All with ``all_candidates="union"``; the paper's All re-ranks the Dense top-200 instead) by
``s = w_d*s_dense + w_s*s_lex + w_c*s_mul`` (paper Eq. 1). The three
scores of a candidate do not depend on the weights, so they are computed once
(:func:`score_candidates`, on the retriever's own candidate union
:meth:`~bgem3_lib.retrieval.retriever.HybridRetriever.candidates`) and any weight vector then costs one
weighted sum (:func:`~bgem3_lib.retrieval.modes.fuse`, the retriever's) and, for metrics, a count of the
candidates scoring above each relevant one (:func:`evaluate_weights`). The ranks are exactly those of
``retriever.search(q, "all", k, hybrid_depth=depth, weights=w, all_candidates="union")`` (same candidates, same float32
arithmetic, same tie rule: lower corpus index first).

Scaling all weights by c > 0 scales every score by c and keeps the ranking, so only the direction of
``w`` matters: the weight *simplex* ``w_d + w_s + w_c = 1`` (:func:`simplex_grid`, :func:`to_simplex`)
holds every distinct hybrid ranking, and :func:`ternary_xy` maps it onto a triangle for plotting.

Metrics (means over the given queries; relevant documents outside the candidates count as missed):

* ``ndcg@k``  sum over relevant candidates at 0-based rank r < k of gain / log2(r + 2), divided by
  the ideal DCG@k of all the query's judged gains (trec_eval ``ndcg_cut``, linear gains);
* ``recall@k`` relevant candidates with r < k / all relevant (rel >= 1) judged documents;
* ``mrr@k``   1 / (r + 1) of the best-ranked relevant candidate if r < k, else 0.

>>> grid = simplex_grid(2)           # steps of 1/2 -> 6 points
>>> grid.tolist()[:3]
[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]]
>>> to_simplex((1.0, 0.3, 1.0)).round(3).tolist()
[0.435, 0.13, 0.435]
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..retrieval.index import colbert_rerank
from ..retrieval.metrics import parse_metric
from ..retrieval.modes import check_weights, fuse

_RANK_BLOCK = 1 << 24           # max comparisons per chunk when counting ranks


@dataclass(frozen=True)
class CandidateScores:
    """Per-candidate scores of ``Nq`` queries.

    ``ids [Nq, C]`` int64 corpus rows, ascending per query, then -1 pads; ``dense``, ``sparse``,
    ``colbert`` [Nq, C] float32 (0 at pads; ``colbert`` all 0 when scored without it).
    """
    ids: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    colbert: np.ndarray

    def __post_init__(self):
        shape = self.ids.shape
        if self.ids.ndim != 2 or self.ids.dtype.kind != "i":
            raise ValueError(f"ids must be an int [Nq, C] array, got {self.ids.dtype} {shape}")
        for name in ("dense", "sparse", "colbert"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} scores have shape {getattr(self, name).shape}, ids {shape}")

    @property
    def valid(self) -> np.ndarray:
        """[Nq, C] bool: real candidates (not pads)."""
        return self.ids >= 0


def score_candidates(retriever, query_encodings: Mapping, depth: int = 1000,
                     with_colbert: bool = True) -> CandidateScores:
    """Union of each query's dense and sparse top-``depth`` hits with the three scores of every candidate.

    ``retriever``: a :class:`~bgem3_lib.retrieval.retriever.HybridRetriever` with dense and sparse (and, for
    ``with_colbert``, ColBERT) corpus encodings; ``query_encodings``: ``BGEM3.encode`` output with
    ``dense_vecs`` [Nq, H], ``lexical_weights`` (Nq dicts) and ``colbert_vecs`` (Nq arrays [n_i, H]).
    """
    if retriever.dense is None or retriever.sparse is None:
        raise ValueError("score_candidates needs a retriever with dense and sparse corpus encodings")
    if with_colbert and retriever.colbert_vecs is None:
        raise ValueError("with_colbert=True needs corpus colbert_vecs in the retriever")
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    q_dense = query_encodings.get("dense_vecs")
    lexical = query_encodings.get("lexical_weights")
    q_colbert = query_encodings.get("colbert_vecs")
    if q_dense is None or lexical is None or (with_colbert and q_colbert is None):
        raise ValueError("query_encodings need dense_vecs and lexical_weights (and colbert_vecs with "
                         "with_colbert=True)")
    if len(q_dense) == 0:
        raise ValueError("no queries: query_encodings hold no texts")
    if with_colbert and len(q_colbert) != len(q_dense):
        raise ValueError(f"query representations disagree on the number of queries ({len(q_dense)} dense vectors)")
    ids, dense, sparse = retriever.candidates({"dense_vecs": q_dense, "lexical_weights": lexical}, depth)
    colbert = np.zeros_like(dense)
    if with_colbert:
        colbert = colbert_candidate_scores(q_colbert, retriever.colbert_vecs, ids)
    return CandidateScores(ids, dense, sparse, colbert)


def colbert_candidate_scores(q_vecs: Sequence[np.ndarray], doc_vecs: Sequence[np.ndarray],
                             ids: np.ndarray) -> np.ndarray:
    """Multi-vector scores of each query's candidates: ids [Nq, C] corpus rows (-1 pads) -> [Nq, C]
    float32, 0 at pads (:func:`~bgem3_lib.retrieval.index.colbert_rerank`, which gives -inf there)."""
    ids = np.asarray(ids)
    scores = colbert_rerank(q_vecs, doc_vecs, ids)
    return np.where(ids >= 0, scores, 0).astype(np.float32)


def combine(cs: CandidateScores, weights: Sequence[float]) -> np.ndarray:
    """Hybrid scores [Nq, C] float32 of ``all`` (:func:`~bgem3_lib.retrieval.modes.fuse`); pads -inf."""
    scores = fuse("all", weights, dense=cs.dense, sparse=cs.sparse, colbert=cs.colbert)
    scores[~cs.valid] = -np.inf
    return scores


@dataclass(frozen=True)
class Judgements:
    """Relevance of the candidates: ``cols [Nq, R]`` candidate column of each relevant candidate
    (-1 pad), ``gains [Nq, R]`` its relevance, ``ideal [Nq, G]`` the query's judged gains sorted
    descending (0-padded), ``n_relevant [Nq]`` judged documents with rel >= 1."""
    cols: np.ndarray
    gains: np.ndarray
    ideal: np.ndarray
    n_relevant: np.ndarray


def judgements(cs: CandidateScores, qids: Sequence[str], docids: Sequence[str],
               qrels: Mapping[str, Mapping[str, int]]) -> Judgements:
    """Locate each query's relevant documents among its candidates.

    ``qids``: the Nq query ids in row order; ``docids``: corpus ids (row j of the corpus is
    ``docids[j]``); ``qrels {qid: {docid: int relevance}}`` must judge every query.
    """
    if len(qids) != cs.ids.shape[0]:
        raise ValueError(f"{len(qids)} qids for {cs.ids.shape[0]} rows of candidate scores")
    row_of = {str(d): j for j, d in enumerate(docids)}
    per_query, ideal = [], []
    for i, q in enumerate(qids):
        judged = qrels.get(q)
        if not judged:
            raise ValueError(f"query {q!r} has no relevance judgements in qrels")
        positive = {d: int(r) for d, r in judged.items() if int(r) > 0}
        if not positive:
            raise ValueError(f"query {q!r} has no relevant (rel >= 1) document in qrels")
        col_of = {int(j): c for c, j in enumerate(cs.ids[i]) if j >= 0}
        hits = [(col_of[row_of[d]], r) for d, r in positive.items() if row_of.get(d) in col_of]
        per_query.append(hits)
        ideal.append(sorted(positive.values(), reverse=True))
    r_max, g_max = max(1, *(len(h) for h in per_query)), max(1, *(len(g) for g in ideal))
    cols = np.full((len(qids), r_max), -1, np.int64)
    gains = np.zeros((len(qids), r_max))
    ideal_arr = np.zeros((len(qids), g_max))
    for i, (hits, g) in enumerate(zip(per_query, ideal)):
        for c, (col, rel) in enumerate(hits):
            cols[i, c], gains[i, c] = col, rel
        ideal_arr[i, :len(g)] = g
    return Judgements(cols, gains, ideal_arr, np.array([len(g) for g in ideal]))


def select_queries(cs: CandidateScores, judged: Judgements, rows) -> tuple[CandidateScores, Judgements]:
    """The candidate scores and judgements of the queries ``rows`` (indices or a boolean mask [Nq])."""
    rows = np.asarray(rows)
    if rows.dtype == bool and rows.shape != (cs.ids.shape[0],):
        raise ValueError(f"boolean rows must have shape ({cs.ids.shape[0]},), got {rows.shape}")
    if rows.size == 0 or (rows.dtype == bool and not rows.any()):
        raise ValueError("select_queries: no queries selected")
    pick = CandidateScores(cs.ids[rows], cs.dense[rows], cs.sparse[rows], cs.colbert[rows])
    return pick, Judgements(judged.cols[rows], judged.gains[rows], judged.ideal[rows], judged.n_relevant[rows])


def relevant_ranks(cs: CandidateScores, judged: Judgements, weights) -> np.ndarray:
    """0-based rank of every relevant candidate under each weight vector -> [W, Nq, R] int64 (-1 at pads).

    ``weights``: [W, 3] (or one triple). Rank = candidates scoring higher + equal-scoring
    candidates in lower columns (the retriever's tie rule).
    """
    w = np.atleast_2d(np.asarray(weights, np.float64))
    if w.ndim != 2 or w.shape[1] != 3:
        raise ValueError(f"weights must be [W, 3], got shape {w.shape}")
    nq, c = cs.ids.shape
    r = judged.cols.shape[1]
    has = judged.cols >= 0
    safe = np.where(has, judged.cols, 0)
    col_idx = np.arange(c)
    out = np.full((len(w), nq, r), -1, np.int64)
    step = max(1, _RANK_BLOCK // max(1, r * c))                                       # queries per block
    for i, row in enumerate(w):
        scores = combine(cs, row)                                                      # [Nq, C]
        for s in range(0, nq, step):
            block, cols = scores[s:s + step], safe[s:s + step]
            own = np.take_along_axis(block, cols, axis=1)                              # [b, R]
            above = (block[:, None, :] > own[..., None]).sum(-1)
            tied = ((block[:, None, :] == own[..., None]) & (col_idx < cols[..., None])).sum(-1)
            out[i, s:s + step] = np.where(has[s:s + step], above + tied, -1)
    return out


def evaluate_weights(cs: CandidateScores, judged: Judgements, weights,
                     metrics: Sequence[str] = ("ndcg@10", "recall@20"), per_query: bool = False,
                     ) -> dict[str, np.ndarray]:
    """Mean metric over the queries for each weight vector: ``{metric: [W]}`` (``per_query``: the values
    behind the means, ``{metric: [W, Nq]}``, for paired confidence intervals).

    ``weights`` [W, 3] (or one triple); metrics ``ndcg@k``, ``recall@k``, ``mrr@k``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    parsed = [parse_metric(m) for m in metrics]
    ranks = relevant_ranks(cs, judged, weights)                                         # [W, Nq, R]
    found = ranks >= 0
    out = {}
    for name, (kind, k) in zip(metrics, parsed):
        inside = found & (ranks < k)
        if kind == "ndcg":
            dcg = np.where(inside, judged.gains / np.log2(np.maximum(ranks, 0) + 2.0), 0.0).sum(-1)
            g = judged.ideal[:, :k]
            idcg = (g / np.log2(np.arange(g.shape[1]) + 2.0)).sum(-1)
            values = dcg / idcg
        elif kind == "recall":
            values = (inside & (judged.gains > 0)).sum(-1) / judged.n_relevant
        else:
            values = np.where(inside, 1.0 / (np.maximum(ranks, 0) + 1.0), 0.0).max(-1)
        out[name] = values if per_query else values.mean(-1)
    return out


def simplex_grid(steps: int) -> np.ndarray:
    """All (w_d, w_s, w_c) with w_i in {0, 1/steps, ..., 1} summing to 1 -> [(steps+1)(steps+2)/2, 3].

    Ordered by w_d descending, then w_s descending; the three corners are included.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    pts = [(steps - a - b, a, b) for s in range(steps + 1) for a in range(s, -1, -1) for b in [s - a]]
    return np.array(pts, np.float64) / steps


def to_simplex(weights) -> np.ndarray:
    """Scale weight vectors ([3] or [W, 3], >= 0, not all zero) to sum 1: the same rankings."""
    w = np.asarray(weights, np.float64)
    if w.shape[-1:] != (3,) or w.ndim > 2:
        raise ValueError(f"weights must be [3] or [W, 3], got shape {w.shape}")
    for row in np.atleast_2d(w):
        check_weights(row)
    return w / w.sum(-1, keepdims=True)


def ternary_xy(weights) -> np.ndarray:
    """Plane coordinates of simplex points: dense at (0, 0), sparse at (1, 0), ColBERT at (1/2, √3/2).

    >>> ternary_xy([[1, 0, 0], [0, 1, 0], [1, 1, 1]]).round(3).tolist()
    [[0.0, 0.0], [1.0, 0.0], [0.5, 0.289]]
    """
    w = np.atleast_2d(to_simplex(weights))
    return np.stack([w[:, 1] + 0.5 * w[:, 2], w[:, 2] * np.sqrt(3.0) / 2.0], axis=1)


def best_weights(grid, values, prefer=None, tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """The grid point with the highest value -> (weights [3], value).

    Among points within ``tol`` of the maximum (plateaus are common: many weightings give the same
    ranking) the one closest to ``prefer`` (e.g. the paper's default, scaled to the simplex) wins,
    else the first in grid order.
    """
    grid = np.asarray(grid, np.float64)
    values = np.asarray(values, np.float64)
    if grid.ndim != 2 or grid.shape[1] != 3 or values.shape != (len(grid),) or len(grid) == 0:
        raise ValueError(f"need grid [W, 3] and values [W], got {grid.shape} and {values.shape}")
    if np.isnan(values).any():
        raise ValueError("values contain NaN")
    top = np.flatnonzero(values >= values.max() - tol)
    if prefer is not None:
        dist = np.linalg.norm(to_simplex(grid[top]) - to_simplex(prefer), axis=1)
        top = top[np.argsort(dist, kind="stable")]
    return grid[top[0]], float(values[top[0]])
