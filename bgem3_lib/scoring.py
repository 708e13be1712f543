"""Relevance scores of BGE-M3 (M3-Embedding, arXiv 2402.03216, Sec. 3.1-3.2).

Three scores between a query q and a passage p, each from one head of the model:

* dense      s_dense = <e_q, e_p>                      (CLS vectors, already L2-normalised)
* lexical    s_lex   = sum_{t in q ∩ p} w_{q,t} * w_{p,t}   (token weights, shared token ids only)
* multi-vec  s_mul   = 1/n * sum_i max_j <E_q[i], E_p[j]>   (n query vectors, m passage vectors)

and their weighted combinations, as FlagEmbedding 1.4.2's ``BGEM3FlagModel.compute_score`` reports
them: ``sparse+dense = (w_s*s + w_d*d) / (w_s + w_d)`` and
``colbert+sparse+dense = (w_d*d + w_s*s + w_c*c) / (w_d + w_s + w_c)``.

Everything here is pure NumPy except :func:`colbert_score_batch_ms` (MindSpore ops, batched and
masked), which imports MindSpore lazily so the retrieval code stays light.

>>> lexical_matching_score({"10": 0.5, "7": 0.2}, {"10": 0.4, "99": 1.0})
0.2
>>> round(colbert_score(np.eye(2, dtype=np.float32), np.array([[1.0, 0.0]], np.float32)), 3)
0.5
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

COMBINED_MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")


def _finite_matrix(name: str, x, ndim: int = 2) -> np.ndarray:
    """``x`` as a float array of rank ``ndim`` with no NaN/inf, else ValueError naming ``name``."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


