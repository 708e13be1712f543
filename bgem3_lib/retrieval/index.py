"""Search structures for the three BGE-M3 representations.

* :class:`DenseIndex`  - faiss inner-product index over dense vectors [N, H]. ``kind="flat"`` (default)
  is exact. Past ~1M passages a flat scan gets slow (every query touches N*H floats); then use
  ``kind="hnsw"`` (graph, no training, memory ~N*(H + 2*M) 4-byte words, tune ``ef_search``) or
  ``kind="ivf"`` (k-means buckets, needs training, tune ``nlist`` ~ 4*sqrt(N) and ``nprobe``).
  Both are approximate: results can miss true neighbours, and empty slots come back as id -1,
  score -inf.
* :class:`SparseIndex` - exact inverted index for lexical weights: a scipy CSR matrix D [N, V]
  (docs x vocab). Scores of a query batch are one sparse product Q·Dᵀ [Nq, N].
* :func:`colbert_rerank` - multi-vector scores for a given candidate list per query.

All searches return ``(ids [Nq, k] int64, scores [Nq, k] float32)`` ordered by score descending, ties
by document index ascending; ``k`` is clipped to the corpus size.

>>> ids, scores = SparseIndex([{"5": 1.0}, {"5": 2.0, "9": 1.0}, {}]).search([{"5": 1.0}], k=5)
>>> ids.tolist(), scores.tolist()
([[1, 0, 2]], [[2.0, 1.0, 0.0]])
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import faiss
import numpy as np
import scipy.sparse as sp

from bgem3_lib.kernels import maxsim
from bgem3_lib.retrieval.scoring import _finite_matrix

VOCAB_SIZE = 250_002            # XLM-RoBERTa vocabulary of BAAI/bge-m3
_BLOCK = 1 << 22                # max entries in one [queries x docs] score block (~100 MB peak)


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(min(k, n))


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a score matrix [Nq, N] -> (columns [Nq, k] int64, scores [Nq, k] float32).

    Order: score descending, then column ascending - also across the k-th place (among equal
    scores at the cut the lowest columns are kept). O(Nq*N) via argpartition, no full sort.

    >>> top_k(np.array([[0.1, 0.5, 0.1, 0.1]]), 2)[0].tolist()
    [[1, 0]]
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"top_k needs a non-empty [Nq, N] score matrix, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    nq, n = scores.shape
    k = _check_k(k, n)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)   # k-th largest value
    above = scores > kth
    ties = scores == kth
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (ties & (np.cumsum(ties, axis=1) <= need))                  # exactly k per row
    cols = np.nonzero(keep)[1].reshape(nq, k)                                  # ascending per row
    vals = np.take_along_axis(scores, cols, axis=1)
    order = np.lexsort((cols, -vals))                                          # score desc, col asc
    return (np.take_along_axis(cols, order, axis=1).astype(np.int64),
            np.take_along_axis(vals, order, axis=1).astype(np.float32))


def _sort_hits(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put faiss hits in (score desc, id asc) order; missing hits (id -1) last with score -inf."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores))
    return (np.take_along_axis(ids, order, axis=1).astype(np.int64),
            np.take_along_axis(scores, order, axis=1))


class DenseIndex:
    """Inner-product search over dense vectors [N, H] (``kind``: "flat" exact, "hnsw", "ivf").

    >>> idx = DenseIndex(np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32))
    >>> idx.search(np.array([[1.0, 0.0]], np.float32), k=2)[0].tolist()
    [[0, 2]]
    """

    def __init__(self, vectors, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 128,
                 nlist: int | None = None, nprobe: int = 16):
        x = _finite_matrix("vectors", vectors)
        if x.shape[0] == 0:
            raise ValueError("empty corpus: DenseIndex needs at least one vector")
        self.vectors = np.ascontiguousarray(x, dtype=np.float32)
        self.kind = kind
        n, h = self.vectors.shape
        if kind == "flat":
            self.index = faiss.IndexFlatIP(h)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(h, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        elif kind == "ivf":
            nlist = nlist or max(1, min(n, int(4 * math.sqrt(n))))
            if nlist > n:
                raise ValueError(f"nlist={nlist} exceeds the corpus size {n}")
            self._quantizer = faiss.IndexFlatIP(h)        # kept alive alongside the IVF index
            self.index = faiss.IndexIVFFlat(self._quantizer, h, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(self.vectors)
            self.index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"unknown index kind {kind!r}; expected 'flat', 'hnsw' or 'ivf'")
        self.index.add(self.vectors)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [Nq, H] -> (ids [Nq, k], scores [Nq, k]); exact tie order for ``kind="flat"``."""
        q = np.ascontiguousarray(_finite_matrix("queries", queries), dtype=np.float32)
        if q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"query dim {q.shape[1]} != index dim {self.vectors.shape[1]} "
                             f"(queries {q.shape})")
        n = len(self)
        k = _check_k(k, n)
        if self.kind != "flat":
            scores, ids = self.index.search(q, k)
            return _sort_hits(ids, scores)
        # one extra hit shows whether equal scores straddle the cut; those rows are redone exactly
        scores, ids = self.index.search(q, min(k + 1, n))
        ids, scores = _sort_hits(ids, scores)
        if ids.shape[1] > k:
            straddle = np.flatnonzero(scores[:, k - 1] == scores[:, k])
            ids, scores = ids[:, :k].copy(), scores[:, :k].copy()
            if straddle.size:
                ids[straddle], scores[straddle] = top_k(q[straddle] @ self.vectors.T, k)
        return ids, scores


