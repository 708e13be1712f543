"""bgem3_lib.training.batch_scores: the packed scores equal the padded reference formulas of
bgem3_lib.training.losses (values and gradients), with length chunks in any order, repeated ids and padding."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from bgem3_lib.training.batch_scores import MaxSim, batch_plan, lexical_scores, maxsim_scores
from bgem3_lib.training.losses import colbert_scores, sparse_scores

ms.runtime.launch_blocking()
SPECIAL = (0, 1, 2, 3)


def padded_texts(rng, n, lo, hi, vocab=12):
    lengths = rng.integers(lo, hi + 1, n)
    ids = np.ones((n, lengths.max()), np.int32)
    mask = np.zeros_like(ids)
    for r, k in enumerate(lengths):
        ids[r, :k] = np.r_[0, rng.integers(4, vocab, k - 2), 2]      # few ids: many repeats and matches
        mask[r, :k] = 1
    return ids, mask


@pytest.fixture
def batch():
    rng = np.random.default_rng(5)
    q_ids, q_mask = padded_texts(rng, 3, 3, 7)
    p_ids, p_mask = padded_texts(rng, 6, 3, 11)
    perm = np.array([4, 0, 5, 2, 1, 3])                  # rows of the chunks' concatenation
    chunks = [perm[:2], perm[2:]]
    order = np.empty(6, np.int32)
    order[perm] = np.arange(6)
    cut = [(p_ids[c][:, : p_mask[c].sum(1).max()], p_mask[c][:, : p_mask[c].sum(1).max()]) for c in chunks]
    plan = batch_plan(q_ids, q_mask, [i for i, _ in cut], [m for _, m in cut], SPECIAL, order)
    return rng, q_ids, q_mask, p_ids, p_mask, cut, order, plan


def packed_like(plan, q_x, cut_x):
    """Per-position values (queries [B, Lq, ...], chunks [N_c, L_c, ...]) -> the packed [T, ...] rows."""
    flat = np.concatenate([a.reshape(-1, *a.shape[2:]) for a in [q_x, *cut_x]])
    return flat[plan.rows.asnumpy()]


def test_lexical_scores_equal_sparse_scores(batch):
    rng, q_ids, q_mask, p_ids, p_mask, cut, order, plan = batch
    q_w = rng.random(q_ids.shape).astype(np.float32) * q_mask * ~np.isin(q_ids, SPECIAL)
    p_w = rng.random(p_ids.shape).astype(np.float32) * p_mask * ~np.isin(p_ids, SPECIAL)
    perm = np.argsort(order)
    cut_w = [p_w[perm[:2], : cut[0][0].shape[1]], p_w[perm[2:], : cut[1][0].shape[1]]]
    got = lexical_scores(Tensor(packed_like(plan, q_w, cut_w)), plan).asnumpy()
    ref = sparse_scores(q_w, q_ids, p_w, p_ids).asnumpy()
    assert (ref > 0).sum() > 5
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_maxsim_scores_and_gradients_equal_colbert_scores(batch):
    rng, q_ids, q_mask, p_ids, p_mask, cut, order, plan = batch
    d = 5
    q = rng.standard_normal((*q_ids.shape, d)).astype(np.float32)
    p = rng.standard_normal((*p_ids.shape, d)).astype(np.float32)
    perm = np.argsort(order)
    cut_p = [p[perm[:2], : cut[0][0].shape[1]], p[perm[2:], : cut[1][0].shape[1]]]
    packed = Tensor(packed_like(plan, q, cut_p))
    weights = Tensor(rng.standard_normal((q_ids.shape[0], p_ids.shape[0])).astype(np.float32))
    maxsim = MaxSim()

    def ours(x):
        return (maxsim_scores(maxsim, x, plan) * weights).sum()

    def ref(qq, pp):
        return (colbert_scores(qq, q_mask[:, 1:], pp, p_mask[:, 1:]) * weights).sum()

    np.testing.assert_allclose(maxsim_scores(maxsim, packed, plan).asnumpy(),
                               colbert_scores(q[:, 1:], q_mask[:, 1:], p[:, 1:], p_mask[:, 1:]).asnumpy(),
                               rtol=1e-6, atol=1e-6)
    g = ms.grad(ours)(packed).asnumpy()
    gq, gp = ms.grad(ref, grad_position=(0, 1))(Tensor(q[:, 1:]), Tensor(p[:, 1:]))
    zero_cls = lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], axis=1)  # noqa: E731
    gp = zero_cls(gp.asnumpy())
    cut_g = [gp[perm[:2], : cut[0][0].shape[1]], gp[perm[2:], : cut[1][0].shape[1]]]
    np.testing.assert_allclose(g, packed_like(plan, zero_cls(gq.asnumpy()), cut_g), rtol=1e-5, atol=1e-6)


def test_plan_rejects_texts_without_tokens_after_cls():
    ids, mask = np.array([[0, 5, 2]]), np.array([[1, 0, 0]])
    with pytest.raises(ValueError, match="at least one valid token"):
        batch_plan(ids, mask, [ids], [np.ones_like(mask)])
    with pytest.raises(ValueError, match="CLS"):
        batch_plan(ids, np.array([[0, 1, 1]]), [ids], [np.ones_like(mask)])


def test_no_shared_ids_give_zero_lexical_scores():
    plan = batch_plan(np.array([[0, 5, 2]]), np.ones((1, 3)), [np.array([[0, 6, 2]])], [np.ones((1, 3))])
    assert plan.groups is None
    assert (lexical_scores(ops.ones((6,), ms.float32), plan).asnumpy() == 0).all()
