"""The five modes on a Milvus index, with the paper's protocol and fusion (Sec. 4.1, Eq. 1).

:class:`MilvusRetriever` is a :class:`~bgem3_lib.retrieval.retriever.HybridRetriever` whose candidate searches
and stored vectors come from a :class:`~bgem3_lib.retrieval.milvus_index.MilvusIndex`; the protocol (which
candidates each mode re-ranks), the exact re-scoring and the raw weighted sum are the in-memory retriever's
own code. So with exact indexes (FLAT) both rank identically:

* Dense+Sparse: union of Milvus' dense top-1000 and sparse top-1000, re-scored w_d*s_dense + w_s*s_lex;
* All: Milvus' dense top-200 re-scored with s_dense, s_lex and s_mul (ColBERT vectors from the encoding
  store: Milvus Lite has no multi-vector field);
* ``fusion="milvus-weighted"`` / ``"milvus-rrf"`` (Dense+Sparse only): Milvus' own ``hybrid_search`` with
  ``WeightedRanker`` (which normalises each score first, so it is not Eq. 1) or ``RRFRanker`` (ranks only).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .index import VOCAB_SIZE, lexical_weights_to_csr
from .milvus_index import MilvusIndex
from .modes import canonical_mode, check_weights, paper_weights
from .retriever import HybridRetriever, _check_encodings

FUSIONS = ("paper", "milvus-weighted", "milvus-rrf")


class MilvusRetriever(HybridRetriever):
    """Search a corpus indexed in Milvus in any mode. ``colbert_vecs``: the corpus multi-vectors (e.g. the
    encoding store's memory map), needed by ``colbert`` and ``all`` only."""

    def __init__(self, index: MilvusIndex, colbert_vecs: Sequence[np.ndarray] | None = None,
                 weights: Sequence[float] = paper_weights("miracl", "all"), vocab_size: int = VOCAB_SIZE):
        self.index = index
        self.size = int(index.meta["n"])
        self.weights = check_weights(weights)
        self.vocab_size = vocab_size
        if colbert_vecs is not None and len(colbert_vecs) != self.size:
            raise ValueError(f"{len(colbert_vecs)} ColBERT vector sets for an index of {self.size} rows")
        self.colbert_vecs = colbert_vecs

    def has(self, key: str) -> bool:
        return key != "colbert_vecs" or self.colbert_vecs is not None

    def dense_top(self, q_dense: np.ndarray, depth: int) -> np.ndarray:
        return self.index.dense_top(q_dense, depth)

    def sparse_top(self, q_lexical: Sequence[Mapping[str, float]], depth: int) -> np.ndarray:
        return self.index.sparse_top(q_lexical, depth)

    def doc_vectors(self, ids: np.ndarray, dense: bool, lexical: bool) -> tuple:
        d, lex = self.index.vectors(ids, dense=dense, lexical=lexical)
        csr = None
        if lexical:
            csr = lexical_weights_to_csr(lex, self.vocab_size)
            csr.sort_indices()
        return d, csr

    def doc_colbert(self) -> Sequence[np.ndarray]:
        return self.colbert_vecs

    def search(self, query_encodings: Mapping, mode: str = "all", k: int = 10, colbert_depth: int = 200,
               hybrid_depth: int = 1000, weights: Sequence[float] | None = None, all_candidates: str = "dense",
               fusion: str = "paper") -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`HybridRetriever.search`; ``fusion`` (:data:`FUSIONS`) other than "paper" hands
        Dense+Sparse to Milvus' own rankers (scores are then Milvus', not Eq. 1)."""
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion == "paper":
            return super().search(query_encodings, mode, k, colbert_depth, hybrid_depth, weights, all_candidates)
        if canonical_mode(mode) != "dense+sparse":
            raise ValueError(f"fusion={fusion!r} fuses dense and sparse only: use mode 'dense+sparse', got {mode!r}")
        _check_encodings("query_encodings", query_encodings)
        w = self.weights if weights is None else check_weights(weights)
        return self.index.milvus_hybrid(query_encodings["dense_vecs"], query_encodings["lexical_weights"], k,
                                        ranker=fusion.split("-")[1], weights=w[:2],
                                        depth=min(max(hybrid_depth, k), self.size))