def lexical_weights_to_csr(lexical_weights: Sequence[Mapping[str, float]], vocab_size: int = VOCAB_SIZE,
                           dtype=np.float32) -> sp.csr_matrix:
    """List of ``{token_id_str: weight}`` -> CSR [len, vocab_size] (duplicate ids such as "5"/"05" summed).

    >>> lexical_weights_to_csr([{"3": 0.5}, {}], vocab_size=4).toarray().tolist()
    [[0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
    """
    if isinstance(lexical_weights, Mapping) or not isinstance(lexical_weights, Sequence):
        raise TypeError("expected a list of {token_id: weight} dicts, got " + type(lexical_weights).__name__)
    for i, d in enumerate(lexical_weights):
        if not isinstance(d, Mapping):
            raise TypeError(f"lexical_weights[{i}]: expected a dict, got {type(d).__name__}")
    lengths = np.fromiter((len(d) for d in lexical_weights), dtype=np.int64, count=len(lexical_weights))
    total = int(lengths.sum())
    try:
        cols = np.fromiter((int(t) for d in lexical_weights for t in d), dtype=np.int64, count=total)
    except ValueError as err:
        raise ValueError("lexical weight keys must be token ids such as '6083' (the output of encode(), "
                         f"not convert_id_to_token): {err}") from None
    data = np.fromiter((float(w) for d in lexical_weights for w in d.values()), dtype=np.float64, count=total)
    if not np.isfinite(data).all():
        raise ValueError("lexical weights contain NaN or inf")
    if total and (cols.min() < 0 or cols.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{cols.min()}, {cols.max()}]")
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    m = sp.csr_matrix((data.astype(dtype), cols, indptr), shape=(len(lexical_weights), vocab_size))
    m.sum_duplicates()
    return m