def check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(w_dense, w_sparse, w_colbert)``: three finite numbers >= 0, not all zero."""
    w = tuple(float(x) for x in weights)
    if len(w) != 3:
        raise ValueError(f"weights must be (w_dense, w_sparse, w_colbert), got {len(w)} values: {w}")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {w}")
    if sum(w) == 0:
        raise ValueError(f"weights are all zero: {w}")
    return w


def dense_score(q, p) -> np.ndarray:
    """Inner products of dense vectors: q [Nq, H], p [Np, H] -> [Nq, Np] float32.

    >>> dense_score(np.array([[1.0, 0.0]]), np.array([[0.6, 0.8], [0.0, 1.0]])).tolist()
    [[0.6000000238418579, 0.0]]
    """
    q = _finite_matrix("q", q)
    p = _finite_matrix("p", p)
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"hidden sizes differ: q {q.shape} vs p {p.shape}")
    return (q.astype(np.float32) @ p.astype(np.float32).T).astype(np.float32)


def lexical_matching_score(qw: Mapping[str, float], pw: Mapping[str, float]) -> float:
    """Sum over token ids present in both dicts of ``qw[t] * pw[t]`` (0.0 if none are shared).

    Keys are token ids as strings (``BGEM3.encode(...)["lexical_weights"]``).

    >>> lexical_matching_score({"5": 2.0, "6": 1.0}, {"6": 0.5})
    0.5
    """
    for name, d in (("qw", qw), ("pw", pw)):
        if not isinstance(d, Mapping):
            raise TypeError(f"{name}: expected a dict {{token_id: weight}}, got {type(d).__name__}")
        if math.isnan(sum(d.values())):          # a NaN anywhere propagates through the sum
            raise ValueError(f"{name}: contains a NaN weight (or both +inf and -inf)")
    small, large = (qw, pw) if len(qw) <= len(pw) else (pw, qw)
    return float(sum(float(w) * float(large[t]) for t, w in small.items() if t in large))


def colbert_score(q, p) -> float:
    """Multi-vector (late-interaction) score: q [n, H], p [m, H] -> float.

    Each query vector takes its best-matching passage vector; the maxima are averaged over
    the n query vectors.

    >>> q = np.array([[1.0, 0.0], [0.0, 1.0]]); p = np.array([[0.8, 0.6], [1.0, 0.0]])
    >>> round(colbert_score(q, p), 3)     # (max(0.8, 1.0) + max(0.6, 0.0)) / 2
    0.8
    """
    q = _finite_matrix("q", q)
    p = _finite_matrix("p", p)
    if q.shape[0] == 0 or p.shape[0] == 0:
        raise ValueError(f"colbert_score needs at least one vector on each side, "
                         f"got q {q.shape}, p {p.shape}")
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"hidden sizes differ: q {q.shape} vs p {p.shape}")
    token_scores = q.astype(np.float32) @ p.astype(np.float32).T        # [n, m]
    return float(token_scores.max(axis=1).sum() / q.shape[0])


def combine_scores(dense, sparse, colbert, weights: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """The five score kinds of FlagEmbedding's ``compute_score`` from the three raw scores.

    ``dense``, ``sparse``, ``colbert``: scalars or arrays of one common shape;
    ``weights = (w_d, w_s, w_c)`` (FlagEmbedding's default is (1, 1, 1)). Returns float64 arrays
    (0-d for scalar input) under the keys of :data:`COMBINED_MODES`.

    >>> out = combine_scores(0.5, 0.2, 0.4, weights=(0.4, 0.2, 0.4))
    >>> round(float(out["sparse+dense"]), 4), round(float(out["colbert+sparse+dense"]), 4)
    (0.4, 0.4)
    """
    w_d, w_s, w_c = check_weights(weights)
    arrays = {}
    for name, x in (("dense", dense), ("sparse", sparse), ("colbert", colbert)):
        a = np.asarray(x, dtype=np.float64)
        if np.isnan(a).any():
            raise ValueError(f"{name} scores contain NaN")
        arrays[name] = a
    shapes = {k: v.shape for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"score shapes differ: {shapes}")
    if w_d + w_s == 0:
        raise ValueError(f"w_dense + w_sparse is zero, 'sparse+dense' is undefined: weights {weights}")
    d, s, c = arrays["dense"], arrays["sparse"], arrays["colbert"]
    return {
        "dense": d,
        "sparse": s,
        "colbert": c,
        "sparse+dense": (w_s * s + w_d * d) / (w_s + w_d),
        "colbert+sparse+dense": (w_d * d + w_s * s + w_c * c) / (w_d + w_s + w_c),
    }


def colbert_score_batch_ms(q, q_mask, p, p_mask):
    """Batched, padded ColBERT score with MindSpore ops: pair b is (q[b], p[b]).

    q [B, n, H], q_mask [B, n], p [B, m, H], p_mask [B, m] (1 = real vector, 0 = padding;
    NumPy arrays or MindSpore tensors) -> MindSpore float32 tensor [B].
    Padded passage vectors are excluded from the max (not treated as zero vectors), padded
    query vectors from the mean, so row b equals ``colbert_score(q[b][q_mask[b]], p[b][p_mask[b]])``.
    Meant for PyNative mode: masks are checked on the host.
    """
    import mindspore as ms
    from mindspore import ops

    def host(x):
        return x.asnumpy() if isinstance(x, ms.Tensor) else np.asarray(x)

    qn, qmn, pn, pmn = host(q), host(q_mask), host(p), host(p_mask)
    _finite_matrix("q", qn, ndim=3)
    _finite_matrix("p", pn, ndim=3)
    b, n, h = qn.shape
    if qmn.shape != (b, n) or pn.shape[0] != b or pn.shape[2] != h or pmn.shape != pn.shape[:2]:
        raise ValueError(f"shape mismatch: q {qn.shape}, q_mask {qmn.shape}, p {pn.shape}, "
                         f"p_mask {pmn.shape}; "
                         "expected [B,n,H], [B,n], [B,m,H], [B,m]")
    for name, m in (("q_mask", qmn), ("p_mask", pmn)):
        if not ((m == 0) | (m == 1)).all():
            raise ValueError(f"{name} must hold only 0/1")
        if (m.sum(axis=1) == 0).any():
            empty = np.flatnonzero(m.sum(axis=1) == 0).tolist()
            raise ValueError(f"{name}: row(s) {empty} have no real vectors")

    qt = ms.Tensor(qn, ms.float32)
    pt = ms.Tensor(pn, ms.float32)
    qm = ms.Tensor(qmn, ms.float32)
    pad = ms.Tensor(pmn == 0)[:, None, :]                          # [B, 1, m]
    token_scores = ops.bmm(qt, pt.swapaxes(1, 2))                   # [B, n, m]
    token_scores = ops.masked_fill(token_scores, pad, float(np.finfo(np.float32).min))
    best = token_scores.max(axis=-1)                                # [B, n]
    return (best * qm).sum(axis=-1) / qm.sum(axis=-1)
