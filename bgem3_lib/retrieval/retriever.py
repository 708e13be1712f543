"""Hybrid retrieval with the three BGE-M3 representations (paper Sec. 3.1, Eq. 1; protocol of Sec. 4.1).

The paper ranks with s_rank = w1*s_dense + w2*s_lex + w3*s_mul and reports five settings:

=============  ==================================================================================
``dense``      exact inner-product search over the dense vectors
``sparse``     exact lexical-matching search (inverted index)
``colbert``    the top ``colbert_depth`` (200) dense hits, re-ranked by the multi-vector score
``dense+sparse`` union of the top ``hybrid_depth`` (1000) hits of dense and of sparse search,
               re-ranked by w_d*s_dense + w_s*s_lex (both scores computed exactly for every candidate)
``all``        the top ``colbert_depth`` (200) dense hits, re-ranked by w_d*s_dense + w_s*s_lex + w_c*s_mul
               (``all_candidates="union"``: the Dense+Sparse union instead, an option the paper does not use)
=============  ==================================================================================

Every mode ends the same way: a candidate list per query (:meth:`HybridRetriever.candidate_ids`), exact
scores of those candidates in float64 from the stored vectors (:func:`exact_scores`), the weighted sum
(:func:`~bgem3_lib.retrieval.modes.fuse`) and one ``top_k`` (ties by corpus index). A backend (this in-memory
one, or :class:`~bgem3_lib.retrieval.milvus_index.MilvusRetriever`) supplies only the candidate searches
and the vectors, so two backends with exact indexes rank identically.

The hybrid scores are plain weighted sums (as in Eq. 1). FlagEmbedding's ``compute_score`` divides
by the weight sum instead, which rescales but never reorders. A depth smaller than ``k`` is raised
to ``k`` so every mode can fill ``k`` slots.

>>> enc = {"dense_vecs": np.eye(2, dtype=np.float32), "lexical_weights": [{"7": 1.0}, {"8": 1.0}],
...        "colbert_vecs": [np.eye(2, dtype=np.float32)[:1], np.eye(2, dtype=np.float32)[1:]]}
>>> r = HybridRetriever(enc)
>>> q = {"dense_vecs": np.array([[0.0, 1.0]], np.float32), "lexical_weights": [{"7": 1.0}],
...      "colbert_vecs": [np.array([[0.0, 1.0]], np.float32)]}
>>> r.search(q, "sparse", k=1)[0].tolist(), r.search(q, "dense", k=1)[0].tolist()
([[0]], [[1]])
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from .index import _BLOCK, VOCAB_SIZE, DenseIndex, SparseIndex, colbert_rerank, lexical_weights_to_csr, top_k
from .modes import ENCODING_KEYS, NEEDS, canonical_mode, check_weights, fuse, paper_weights
from .scoring import _finite_matrix


def _check_encodings(name: str, enc: Mapping) -> int:
    """Validate an ``encode()`` dict; return its number of texts (the same for every key present)."""
    if not isinstance(enc, Mapping):
        raise TypeError(f"{name}: expected the dict returned by BGEM3.encode, got {type(enc).__name__}")
    known = [key for key in ("dense_vecs", "lexical_weights", "colbert_vecs") if enc.get(key) is not None]
    if not known:
        raise ValueError(f"{name}: none of dense_vecs / lexical_weights / colbert_vecs present "
                         f"(keys: {list(enc)})")
    sizes = {key: len(enc[key]) for key in known}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: representations disagree on the number of texts: {sizes}")
    return sizes[known[0]]


ALL_CANDIDATES = ("dense", "union")    # "dense": the paper's Dense top-200 for All; "union": Dense∪Sparse
COLBERT_MEMO = 64                      # ColBERT score blocks kept for reuse across modes (colbert_scores)
MARGIN = 32                            # extra hits fetched for dense / sparse before exact re-scoring


def union_rows(*id_lists: np.ndarray) -> np.ndarray:
    """Row-wise union of candidate id arrays [Nq, *] (-1 = none) -> [Nq, C] ascending, -1 pads at the end.

    >>> union_rows(np.array([[3, 1], [2, -1]]), np.array([[1, 0], [2, 2]])).tolist()
    [[0, 1, 3], [2, -1, -1]]
    """
    rows = [np.unique(np.concatenate([ids[i] for ids in id_lists])) for i in range(len(id_lists[0]))]
    rows = [r[r >= 0] for r in rows]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def exact_scores(q_dense: np.ndarray | None, q_lexical: sp.csr_matrix | None, cand: np.ndarray,
                 doc_dense: np.ndarray | None, doc_lexical: sp.csr_matrix | None) -> tuple:
    """s_dense and s_lex of each query against its candidates, in float64.

    ``q_dense`` [Nq, H]; ``q_lexical`` CSR [Nq, V]; ``cand`` [Nq, C] ids with -1 pads; ``doc_dense`` /
    ``doc_lexical``: the vectors of ``np.unique(cand[cand >= 0])`` in that order ([U, H], CSR [U, V] with
    sorted indices). -> (dense [Nq, C], sparse [Nq, C]) float32, 0 at pads (None for a missing side).
    Each value is one pair's dot product summed in float64 and rounded once to float32, so it does not
    depend on which other candidates share the matrix product (nor on the backend that supplied them).
    """
    ids = np.unique(cand[cand >= 0])
    col = np.searchsorted(ids, np.maximum(cand, 0))
    dense = sparse = None
    if q_dense is not None:
        d64 = np.asarray(doc_dense, np.float64)
        assert d64.shape[0] == len(ids), (d64.shape, len(ids))
        dense = np.where(cand >= 0, np.take_along_axis(np.asarray(q_dense, np.float64) @ d64.T, col, axis=1),
                         0.0).astype(np.float32)
    if q_lexical is not None:
        assert doc_lexical.shape[0] == len(ids), (doc_lexical.shape, len(ids))
        lex = np.asarray((q_lexical.astype(np.float64) @ doc_lexical.astype(np.float64).T).todense())
        sparse = np.where(cand >= 0, np.take_along_axis(lex, col, axis=1), 0.0).astype(np.float32)
    return dense, sparse


class HybridRetriever:
    """Index a corpus encoded by ``BGEM3.encode(..., return_dense=True, return_sparse=True,
    return_colbert_vecs=True)`` and search it in any of :data:`~bgem3_lib.retrieval.modes.MODES`.

    ``weights = (w_dense, w_sparse, w_colbert)``; defaults are the paper's MIRACL ones
    (:data:`~bgem3_lib.retrieval.modes.PAPER_WEIGHTS`). ``dense_kind`` and ``dense_options`` go to :class:`DenseIndex`.
    Representations missing from the corpus dict only disable the modes that need them.
    """

    def __init__(self, corpus_encodings: Mapping, weights: Sequence[float] = paper_weights("miracl", "all"),
                 dense_kind: str = "flat", vocab_size: int = VOCAB_SIZE, **dense_options):
        n = _check_encodings("corpus_encodings", corpus_encodings)
        if n == 0:
            raise ValueError("empty corpus: corpus_encodings hold no texts")
        self.weights = check_weights(weights)
        self.size = n
        dense = corpus_encodings.get("dense_vecs")
        lexical = corpus_encodings.get("lexical_weights")
        self.colbert_vecs = corpus_encodings.get("colbert_vecs")
        if dense is not None:
            dense = np.asarray(_finite_matrix("dense_vecs", dense), np.float32)
        self.dense_vecs = dense
        self.dense = None if dense is None else DenseIndex(dense, kind=dense_kind, **dense_options)
        self.sparse = None if lexical is None else SparseIndex(lexical, vocab_size=vocab_size)
        if self.colbert_vecs is not None:
            hs = {np.shape(v)[-1] for v in self.colbert_vecs if np.ndim(v) == 2}
            if any(np.ndim(v) != 2 or len(v) == 0 for v in self.colbert_vecs) or len(hs) != 1:
                raise ValueError("colbert_vecs must be non-empty [n_i, H] arrays with one common H")

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------ what a backend supplies
    def dense_top(self, q_dense: np.ndarray, depth: int) -> np.ndarray:
        """Dense top-``depth`` ids per query [Nq, depth] (-1 = none)."""
        return self.dense.search(q_dense, depth)[0]

    def sparse_top(self, q_lexical: Sequence[Mapping[str, float]], depth: int) -> np.ndarray:
        """Lexical top-``depth`` ids per query [Nq, depth]."""
        return self.sparse.search(q_lexical, depth)[0]

    def doc_vectors(self, ids: np.ndarray, dense: bool, lexical: bool) -> tuple:
        """Stored vectors of the (ascending, unique) ``ids``: (dense [U, H] float32 | None,
        lexical CSR [U, V] float32 with sorted indices | None)."""
        d = self.dense_vecs[ids] if dense else None
        lex = None
        if lexical:
            lex = self.sparse.matrix[ids]
            lex.sort_indices()
        return d, lex

    def doc_colbert(self) -> Sequence[np.ndarray]:
        """The corpus multi-vectors (indexable by corpus id)."""
        return self.colbert_vecs

    # ------------------------------------------------------------ the protocol, shared by every backend
    def candidate_ids(self, queries: Mapping, mode: str, k: int, colbert_depth: int = 200,
                      hybrid_depth: int = 1000, all_candidates: str = "dense") -> np.ndarray:
        """The ids each query's final ranking is chosen from, [Nq, C] ascending with -1 pads (Sec. 4.1)."""
        if all_candidates not in ALL_CANDIDATES:
            raise ValueError(f"all_candidates must be one of {ALL_CANDIDATES}, got {all_candidates!r}")
        size = len(self)
        if mode == "dense":
            return union_rows(self.dense_top(queries["dense_vecs"], min(size, k + MARGIN)))
        if mode == "sparse":
            return union_rows(self.sparse_top(queries["lexical_weights"], min(size, k + MARGIN)))
        if mode == "colbert" or (mode == "all" and all_candidates == "dense"):
            return union_rows(self.dense_top(queries["dense_vecs"], min(max(colbert_depth, k), size)))
        depth = min(max(hybrid_depth, k), size)
        return union_rows(self.dense_top(queries["dense_vecs"], depth),
                          self.sparse_top(queries["lexical_weights"], depth))

    def pair_scores(self, queries: Mapping, cand: np.ndarray, dense: bool, lexical: bool) -> tuple:
        """Exact s_dense / s_lex [Nq, C] float32 of each query against its candidates (:func:`exact_scores`
        on the backend's stored vectors); None for a side not asked for."""
        d, lex = self.doc_vectors(np.unique(cand[cand >= 0]), dense, lexical)
        q_lex = q_dense = None
        if lexical:
            q_lex = lexical_weights_to_csr(queries["lexical_weights"], lex.shape[1])
            q_lex.sort_indices()
        if dense:
            q_dense = np.asarray(_finite_matrix("query dense_vecs", queries["dense_vecs"]), np.float32)
            if q_dense.shape[1] != d.shape[1]:
                raise ValueError(f"query dense dim {q_dense.shape[1]} != corpus dim {d.shape[1]}")
        return exact_scores(q_dense, q_lex, cand, d, lex)

    def score_candidates(self, queries: Mapping, cand: np.ndarray, mode: str,
                         weights: Sequence[float]) -> np.ndarray:
        """The score of ``mode`` for every candidate [Nq, C] (float32, the weighted sum of
        :func:`~bgem3_lib.retrieval.modes.fuse`; -inf at pads)."""
        need = NEEDS[mode]
        dense, sparse = self.pair_scores(queries, cand, "dense" in need and mode != "colbert", "sparse" in need)
        colbert = None
        if "colbert" in need:
            colbert = self.colbert_scores(queries["colbert_vecs"], cand)
        scores = np.asarray(fuse(mode, weights, dense=dense, sparse=sparse, colbert=colbert), np.float32)
        return np.where(cand >= 0, scores, np.float32(-np.inf))

    def colbert_scores(self, q_vecs: Sequence[np.ndarray], cand: np.ndarray) -> np.ndarray:
        """s_mul [Nq, C] float32 of each query against its candidates (0 at pads).

        Multi-vec and All both re-rank the dense top-200 (Sec. 4.1), so an evaluation that runs both asks
        for the same scores twice: the last :data:`COLBERT_MEMO` results are kept, keyed by the very query
        arrays (identity, so a new encoding never hits) and the candidate ids (equality)."""
        memo = self.__dict__.setdefault("_colbert_memo", [])
        for i, (qs, ids, scores) in enumerate(memo):
            if len(qs) == len(q_vecs) and all(a is b for a, b in zip(qs, q_vecs)) and np.array_equal(ids, cand):
                memo.append(memo.pop(i))
                return scores
        scores = np.where(cand >= 0, colbert_rerank(q_vecs, self.doc_colbert(), cand), 0).astype(np.float32)
        memo.append((list(q_vecs), cand.copy(), scores))
        del memo[:-COLBERT_MEMO]
        return scores

    def search(self, query_encodings: Mapping, mode: str = "all", k: int = 10, colbert_depth: int = 200,
               hybrid_depth: int = 1000, weights: Sequence[float] | None = None, all_candidates: str = "dense"
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k corpus indices per query -> (ids [Nq, k] int64, scores [Nq, k] float32).

        ``mode``: one of :data:`~bgem3_lib.retrieval.modes.MODES` (its aliases accepted);
        ``weights`` overrides the retriever's weights for this call; ``all_candidates`` picks what ``all``
        re-ranks (:data:`ALL_CANDIDATES`). ``k`` is clipped to the corpus size. Ties are broken by corpus
        index (ascending).
        """
        mode = canonical_mode(mode)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if all_candidates not in ALL_CANDIDATES:
            raise ValueError(f"all_candidates must be one of {ALL_CANDIDATES}, got {all_candidates!r}")
        w = self.weights if weights is None else check_weights(weights)
        nq = _check_encodings("query_encodings", query_encodings)
        for key in (ENCODING_KEYS[r] for r in NEEDS[mode]):
            if not self.has(key):
                raise ValueError(f"mode {mode!r} needs corpus {key!r}, which was not given")
            if query_encodings.get(key) is None:
                raise ValueError(f"mode {mode!r} needs query {key!r} (encode with it enabled)")
        k = min(int(k), len(self))
        if nq == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        step = max(1, _BLOCK // len(self))                     # bounds the [queries x corpus] lexical block
        present = {key: val for key, val in query_encodings.items() if val is not None}
        out_ids, out_scores = [], []
        for s in range(0, nq, step):
            block = {key: val[s:s + step] for key, val in present.items()}
            cand = self.candidate_ids(block, mode, k, colbert_depth, hybrid_depth, all_candidates)
            pos, best = top_k(self.score_candidates(block, cand, mode, w), k)
            out_ids.append(np.take_along_axis(cand, pos, axis=1))
            out_scores.append(best)
        return np.concatenate(out_ids), np.concatenate(out_scores)

    def has(self, key: str) -> bool:
        """Whether the corpus holds ``key`` (``dense_vecs``, ``lexical_weights``, ``colbert_vecs``)."""
        return {"dense_vecs": self.dense, "lexical_weights": self.sparse,
                "colbert_vecs": self.colbert_vecs}[key] is not None

    def candidates(self, queries: Mapping, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The Dense+Sparse candidates of each query: the union of its dense and sparse top-``depth`` hits.

        ``queries``: ``dense_vecs`` [Nq, H] and ``lexical_weights`` (Nq dicts) -> ``ids`` [Nq, C] int64
        (ascending per row, then -1 pads), exact ``dense`` and ``sparse`` scores [Nq, C] float32 (0 at pads).
        """
        q_dense = np.asarray(_finite_matrix("query dense_vecs", queries["dense_vecs"]), np.float32)
        if len(queries["lexical_weights"]) != len(q_dense):
            raise ValueError(f"{len(queries['lexical_weights'])} query lexical weights for {len(q_dense)} "
                             "dense vectors")
        step = max(1, _BLOCK // self.size)
        parts = []
        for s in range(0, len(q_dense), step):
            block = {"dense_vecs": q_dense[s:s + step], "lexical_weights": queries["lexical_weights"][s:s + step]}
            cand = self.candidate_ids(block, "dense+sparse", 1, hybrid_depth=depth)
            dense, sparse = self.pair_scores(block, cand, True, True)
            parts.append((cand, dense, sparse))
        width = max(p[0].shape[1] for p in parts)

        def pad(a, fill):
            return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)
        return (np.concatenate([pad(p[0], -1) for p in parts]), np.concatenate([pad(p[1], 0) for p in parts]),
                np.concatenate([pad(p[2], 0) for p in parts]))
