"""The three M3 heads: dense, sparse (lexical) and multi-vector (ColBERT).

The projections run as a thin MindSpore cell on the encoder output; the per-text
post-processing is pure NumPy:

* ``dense_embedding``   [B, L, H] -> [B, H]: the CLS state (or masked mean), L2-normalised.
* ``sparse_embedding``  token weights [B, L] -> one ``{token_id_str: weight}`` per text: the
  max weight per distinct token id, dropping CLS/EOS/PAD/UNK and weights <= 0. Memory is
  O(B*L): ids are sorted and max-reduced per segment, never scattered into a vocab-sized row.
* ``colbert_embedding`` [B, L-1, H] (tokens 1..L-1, CLS dropped) -> per text ``[n_i - 1, H]``
  (EOS kept, padding dropped), each row L2-normalised.

>>> w = np.array([[0.0, 0.5, 0.2, 0.9, 0.0]], np.float32)      # <s> a b a </s>
>>> ids = np.array([[0, 10, 11, 10, 2]])
>>> lw = sparse_embedding(w, ids, np.ones_like(ids), special_ids=(0, 1, 2, 3))[0]
>>> {t: round(v, 3) for t, v in lw.items()}
{'10': 0.9, '11': 0.2}
"""
from __future__ import annotations

import numpy as np
from mindspore import nn, ops

_EPS = 1e-12   # same floor as torch.nn.functional.normalize


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(||row||, 1e-12); zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def dense_embedding(hidden: np.ndarray, mask: np.ndarray, pooling: str = "cls",
                    normalize: bool = True) -> np.ndarray:
    """[B, L, H], [B, L] -> [B, H] (CLS state or masked mean), optionally L2-normalised."""
    assert hidden.ndim == 3 and mask.shape == hidden.shape[:2], (hidden.shape, mask.shape)
    if pooling == "cls":
        out = hidden[:, 0]
    elif pooling == "mean":
        m = mask[..., None].astype(hidden.dtype)
        out = (hidden * m).sum(1) / m.sum(1)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'mean'")
    return l2_normalize(out) if normalize else out


def sparse_embedding(token_weights: np.ndarray, input_ids: np.ndarray, mask: np.ndarray,
                     special_ids=(0, 1, 2, 3)) -> list[dict[str, float]]:
    """[B, L] weights (already ReLU'd) and ids -> per-row {token_id_str: max weight > 0}."""
    assert token_weights.shape == input_ids.shape == mask.shape, (token_weights.shape, input_ids.shape)
    keep = (mask > 0) & (token_weights > 0) & ~np.isin(input_ids, np.asarray(special_ids))
    out = []
    for w, ids, k in zip(token_weights, input_ids, keep):
        uniq, first, inverse = np.unique(ids[k], return_index=True, return_inverse=True)
        best = np.zeros(uniq.size, dtype=w.dtype)
        np.maximum.at(best, inverse, w[k])          # segment max, O(L)
        order = np.argsort(first)                   # first-occurrence order, like a dict filled in order
        out.append({str(t): float(v) for t, v in zip(uniq[order].tolist(), best[order])})
    return out


def colbert_embedding(colbert_out: np.ndarray, mask: np.ndarray, normalize: bool = True) -> list[np.ndarray]:
    """[B, L-1, H] projected states of tokens 1..L-1 and the [B, L] mask -> list of [n_i-1, H]."""
    B, Lm1, _ = colbert_out.shape
    assert mask.shape == (B, Lm1 + 1), (colbert_out.shape, mask.shape)
    vecs = colbert_out * mask[:, 1:, None].astype(colbert_out.dtype)
    if normalize:
        vecs = l2_normalize(vecs)
    lengths = mask.sum(1).astype(int)
    return [vecs[i, : lengths[i] - 1].copy() for i in range(B)]


class M3Heads(nn.Cell):
    """``colbert_linear`` (H -> colbert_dim) and ``sparse_linear`` (H -> 1) projections."""

    def __init__(self, hidden_size: int, colbert_dim: int | None = None):
        super().__init__()
        self.colbert_linear = nn.Dense(hidden_size, colbert_dim or hidden_size)
        self.sparse_linear = nn.Dense(hidden_size, 1)

    def sparse_weights(self, hidden):
        """[B, L, H] -> [B, L] ReLU(linear) token weights."""
        return ops.relu(self.sparse_linear(hidden)).squeeze(-1)

    def colbert_states(self, hidden):
        """[B, L, H] -> [B, L-1, D] projections of tokens 1..L-1."""
        return self.colbert_linear(hidden[:, 1:])
