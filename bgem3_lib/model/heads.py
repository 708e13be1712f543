"""The three M3 heads: dense, sparse (lexical) and multi-vector (ColBERT), paper Sec. 3.1.

The encoder's inference path returns only the attended tokens, packed end to end: ``states [T, H]``
with ``offsets [B+1]`` (text ``b`` is rows ``offsets[b]:offsets[b+1]``, its first row the CLS token).
The paper-named functions below turn packed states into each text's representation; they are what
``BGEM3.encode`` runs. Padded ``[B, L, H]`` arrays go through :func:`pack_padded` first.

* ``dense_embedding``   [T, H] -> [B, H]: each text's CLS state (or its mean), L2-normalised.
* ``sparse_embedding``  token weights [T] (already ReLU'd) and ids [T] -> one ``{token_id_str: weight}``
  per text: the max weight per distinct id, dropping CLS/EOS/PAD/UNK and weights <= 0. Memory is O(T):
  never a vocabulary-sized row.
* ``colbert_embedding`` projected states [T, D] -> per text ``[n_b - 1, D]``: the CLS row dropped
  (EOS kept), each row L2-normalised.

:class:`M3Heads` holds the two projections (``colbert_linear``, ``sparse_linear``) as a thin MindSpore
cell; :meth:`M3Heads.train_outputs` is the same three heads on padded batches in MindSpore ops, kept
differentiable for training (``tests/model/test_heads.py`` checks it against the functions here).

>>> w = np.array([0.0, 0.5, 0.2, 0.9, 0.0], np.float32)      # <s> a b a </s>
>>> ids = np.array([0, 10, 11, 10, 2])
>>> lw = sparse_embedding(w, ids, np.array([0, 5]), special_ids=(0, 1, 2, 3))[0]
>>> {t: round(v, 3) for t, v in lw.items()}
{'10': 0.9, '11': 0.2}
>>> dense_embedding(np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([0, 2])).tolist()
[[0.6, 0.8]]
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

_EPS = 1e-12   # same floor as torch.nn.functional.normalize
POOLINGS = ("cls", "mean")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(||row||, 1e-12); zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _check_offsets(offsets, n_rows: int) -> np.ndarray:
    off = np.asarray(offsets)
    if off.ndim != 1 or off.size < 2 or off[0] != 0 or off[-1] != n_rows or (np.diff(off) < 1).any():
        raise ValueError(f"offsets must rise strictly from 0 to the {n_rows} packed rows, got {off.tolist()[:8]}")
    return off.astype(np.int64)


def pack_padded(hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Padded [B, L, ...] and a 0/1 mask [B, L] -> (packed [T, ...] of the attended rows, offsets [B+1]).

    >>> packed, off = pack_padded(np.arange(6).reshape(2, 3), np.array([[1, 1, 0], [1, 0, 0]]))
    >>> packed.tolist(), off.tolist()
    ([0, 1, 3], [0, 2, 3])
    """
    hidden, keep = np.asarray(hidden), np.asarray(mask).astype(bool)
    assert hidden.shape[:2] == keep.shape, (hidden.shape, keep.shape)
    return hidden[keep], np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)


def dense_embedding(states: np.ndarray, offsets, pooling: str = "cls", normalize: bool = True) -> np.ndarray:
    """Packed [T, H] states -> [B, H]: the CLS (first) row of each text, or the mean of its rows."""
    assert states.ndim == 2, states.shape
    off = _check_offsets(offsets, len(states))
    if pooling == "cls":
        out = states[off[:-1]]
    elif pooling == "mean":
        out = np.add.reduceat(states, off[:-1], axis=0) / np.diff(off)[:, None].astype(states.dtype)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    return l2_normalize(out) if normalize else out


