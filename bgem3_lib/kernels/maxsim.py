"""Late-interaction (ColBERT) scores of each query against its own candidates, fused in ``maxsim_kernels.cc``.

    s_mul[i, k] = 1/n_i * sum_a max_b <q_a, d_b>      q: query i's vectors [n_i, H], d: document cand[i, k]'s [m, H]

``retrieval.index.colbert_rerank`` computes the same sum with NumPy (a matrix product per block of queries against
the documents the block needs, then segment maxima); when this kernel runs it takes that call instead. Each query
meets only its own candidates and the maxima stay in registers, so nothing is copied and no token-score matrix
is written: on TyDi's few-hundred-passage corpora, where neighbouring queries' candidate lists cover most of the
corpus, the NumPy form computed several times the products the candidates need. The sums are in another order
than the BLAS's, so scores agree with the NumPy form to float32 rounding, not bitwise.

It runs where the CPU has AVX-512 and ``H`` is a multiple of 16; ``available()`` is False (and callers keep NumPy)
without a compiler, with ``BGEM3_CPU_KERNELS=0``, or without AVX-512. NumPy only: no MindSpore device involved.

>>> import numpy as np
>>> q = [np.eye(2, 16, dtype=np.float32)]                       # one query, 2 tokens, H = 16
>>> d = [np.eye(1, 16, dtype=np.float32), 2 * np.eye(2, 16, dtype=np.float32)]
>>> maxsim_scores(q, d, np.array([[1, 0, -1]])).tolist() if available() else [[2.0, 0.5, -np.inf]]
[[2.0, 0.5, -inf]]
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import cpu

SOURCE = Path(__file__).with_name("maxsim_kernels.cc")
_state: dict = {}


def available() -> bool:
    """True when the fused kernel runs here (AVX-512, library built, ``BGEM3_CPU_KERNELS`` not 0, not switched off
    by :func:`set_fused`); never raises."""
    if os.environ.get("BGEM3_CPU_KERNELS", "1") == "0" or _state.get("off"):
        return False
    if "vectorized" not in _state:
        _state["vectorized"] = (cpu.library_built(_state, SOURCE, "fused ColBERT scoring")
                                and ctypes.CDLL(str(_state["lib"])).m3_maxsim_vectorized() == 1)
    return _state["vectorized"]


def set_fused(on: bool) -> bool:
    """Let ``colbert_rerank`` use the kernel (``on``, the default) or keep it on NumPy (benchmarks, tests); returns
    True when the kernel now runs."""
    _state["off"] = not on
    return available()


def supports(width: int) -> bool:
    """Whether vectors of ``width`` floats can be scored here (:func:`available` and a multiple of 16)."""
    return width > 0 and width % 16 == 0 and available()


def maxsim_scores(q_vecs: Sequence[np.ndarray], doc_vecs: Sequence[np.ndarray], candidates) -> np.ndarray:
    """s_mul [Nq, K] float32 of each query against its candidates, ``-inf`` where the id is -1.

    q_vecs: Nq arrays [n_i, H] (n_i >= 1); doc_vecs: N arrays [m_j, H] (only the candidates' are read, m_j >= 1);
    candidates [Nq, K] integer ids in [-1, N). Inputs are not checked for NaN here (``colbert_rerank`` does).
    Raises ValueError on other shapes and RuntimeError when the kernel is not :func:`available`.
    """
    cand = np.ascontiguousarray(candidates, dtype=np.int64)
    if cand.ndim != 2 or cand.shape[0] != len(q_vecs):
        raise ValueError(f"candidates must be [Nq, K] with Nq = len(q_vecs) = {len(q_vecs)}, got {cand.shape}")
    if not available():
        raise RuntimeError("the fused ColBERT kernel is not available here (needs AVX-512 and a C++ compiler)")
    widths = {np.shape(v)[1] for v in q_vecs if np.ndim(v) == 2}
    if any(np.ndim(v) != 2 or np.shape(v)[0] < 1 for v in q_vecs) or len(widths) > 1:
        raise ValueError("q_vecs must be non-empty [n, H] arrays of one width H")
    h = widths.pop() if widths else 16
    if h % 16:
        raise ValueError(f"the fused ColBERT kernel needs H a multiple of 16, got {h}")
    queries = np.ascontiguousarray(np.concatenate(q_vecs) if len(q_vecs) else np.zeros((0, h)), dtype=np.float32)
    q_off = np.concatenate([[0], np.cumsum([len(v) for v in q_vecs])]).astype(np.int64)
    pointers = np.zeros(len(doc_vecs), np.uintp)
    lengths = np.zeros(len(doc_vecs), np.int64)
    keep = []                                   # the arrays the pointers point into, alive until the call returns
    if cand.size and (cand.min() < -1 or cand.max() >= len(doc_vecs)):
        raise ValueError(f"candidate ids must lie in [-1, {len(doc_vecs)}), got [{cand.min()}, {cand.max()}]")
    for j in np.unique(cand[cand >= 0]):
        doc = np.ascontiguousarray(doc_vecs[j], dtype=np.float32)
        if doc.ndim != 2 or doc.shape[0] < 1 or doc.shape[1] != h:
            raise ValueError(f"doc_vecs[{j}] must be a non-empty [m, {h}] array, got shape {doc.shape}")
        keep.append(doc)
        pointers[j], lengths[j] = doc.ctypes.data, doc.shape[0]
    out = np.empty(cand.shape, np.float32)
    fn = ctypes.CDLL(str(_state["lib"])).m3_maxsim
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    code = fn(queries.ctypes.data, q_off.ctypes.data, len(q_vecs), pointers.ctypes.data, lengths.ctypes.data,
              len(doc_vecs), cand.ctypes.data, cand.shape[1], h, out.ctypes.data)
    if code != 0:
        raise RuntimeError(f"m3_maxsim returned {code} (1: built without AVX-512, 2: inputs it refuses)")
    return out
