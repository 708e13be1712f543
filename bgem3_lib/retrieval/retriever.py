"""Hybrid retrieval with the three BGE-M3 representations (paper Sec. 3.1, Eq. 1; Sec. 4).

The paper ranks with s_rank = w1*s_dense + w2*s_lex + w3*s_mul and reports five settings:

=============  ==================================================================================
``dense``      exact inner-product search over the dense vectors
``sparse``     exact lexical-matching search (inverted index)
``colbert``    the top ``colbert_depth`` (200) dense hits, re-ranked by the multi-vector score
``dense+sparse`` union of the top ``hybrid_depth`` (1000) hits of dense and of sparse search,
               re-ranked by w_d*s_dense + w_s*s_lex (both scores computed exactly for every candidate)
``all``        the same union, re-ranked by w_d*s_dense + w_s*s_lex + w_c*s_mul
=============  ==================================================================================

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

from .index import _BLOCK, VOCAB_SIZE, DenseIndex, SparseIndex, colbert_rerank, top_k
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

    def search(self, query_encodings: Mapping, mode: str = "all", k: int = 10, colbert_depth: int = 200,
               hybrid_depth: int = 1000, weights: Sequence[float] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k corpus indices per query -> (ids [Nq, k] int64, scores [Nq, k] float32).

        ``mode``: one of :data:`~bgem3_lib.retrieval.modes.MODES` (its aliases accepted);
        ``weights`` overrides the retriever's weights for this call. ``k`` is clipped to the corpus
        size. Ties are broken by corpus index (ascending).
        """
        mode = canonical_mode(mode)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        w = self.weights if weights is None else check_weights(weights)
        nq = _check_encodings("query_encodings", query_encodings)
        have = {"dense_vecs": self.dense, "lexical_weights": self.sparse, "colbert_vecs": self.colbert_vecs}
        for key in (ENCODING_KEYS[r] for r in NEEDS[mode]):
            if have[key] is None:
                raise ValueError(f"mode {mode!r} needs corpus {key!r}, which was not given")
            if query_encodings.get(key) is None:
                raise ValueError(f"mode {mode!r} needs query {key!r} (encode with it enabled)")
        k = min(int(k), self.size)
        if nq == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if mode == "dense":
            return self.dense.search(query_encodings["dense_vecs"], k)
        if mode == "sparse":
            return self.sparse.search(query_encodings["lexical_weights"], k)
        if mode == "colbert":
            depth = min(max(colbert_depth, k), self.size)
            cand, _ = self.dense.search(query_encodings["dense_vecs"], depth)
            cand = np.sort(cand, axis=1)                       # -1 (missing) first, then ascending ids
            scores = colbert_rerank(query_encodings["colbert_vecs"], self.colbert_vecs, cand)
            return self._pick(cand, scores, k)
        depth = min(max(hybrid_depth, k), self.size)
        step = max(1, _BLOCK // self.size)                     # bounds the [queries x corpus] lexical block
        present = {key: val for key, val in query_encodings.items() if val is not None}
        parts = [self._hybrid({key: val[i:i + step] for key, val in present.items()}, k, w, mode, depth)
                 for i in range(0, nq, step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def candidates(self, queries: Mapping, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The hybrid candidates of each query: the union of its dense and sparse top-``depth`` hits.

        ``queries``: ``dense_vecs`` [Nq, H] and ``lexical_weights`` (Nq dicts) -> ``ids`` [Nq, C] int64
        (ascending per row, then -1 pads), exact ``dense`` and ``sparse`` scores [Nq, C] float32 (0 at pads).
        """
        q_dense = np.asarray(_finite_matrix("query dense_vecs", queries["dense_vecs"]), np.float32)
        if q_dense.shape[1] != self.dense_vecs.shape[1]:
            raise ValueError(f"query dense dim {q_dense.shape[1]} != corpus dim {self.dense_vecs.shape[1]}")
        if len(queries["lexical_weights"]) != len(q_dense):
            raise ValueError(f"{len(queries['lexical_weights'])} query lexical weights for {len(q_dense)} "
                             "dense vectors")
        depth = min(int(depth), self.size)
        step = max(1, _BLOCK // self.size)                     # bounds the [queries x corpus] lexical block
        rows = []
        for s in range(0, len(q_dense), step):
            dense_ids, _ = self.dense.search(q_dense[s:s + step], depth)
            lexical = self.sparse.score_matrix(queries["lexical_weights"][s:s + step])     # [b, N] exact
            sparse_ids, _ = top_k(lexical, depth)
            for i, (d, sp) in enumerate(zip(dense_ids, sparse_ids)):
                u = np.union1d(d[d >= 0], sp)
                rows.append((u, self.dense_vecs[u] @ q_dense[s + i], lexical[i, u]))
        width = max(len(u) for u, _, _ in rows)
        ids = np.full((len(rows), width), -1, np.int64)                 # -1 pads sort last below
        dense = np.zeros((len(rows), width), np.float32)
        sparse = np.zeros((len(rows), width), np.float32)
        for i, (u, d, sp) in enumerate(rows):
            ids[i, :len(u)], dense[i, :len(u)], sparse[i, :len(u)] = u, d, sp
        return ids, dense, sparse

    def _hybrid(self, queries: Mapping, k: int, w, mode: str, depth: int):
        """Union of dense and sparse top-``depth`` candidates, re-ranked by the weighted sum of ``mode``."""
        cand, dense, sparse = self.candidates(queries, depth)
        colbert = None
        if mode == "all":
            colbert = np.where(cand >= 0, colbert_rerank(queries["colbert_vecs"], self.colbert_vecs, cand), 0)
        scores = fuse(mode, w, dense=dense, sparse=sparse, colbert=colbert)
        scores[cand < 0] = -np.inf                                      # pads never beat a real hit
        return self._pick(cand, scores, k)

    @staticmethod
    def _pick(cand: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over candidate columns; candidates must be sorted by id per row so that column
        order equals id order (the tie rule). Pads (-1 or -inf) are never preferred to real hits."""
        pos, best = top_k(scores, k)
        return np.take_along_axis(cand, pos, axis=1), best