def sparse_embedding(token_weights: np.ndarray, input_ids: np.ndarray, offsets,
                     special_ids=(0, 1, 2, 3)) -> list[dict[str, float]]:
    """Packed weights [T] (already ReLU'd) and ids [T] -> per text {token_id_str: max weight > 0}."""
    token_weights, input_ids = np.asarray(token_weights), np.asarray(input_ids)
    assert token_weights.shape == input_ids.shape and token_weights.ndim == 1, (token_weights.shape, input_ids.shape)
    off = _check_offsets(offsets, len(input_ids))
    keep = (token_weights > 0) & ~np.isin(input_ids, np.asarray(special_ids))
    out = []
    for s, e in zip(off[:-1], off[1:]):
        w, ids, k = token_weights[s:e], input_ids[s:e], keep[s:e]
        uniq, first, inverse = np.unique(ids[k], return_index=True, return_inverse=True)
        best = np.zeros(uniq.size, dtype=w.dtype)
        np.maximum.at(best, inverse, w[k])          # segment max, O(n)
        order = np.argsort(first)                   # first-occurrence order, like a dict filled in order
        out.append({str(t): float(v) for t, v in zip(uniq[order].tolist(), best[order])})
    return out


def colbert_embedding(colbert_states: np.ndarray, offsets, normalize: bool = True) -> list[np.ndarray]:
    """Packed projections [T, D] (CLS rows included) -> list of [n_b - 1, D]: each text without its CLS row."""
    assert colbert_states.ndim == 2, colbert_states.shape
    off = _check_offsets(offsets, len(colbert_states))
    not_cls = np.ones(len(colbert_states), bool)
    not_cls[off[:-1]] = False
    vecs = colbert_states[not_cls]
    if normalize:
        vecs = l2_normalize(vecs)
    return np.split(vecs, np.cumsum(np.diff(off) - 1)[:-1])


def _normalize_ms(x, eps: float = _EPS):
    """Rows over the last axis divided by max(||row||, eps). The same quotients as ``x / norm``, computed faster
    on MindSpore's CPU kernels: the divisor tiled to ``x``'s shape (broadcasting is ~3x slower) and ``RealDiv``
    (``ops.Div`` is ~4x slower)."""
    norm = ops.maximum(ops.norm(x, dim=-1, keepdim=True), Tensor(eps, x.dtype))
    return ops.RealDiv()(x, ops.tile(norm, (1,) * (x.ndim - 1) + (x.shape[-1],)))


class M3Heads(nn.Cell):
    """``colbert_linear`` (H -> colbert_dim) and ``sparse_linear`` (H -> 1) projections."""

    def __init__(self, hidden_size: int, colbert_dim: int | None = None):
        super().__init__()
        self.colbert_linear = nn.Dense(hidden_size, colbert_dim or hidden_size)
        self.sparse_linear = nn.Dense(hidden_size, 1)

    def sparse_weights(self, hidden):
        """[..., H] -> [...] ReLU(linear) token weights."""
        return ops.relu(self.sparse_linear(hidden)).squeeze(-1)

    def colbert_states(self, hidden):
        """[..., H] -> [..., D] projections (every token; :func:`colbert_embedding` drops CLS)."""
        return self.colbert_linear(hidden)

    def train_outputs(self, hidden, mask, input_ids, pooling: str, special_ids):
        """The three heads on a padded batch, differentiable (training).

        hidden [B, L, H] float32, mask [B, L], input_ids [B, L] -> dense [B, H] (normalised), sparse [B, L]
        (0 at padding and special tokens), colbert [B, L-1, D] (tokens 1..L-1, normalised, 0 at padding).
        """
        m = mask.astype(ms.float32)
        dense = (hidden * m[:, :, None]).sum(1) / m.sum(1, keepdims=True) if pooling == "mean" else hidden[:, 0]
        keep = m
        for s in special_ids:
            keep = keep * (input_ids != s).astype(ms.float32)
        sparse = self.sparse_weights(hidden) * keep
        colbert = _normalize_ms(self.colbert_states(hidden[:, 1:])) * m[:, 1:, None]
        return _normalize_ms(dense), sparse, colbert