class SparseIndex:
    """Exact lexical-matching search: score(q, d) = sum_t w_q,t * w_d,t for every doc at once.

    ``matrix`` is D [N, V] (CSR, docs x vocab); searches use its transpose, i.e. the postings
    lists (CSR [V, N]), so Q·Dᵀ is a CSR x CSR product that only touches the query's tokens.
    """

    def __init__(self, lexical_weights: Sequence[Mapping[str, float]], vocab_size: int = VOCAB_SIZE,
                 dtype=np.float32):
        if len(lexical_weights) == 0:
            raise ValueError("empty corpus: SparseIndex needs at least one document")
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.matrix = lexical_weights_to_csr(lexical_weights, vocab_size, dtype)
        self._postings = self.matrix.T.tocsr()

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def score_matrix(self, query_weights: Sequence[Mapping[str, float]]) -> np.ndarray:
        """All lexical scores: list of Nq query dicts -> dense [Nq, N] array."""
        q = lexical_weights_to_csr(query_weights, self.vocab_size, self.dtype)
        return np.asarray((q @ self._postings).todense())

    def search(self, query_weights: Sequence[Mapping[str, float]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """list of Nq query dicts -> (ids [Nq, k], scores [Nq, k]); processed in query blocks."""
        if isinstance(query_weights, Mapping):
            raise TypeError("query_weights must be a list of dicts (one per query), got a single dict")
        n = len(self)
        k = _check_k(k, n)
        step = max(1, _BLOCK // n)
        if len(query_weights) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        parts = [top_k(self.score_matrix(query_weights[i:i + step]), k)
                 for i in range(0, len(query_weights), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


_TOKEN_BLOCK = 1 << 25          # max (query tokens x document tokens) products in one ColBERT block
_STACK_BYTES = 1 << 29          # stack every candidate document's vectors once when they fit in 512 MiB


def _colbert_blocks(q_lengths: np.ndarray, doc_lengths: np.ndarray, ids: np.ndarray) -> list[tuple[int, int]]:
    """Query ranges whose (query tokens x tokens of the documents they need) stay under _TOKEN_BLOCK."""
    blocks, start, docs, rows = [], 0, set(), 0
    for i, row in enumerate(ids):
        new = docs | set(row[row >= 0].tolist())
        tokens = int(doc_lengths[list(new)].sum()) if new else 0
        if i > start and (rows + q_lengths[i]) * tokens > _TOKEN_BLOCK:
            blocks.append((start, i))
            start, new, rows = i, set(row[row >= 0].tolist()), 0
        docs, rows = new, rows + q_lengths[i]
    blocks.append((start, len(ids)))
    return blocks


def colbert_rerank(q_vecs: Sequence[np.ndarray], doc_vecs: Sequence[np.ndarray], candidates) -> np.ndarray:
    """Multi-vector scores s_mul = 1/n sum_i max_j <q_i, p_j> of each query against its candidates.

    q_vecs: Nq arrays [n_i, H]; doc_vecs: N arrays [m_j, H]; candidates [Nq, K] doc ids
    (-1 = no candidate) -> scores [Nq, K] float32, ``-inf`` where the id is -1.

    Where the CPU has AVX-512 and H is a multiple of 16, :func:`bgem3_lib.kernels.maxsim.maxsim_scores`
    computes it: each query against its own candidates only, maxima in registers (the same sums in another
    order, so equal to float32 rounding). Otherwise, in NumPy: blocks of consecutive queries share one stacked
    matrix of the documents they need, one matrix product and a segment max (``np.maximum.reduceat``); a block
    holds at most ``_TOKEN_BLOCK`` token products. Candidate lists of neighbouring queries overlap on small
    corpora, so each document's vectors are copied once per block rather than once per query.
    """
    cand = np.asarray(candidates)
    if cand.ndim != 2 or cand.shape[0] != len(q_vecs):
        raise ValueError(f"candidates must be [Nq, K] with Nq = len(q_vecs) = {len(q_vecs)}, "
                         f"got {cand.shape}")
    if cand.dtype.kind not in "iu":
        raise TypeError(f"candidates must be integer doc ids, got dtype {cand.dtype}")
    if cand.size and (cand.max() >= len(doc_vecs) or cand.min() < -1):
        raise ValueError(f"candidate ids must lie in [-1, {len(doc_vecs)}), got [{cand.min()}, {cand.max()}]")
    out = np.full(cand.shape, -np.inf, dtype=np.float32)
    if cand.size == 0:
        return out
    q_lengths = np.array([np.shape(q)[0] if np.ndim(q) == 2 else 0 for q in q_vecs], np.int64)
    if (q_lengths < 1).any():
        bad = int(np.argmax(q_lengths < 1))
        raise ValueError(f"q_vecs[{bad}] has no vectors: need a non-empty [n, H] array, got {np.shape(q_vecs[bad])}")
    needed = np.unique(cand[cand >= 0])
    doc_lengths = np.zeros(len(doc_vecs), np.int64)
    doc_lengths[needed] = [np.shape(doc_vecs[j])[0] if np.ndim(doc_vecs[j]) == 2 else 0 for j in needed]
    if (doc_lengths[needed] < 1).any():
        bad = int(needed[np.argmax(doc_lengths[needed] < 1)])
        raise ValueError(f"doc_vecs[{bad}] must be a non-empty [m, H] array, got shape {np.shape(doc_vecs[bad])}")
    # On a small corpus the blocks need most candidate documents each: then their vectors are stacked (and
    # checked) once, and a block that needs more than half of them multiplies against the whole stack, instead
    # of copying its own (9 TyDi languages x 2 models: the copies were a third of the re-ranking time).
    total = int(doc_lengths[needed].sum())
    width = np.shape(doc_vecs[int(needed[0])])[1]
    if maxsim.supports(width):             # AVX-512: each query against its own candidates, maxima in registers
        other = next((np.shape(q)[1] for q in q_vecs if np.shape(q)[1] != width), None)
        if other is not None:
            raise ValueError(f"hidden sizes differ: q_vecs H={other} vs doc_vecs H={width}")
        for q in q_vecs:
            _finite_matrix("q_vecs", q)
        for d in needed:
            _finite_matrix("doc_vecs", doc_vecs[d])
        return maxsim.maxsim_scores(q_vecs, doc_vecs, cand)
    whole = None
    if total * width * 4 <= _STACK_BYTES:
        whole = _finite_matrix("doc_vecs", np.concatenate([np.asarray(doc_vecs[d], np.float32) for d in needed]))
        row0 = np.zeros(len(doc_vecs), np.int64)
        row0[needed] = np.concatenate([[0], np.cumsum(doc_lengths[needed])[:-1]])
    for s, e in _colbert_blocks(q_lengths, doc_lengths, cand):
        block = cand[s:e]
        docs = np.unique(block[block >= 0])
        if docs.size == 0:
            continue
        if whole is not None and 2 * doc_lengths[docs].sum() > total:
            docs, stacked = needed, whole
        elif whole is not None:
            stacked = whole[np.concatenate([np.arange(row0[d], row0[d] + doc_lengths[d]) for d in docs])]
        else:
            stacked = _finite_matrix("doc_vecs", np.concatenate([doc_vecs[d] for d in docs]).astype(np.float32))
        queries = _finite_matrix("q_vecs", np.concatenate(q_vecs[s:e]).astype(np.float32))
        if stacked.shape[1] != queries.shape[1]:
            raise ValueError(f"hidden sizes differ: q_vecs H={queries.shape[1]} vs doc_vecs H={stacked.shape[1]}")
        token_scores = queries @ stacked.T                                                # [sum n, sum m]
        doc_starts = np.concatenate([[0], np.cumsum(doc_lengths[docs])[:-1]])
        best = np.maximum.reduceat(token_scores, doc_starts, axis=1)                     # [sum n, D]
        q_starts = np.concatenate([[0], np.cumsum(q_lengths[s:e])[:-1]])
        per_doc = np.add.reduceat(best, q_starts, axis=0) / q_lengths[s:e, None]         # [b, D]
        cols = np.searchsorted(docs, np.maximum(block, 0))
        out[s:e] = np.where(block >= 0, np.take_along_axis(per_doc, cols, axis=1), -np.inf)
    return out
