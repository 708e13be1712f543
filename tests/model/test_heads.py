"""bgem3_lib.model.heads: the paper-named heads on packed tokens against plain NumPy loops over padded
batches, and the differentiable MindSpore heads used in training against the same loops."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from bgem3_lib.model.heads import (
    M3Heads,
    colbert_embedding,
    dense_embedding,
    l2_normalize,
    pack_padded,
    sparse_embedding,
)

SPECIAL = (0, 1, 2, 3)


def _batch(seed=0, B=4, L=9, H=6):
    rng = np.random.default_rng(seed)
    lengths = np.array([9, 3, 6, 2])[:B]
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(4, 12, size=(B, L))          # small id range: repeated ids in a text
    ids[:, 0] = 0
    ids[np.arange(B), lengths - 1] = 2
    ids[mask == 0] = 1
    hidden = rng.standard_normal((B, L, H)).astype(np.float32)
    return hidden, mask, ids, lengths


def _loop_dense(hidden, lengths, pooling):
    rows = [hidden[b, 0] if pooling == "cls" else hidden[b, :n].mean(0) for b, n in enumerate(lengths)]
    return np.array([r / np.linalg.norm(r) for r in rows])


def _loop_sparse(weights, ids, lengths):
    out = []
    for b, n in enumerate(lengths):
        d = {}
        for t, w in zip(ids[b, :n].tolist(), weights[b, :n].tolist()):
            if t not in SPECIAL and w > 0:
                d[str(t)] = max(d.get(str(t), 0.0), w)
        out.append(d)
    return out


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_dense_embedding_equals_a_loop(pooling):
    hidden, mask, _, lengths = _batch()
    got = dense_embedding(*pack_padded(hidden, mask), pooling=pooling)
    np.testing.assert_allclose(got, _loop_dense(hidden, lengths, pooling), rtol=1e-5, atol=1e-6)
    raw = dense_embedding(*pack_padded(hidden, mask), pooling=pooling, normalize=False)
    np.testing.assert_allclose(l2_normalize(raw), got, atol=1e-6)


def test_sparse_embedding_equals_a_loop_keys_in_first_occurrence_order():
    hidden, mask, ids, lengths = _batch(1)
    weights = np.maximum(np.random.default_rng(2).standard_normal(ids.shape), 0).astype(np.float32)
    got = sparse_embedding(pack_padded(weights, mask)[0], pack_padded(ids, mask)[0], pack_padded(hidden, mask)[1],
                           SPECIAL)
    ref = _loop_sparse(weights, ids, lengths)
    assert [list(g) for g in got] == [list(r) for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_allclose([g[k] for k in r], [r[k] for k in r], rtol=1e-6)


def test_colbert_embedding_drops_cls_keeps_eos_and_normalises():
    hidden, mask, _, lengths = _batch(3)
    got = colbert_embedding(*pack_padded(hidden, mask))
    assert [len(v) for v in got] == (lengths - 1).tolist()
    for b, v in enumerate(got):
        ref = hidden[b, 1:lengths[b]]
        np.testing.assert_allclose(v, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_bad_offsets_and_pooling_are_named():
    states = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="offsets"):
        dense_embedding(states, [0, 3])                      # does not reach the 5 rows
    with pytest.raises(ValueError, match="offsets"):
        colbert_embedding(states, [0, 3, 3, 5])              # an empty text
    with pytest.raises(ValueError, match="pooling"):
        dense_embedding(states, [0, 5], pooling="max")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_training_heads_equal_the_inference_heads(pooling):
    hidden, mask, ids, lengths = _batch(4, H=8)
    heads = M3Heads(8, 5)
    rng = np.random.default_rng(5)
    for p in heads.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    dense, sparse, colbert = heads.train_outputs(ms.Tensor(hidden), ms.Tensor(mask), ms.Tensor(ids), pooling, SPECIAL)
    packed, offsets = pack_padded(hidden, mask)
    np.testing.assert_allclose(dense.asnumpy(), dense_embedding(packed, offsets, pooling), rtol=1e-5, atol=1e-6)
    w_s, b_s = heads.sparse_linear.weight.asnumpy(), heads.sparse_linear.bias.asnumpy()
    token_w = np.maximum(hidden @ w_s[0] + b_s[0], 0)                                   # [B, L]
    ref_lex = _loop_sparse(token_w, ids, lengths)
    got = sparse.asnumpy()
    for b, d in enumerate(ref_lex):
        for t, w in d.items():
            assert got[b][ids[b] == int(t)].max() == pytest.approx(w, rel=1e-5)
    assert (got[mask == 0] == 0).all() and (got[np.isin(ids, SPECIAL)] == 0).all()
    w_c, b_c = heads.colbert_linear.weight.asnumpy(), heads.colbert_linear.bias.asnumpy()
    ref_col = colbert_embedding(packed @ w_c.T + b_c, offsets)
    col = colbert.asnumpy()
    for b, v in enumerate(ref_col):
        np.testing.assert_allclose(col[b, :lengths[b] - 1], v, rtol=1e-5, atol=1e-5)
        assert (col[b, lengths[b] - 1:] == 0).all()
