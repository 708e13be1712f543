"""Relevance scores of BGE-M3 (M3-Embedding, arXiv 2402.03216, Sec. 3.1-3.2).

Three scores between a query q and a passage p, each from one head of the model:

* dense      s_dense = <e_q, e_p>                      (CLS vectors, already L2-normalised)
* lexical    s_lex   = sum_{t in q ∩ p} w_{q,t} * w_{p,t}   (token weights, shared token ids only)
* multi-vec  s_mul   = 1/n * sum_i max_j <E_q[i], E_p[j]>   (n query vectors, m passage vectors)

Their weighted combinations are :func:`bgem3_lib.retrieval.modes.fuse`. Everything here is pure NumPy.

>>> lexical_matching_score({"10": 0.5, "7": 0.2}, {"10": 0.4, "99": 1.0})
0.2
>>> round(colbert_score(np.eye(2, dtype=np.float32), np.array([[1.0, 0.0]], np.float32)), 3)
0.5
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


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
