"""M3TrainNet / EncodeBlock on a tiny random encoder (hidden 16, 2 layers): the three outputs against the
heads re-applied in NumPy to the encoder's hidden states, every loss part against the unified loss
re-derived in float64 NumPy (brute-force lexical and max-sim scores), cached-state starts against the full
forward, and what is trainable / frozen."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from bgem3_lib.model.config import M3Config
from bgem3_lib.model.encoder import M3Encoder, encoder_inputs
from bgem3_lib.model.heads import M3Heads
from bgem3_lib.training.train_model import PART_NAMES, EncodeBlock, M3TrainNet, as_chunks

SPECIAL = (0, 1, 2, 3)
B, G = 2, 3


def tiny(seed: int = 0, pooling: str = "cls", colbert_dim: int | None = None):
    ms.set_seed(seed)
    cfg = M3Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                   vocab_size=40, max_position_embeddings=40, pooling=pooling)
    enc, heads = M3Encoder(cfg), M3Heads(16, colbert_dim)
    rng = np.random.default_rng(seed)
    for p in list(enc.get_parameters()) + list(heads.get_parameters()):
        if not p.name.endswith("gamma"):
            p.set_data(Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    heads.sparse_linear.bias.set_data(Tensor(np.array([0.9], np.float32)))    # most tokens get weight > 0
    return cfg, enc, heads


def texts(seed: int, n: int, lo: int, hi: int):
    """``n`` padded ``<s> ... </s>`` rows over a small vocabulary (ids 3..11: many shared and repeated
    tokens, some <unk> = 3); returns NumPy ids and mask."""
    rng = np.random.default_rng(seed)
    rows = [[0, *rng.integers(3, 12, rng.integers(lo, hi)).tolist(), 2] for _ in range(n)]
    width = max(len(r) for r in rows)
    ids = np.ones((n, width), np.int32)
    mask = np.zeros((n, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def batch(seed: int = 1):
    q_ids, q_mask = texts(seed, B, 2, 6)
    p_ids, p_mask = texts(seed + 100, B * G, 3, 11)
    return q_ids, q_mask, p_ids, p_mask


# ---------------------------------------------------------------- the NumPy reference


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_outputs(enc, heads, ids, mask, pooling):
    """(dense, sparse, colbert) from the encoder's hidden states with the heads' weights applied in NumPy."""
    cfg = enc.cfg
    h = enc(*encoder_inputs(ids, mask, cfg)).asnumpy().astype(np.float64)
    w_s, b_s = heads.sparse_linear.weight.asnumpy(), heads.sparse_linear.bias.asnumpy()
    w_c, b_c = heads.colbert_linear.weight.asnumpy(), heads.colbert_linear.bias.asnumpy()
    m = mask.astype(np.float64)
    dense = h[:, 0] if pooling == "cls" else (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    sparse = np.maximum(h @ w_s.T + b_s, 0)[..., 0] * m * ~np.isin(ids, SPECIAL)
    colbert = unit(h[:, 1:] @ w_c.T + b_c) * m[:, 1:, None]
    return unit(dense), sparse, colbert


def np_lexical(q_w, q_ids, p_w, p_ids):
    """Brute force: per text the max weight of each token id; score = sum over shared ids of the products."""
    def bag(w, ids):
        d = {}
        for wt, t in zip(w, ids):
            if wt > 0:
                d[int(t)] = max(d.get(int(t), 0.0), float(wt))
        return d
    qs, ps = [bag(w, i) for w, i in zip(q_w, q_ids)], [bag(w, i) for w, i in zip(p_w, p_ids)]
    return np.array([[sum(v * p[t] for t, v in q.items() if t in p) for p in ps] for q in qs])


def np_maxsim(q, q_mask, p, p_mask):
    out = np.zeros((len(q), len(p)))
    for b in range(len(q)):
        for n in range(len(p)):
            qv, pv = q[b][q_mask[b, 1:] > 0], p[n][p_mask[n, 1:] > 0]
            out[b, n] = (qv @ pv.T).max(axis=1).mean()
    return out


def log_softmax(x):
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_m3_loss(s_dense, s_lex, s_mul, tau, weights, lambdas, self_distill):
    target = np.arange(B) * G
    nce = {k: -log_softmax(s / tau)[np.arange(B), target].mean()
           for k, s in (("dense", s_dense), ("lex", s_lex), ("mul", s_mul))}
    s_inter = weights[0] * s_dense + weights[1] * s_lex + weights[2] * s_mul
    nce["inter"] = -log_softmax(s_inter / tau)[np.arange(B), target].mean()
    l1, l2, l3 = lambdas
    out = dict(nce, L=(l1 * nce["dense"] + l2 * nce["lex"] + l3 * nce["mul"] + nce["inter"]) / 4)
    if self_distill:
        teacher = np.exp(log_softmax(s_inter / tau))
        for k, s in (("dense", s_dense), ("lex", s_lex), ("mul", s_mul)):
            out[f"distill_{k}"] = -(teacher * log_softmax(s / tau)).sum(1).mean()
        out["L_distill"] = (l1 * out["distill_dense"] + l2 * out["distill_lex"] + l3 * out["distill_mul"]) / 3
        out["total"] = (out["L"] + out["L_distill"]) / 2
    else:
        out.update({k: 0.0 for k in ("distill_dense", "distill_lex", "distill_mul", "L_distill")})
        out["total"] = out["L"]
    return out


def net_inputs(cfg, q_ids, q_mask, p_ids, p_mask, q_hidden=None, p_hidden=None):
    q = encoder_inputs(q_ids, q_mask, cfg)
    p = encoder_inputs(p_ids, p_mask, cfg)
    return (*q, q_hidden, *p, p_hidden)


# ---------------------------------------------------------------- tests


def test_as_chunks():
    a, b = Tensor(np.zeros((2, 3), np.int32)), Tensor(np.ones((1, 5), np.int32))
    assert as_chunks(a) == (a,)
    assert as_chunks([a, b]) == (a, b) and isinstance(as_chunks([a, b]), tuple)
    assert as_chunks((a, b)) == (a, b)
    assert as_chunks(None) == (None,)


@pytest.mark.parametrize("pooling, colbert_dim", [("cls", None), ("mean", 8)])
def test_encode_block_matches_numpy_heads(pooling, colbert_dim):
    cfg, enc, heads = tiny(0, pooling, colbert_dim)
    ids, mask = texts(5, 4, 2, 12)
    ids[1, 2] = 3                                         # an <unk> inside a text gets no lexical weight
    block = EncodeBlock(enc, heads, 0, 0, True, SPECIAL)
    dense, sparse, colbert = (x.asnumpy() for x in block(*encoder_inputs(ids, mask, cfg), None))
    r_dense, r_sparse, r_colbert = np_outputs(enc, heads, ids, mask, pooling)
    assert dense.shape == (4, 16) and sparse.shape == ids.shape and colbert.shape == (4, ids.shape[1] - 1,
                                                                                       colbert_dim or 16)
    np.testing.assert_allclose(dense, r_dense, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sparse, r_sparse, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(colbert, r_colbert, rtol=1e-5, atol=1e-6)
    assert (sparse[np.isin(ids, SPECIAL) | (mask == 0)] == 0).all() and (sparse > 0).sum() > 10
    np.testing.assert_allclose(np.linalg.norm(colbert, axis=-1), mask[:, 1:], atol=1e-5)


@pytest.mark.parametrize("pooling, self_distill, tau, weights, lambdas", [
    ("cls", True, 0.05, None, None),                 # defaults: teacher (1, 0.3, 1), lambdas (1, 0.1, 1)
    ("mean", False, 0.02, (0.4, 0.2, 0.4), (1.0, 0.3, 1.0)),
    ("cls", True, 0.1, (0.5, 1.0, 0.25), (0.7, 0.2, 1.3)),
])
def test_loss_parts_match_numpy(pooling, self_distill, tau, weights, lambdas):
    cfg, enc, heads = tiny(1, pooling)
    q_ids, q_mask, p_ids, p_mask = batch(2)
    kw = {k: v for k, v in (("teacher_weights", weights), ("lambdas", lambdas)) if v is not None}
    net = M3TrainNet(enc, heads, special_ids=SPECIAL, temperature=tau, use_self_distill=self_distill, **kw)
    total, *parts = (float(x.asnumpy()) for x in net(*net_inputs(cfg, q_ids, q_mask, p_ids, p_mask)))

    qd, qs, qc = np_outputs(enc, heads, q_ids, q_mask, pooling)
    pd, ps, pc = np_outputs(enc, heads, p_ids, p_mask, pooling)
    s_dense, s_lex, s_mul = qd @ pd.T, np_lexical(qs, q_ids, ps, p_ids), np_maxsim(qc, q_mask, pc, p_mask)
    assert s_lex.shape == (B, B * G) and (s_lex > 0).any()
    ref = np_m3_loss(s_dense, s_lex, s_mul, tau, weights or (1.0, 0.3, 1.0), lambdas or (1.0, 0.1, 1.0),
                     self_distill)
    assert len(parts) == len(PART_NAMES)
    for name, got in zip(PART_NAMES, parts):
        assert got == pytest.approx(ref[name], rel=2e-4, abs=2e-5), name
    assert total == pytest.approx(ref["total"], rel=2e-4, abs=2e-5)


def test_length_chunks_with_order_match_one_matrix():
    cfg, enc, heads = tiny(2)
    q_ids, q_mask, p_ids, p_mask = batch(3)
    net = M3TrainNet(enc, heads, special_ids=SPECIAL, temperature=0.05)
    whole = [float(x.asnumpy()) for x in net(*net_inputs(cfg, q_ids, q_mask, p_ids, p_mask))]
    perm = np.array([4, 0, 5, 2, 1, 3])                  # rows of the chunks' concatenation
    chunks = [perm[:2], perm[2:]]
    parts = []
    for rows in chunks:
        width = int(p_mask[rows].sum(1).max())
        parts.append(encoder_inputs(p_ids[rows, :width], p_mask[rows, :width], cfg))
    order = np.empty(6, np.int32)
    order[perm] = np.arange(6)                          # passage j sits at row order[j] of the concatenation
    q = encoder_inputs(q_ids, q_mask, cfg)
    chunked = net(*q, None, *(tuple(p[k] for p in parts) for k in range(3)), (None, None), Tensor(order))
    np.testing.assert_allclose([float(x.asnumpy()) for x in chunked], whole, rtol=1e-5, atol=1e-6)


def test_start_layer_over_cached_states_equals_full_forward():
    cfg, enc, heads = tiny(3)
    q_ids, q_mask, p_ids, p_mask = batch(4)

    def states(ids, mask, start):
        t_ids, t_mask, t_pos = encoder_inputs(ids, mask, cfg)
        return enc.run_layers(enc.embed(t_ids, t_pos), enc.mask_bias(t_mask), 0, start)

    full = M3TrainNet(enc, heads, special_ids=SPECIAL)(*net_inputs(cfg, q_ids, q_mask, p_ids, p_mask))
    for start in (1, 2):       # 2: every layer cached, the hidden states are the encoder's output itself
        cached = M3TrainNet(enc, heads, start_layer=start, freeze_layers=start, special_ids=SPECIAL)
        out = cached(*net_inputs(cfg, q_ids, q_mask, p_ids, p_mask, states(q_ids, q_mask, start),
                                 states(p_ids, p_mask, start)))
        np.testing.assert_allclose([float(x.asnumpy()) for x in out], [float(x.asnumpy()) for x in full],
                                   rtol=1e-5, atol=1e-6, err_msg=f"start_layer={start}")


@pytest.mark.parametrize("freeze", [1, 2])
def test_packed_training_kernels_match_mindspore_layers(freeze):
    """The layers above the cache on the fused training kernels (packed tokens, passages in length chunks with
    their order) give the loss and every gradient of the same net on MindSpore's own layers; with ``freeze = 2``
    the layer runs frozen (heads only train)."""
    from bgem3_lib.kernels import train as train_kernels
    if not train_kernels.available():
        pytest.skip("fused CPU training kernels not available here")
    cfg, enc, heads = tiny(5)
    q_ids, q_mask, p_ids, p_mask = batch(6)
    t_ids, t_mask, t_pos = encoder_inputs(q_ids, q_mask, cfg)
    q_hidden = enc.run_layers(enc.embed(t_ids, t_pos), enc.mask_bias(t_mask), 0, 1)
    perm = np.array([4, 0, 5, 2, 1, 3])
    chunks, order = [perm[:2], perm[2:]], np.empty(6, np.int32)
    order[perm] = np.arange(6)
    parts = []
    for rows in chunks:
        width = int(p_mask[rows].sum(1).max())
        c_ids, c_mask, c_pos = encoder_inputs(p_ids[rows, :width], p_mask[rows, :width], cfg)
        parts.append((c_ids, c_mask, c_pos, enc.run_layers(enc.embed(c_ids, c_pos), enc.mask_bias(c_mask), 0, 1)))
    inputs = (t_ids, t_mask, t_pos, q_hidden, *(tuple(p[k] for p in parts) for k in range(4)), Tensor(order))
    results = []
    for kernels in (True, False):
        net = M3TrainNet(enc, heads, start_layer=1, freeze_layers=freeze, special_ids=SPECIAL, temperature=0.05)
        net.use_cpu_kernels = kernels
        assert net.packed_layers_ready(q_hidden) == kernels
        params = net.trainable_params()
        (total, *rest), grads = ms.value_and_grad(net, grad_position=None, weights=params, has_aux=True)(*inputs)
        results.append(([float(total.asnumpy())] + [float(x.asnumpy()) for x in rest],
                        {p.name: g.asnumpy() for p, g in zip(params, grads)}))
    (loss_k, grad_k), (loss_m, grad_m) = results
    np.testing.assert_allclose(loss_k, loss_m, rtol=1e-5, atol=1e-6)
    assert grad_k.keys() == grad_m.keys() and len(grad_k) == (4 if freeze == 2 else 20)
    for name, g in grad_m.items():
        # the key bias moves every score of a query row alike: its gradient is zero up to rounding on both sides,
        # so it is held to the query bias's scale
        scale = grad_m[name.replace("key.bias", "query.bias")] if name.endswith("key.bias") else g
        np.testing.assert_allclose(grad_k[name], g, rtol=0, atol=1e-4 * np.abs(scale).max(), err_msg=name)


def _names(params):
    return {p.name for p in params}


def test_trainable_params_follow_freeze_settings():
    cfg, enc, heads = tiny(4)
    all_enc = _names(enc.get_parameters())
    emb = {n for n in all_enc if n.startswith("embeddings.")}
    layer = [{n for n in all_enc if n.startswith(f"layers.{i}.")} for i in range(2)]
    head = {"colbert_linear.weight", "colbert_linear.bias", "sparse_linear.weight", "sparse_linear.bias"}
    assert emb and all(layer) and emb | layer[0] | layer[1] == all_enc and _names(heads.get_parameters()) == head

    def trainable(**kw):
        return _names(M3TrainNet(enc, heads, **kw).trainable_params())

    assert trainable(freeze_embeddings=False) == all_enc | head
    assert trainable() == layer[0] | layer[1] | head                         # embeddings frozen by default
    assert trainable(freeze_layers=1) == layer[1] | head
    assert trainable(freeze_layers=2) == head
    assert trainable(start_layer=1, freeze_embeddings=False) == layer[1] | head   # nothing below the start
    assert trainable(start_layer=1, freeze_layers=2) == head
    assert trainable(start_layer=2, freeze_layers=0) == head                  # freeze_layers < start: the start


def test_frozen_parts_get_no_gradient():
    cfg, enc, heads = tiny(5)
    inputs = net_inputs(cfg, *batch(6))
    every = list(enc.get_parameters()) + list(heads.get_parameters())
    # freeze_embeddings=False, yet the stop_gradient over frozen layer 0 cuts the embeddings off too
    net = M3TrainNet(enc, heads, freeze_layers=1, freeze_embeddings=False, special_ids=SPECIAL)
    _, grads = ms.value_and_grad(net, grad_position=None, weights=every, has_aux=True)(*inputs)
    norms = {p.name: float(np.abs(g.asnumpy()).max()) for p, g in zip(every, grads)}
    for name, n in norms.items():
        if name.startswith(("embeddings.", "layers.0.")):
            assert n == 0.0, name
    assert all(norms[n] > 0 for n in norms if n.startswith("layers.1.attention.query"))
    assert norms["sparse_linear.weight"] > 0 and norms["colbert_linear.weight"] > 0

    net = M3TrainNet(enc, heads, freeze_layers=0, freeze_embeddings=True, special_ids=SPECIAL)
    _, grads = ms.value_and_grad(net, grad_position=None, weights=every, has_aux=True)(*inputs)
    norms = {p.name: float(np.abs(g.asnumpy()).max()) for p, g in zip(every, grads)}
    assert all(norms[n] == 0 for n in norms if n.startswith("embeddings."))
    assert all(norms[n] > 0 for n in norms if n.startswith(("layers.0.attention.value", "layers.0.ffn.inner")))

    net = M3TrainNet(enc, heads, freeze_layers=0, freeze_embeddings=False, special_ids=SPECIAL)
    word_p = enc.embeddings.word
    _, (word,) = ms.value_and_grad(net, grad_position=None, weights=[word_p], has_aux=True)(*inputs)
    word = word.asnumpy()
    used = np.unique(np.concatenate([x.reshape(-1) for x in batch(6)[::2]]))
    unused = np.setdiff1d(np.arange(cfg.vocab_size), used)
    assert np.abs(word[used]).sum() > 0 and not word[unused].any()


@pytest.mark.parametrize("freeze", [1, 2])
def test_embeddings_below_frozen_layers_are_not_trainable(freeze):
    _, enc, heads = tiny(4)
    net = M3TrainNet(enc, heads, freeze_layers=freeze, freeze_embeddings=False)
    assert not [n for n in _names(net.trainable_params()) if n.startswith("embeddings.")]


@pytest.mark.parametrize("start, freeze", [(-1, 0), (3, 3), (0, 3), (1, 3), (3, 0)])
def test_bad_layer_arguments_raise(start, freeze):
    _, enc, heads = tiny(6)
    with pytest.raises(ValueError, match=r"need 0 <= start_layer <= freeze_layers <= 2"):
        M3TrainNet(enc, heads, start_layer=start, freeze_layers=freeze)


def test_unequal_groups_raise():
    cfg, enc, heads = tiny(7)
    q_ids, q_mask, p_ids, p_mask = batch(8)
    net = M3TrainNet(enc, heads, special_ids=SPECIAL)
    with pytest.raises(ValueError, match="5 passages for 2 queries"):
        net(*net_inputs(cfg, q_ids, q_mask, p_ids[:5], p_mask[:5]))
