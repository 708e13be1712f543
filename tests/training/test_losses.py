"""Tests for bgem3_lib.training.losses against an independent NumPy reference and finite differences."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from bgem3_lib.training.losses import (
    colbert_scores,
    dense_scores,
    in_batch_targets,
    info_nce,
    integrated_scores,
    m3_loss,
    self_distill_loss,
    sparse_scores,
)

# Synchronous kernel launch: on this small CPU box it makes tiny PyNative ops ~20x faster (0.2 ms vs 4 ms).
ms.runtime.launch_blocking()

TOL = 1e-6

# ---------------------------------------------------------------- independent NumPy reference


def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for r, row in enumerate(x):  # row by row, with the log-sum-exp trick
        m = row.max()
        out[r] = row - m - np.log(np.sum(np.exp(row - m)))
    return out


def np_info_nce(scores, target, tau):
    logp = np_log_softmax(np.asarray(scores) / tau)
    return -np.mean([logp[i, t] for i, t in enumerate(target)])


def np_self_distill(student, teacher, tau):
    p_t = np.exp(np_log_softmax(np.asarray(teacher) / tau))
    return -np.mean(np.sum(p_t * np_log_softmax(np.asarray(student) / tau), axis=1))


def np_sparse(q_w, q_ids, p_w, p_ids):
    """Dictionary reference: each text -> {token id: max weight}, score = sum over shared ids."""

    def bag(w, ids):
        d = {}
        for wi, ti in zip(w, ids):
            d[int(ti)] = max(d.get(int(ti), 0.0), float(wi))
        return d

    qs = [bag(w, i) for w, i in zip(q_w, q_ids)]
    ps = [bag(w, i) for w, i in zip(p_w, p_ids)]
    return np.array([[sum(qd[t] * pd[t] for t in qd.keys() & pd.keys()) for pd in ps] for qd in qs])


def np_colbert(q, q_mask, p, p_mask):
    out = np.zeros((len(q), len(p)))
    for b in range(len(q)):
        qv = q[b][np.asarray(q_mask[b], bool)]
        for n in range(len(p)):
            pv = p[n][np.asarray(p_mask[n], bool)]
            out[b, n] = np.mean([max(float(u @ v) for v in pv) for u in qv])
    return out


def np_m3(sd, sl, sm, target, tau, lambdas, w=(1.0, 0.3, 1.0), distill=True, frozen_teacher=None):
    """The FlagEmbedding recipe: divide every score by tau first, ensemble the scaled scores."""
    d, lx, mu = (np.asarray(s) / tau for s in (sd, sl, sm))
    ens = w[0] * d + w[1] * lx + w[2] * mu
    l1, l2, l3 = lambdas
    ce = [np_info_nce(s, target, 1.0) for s in (d, lx, mu, ens)]
    L = (l1 * ce[0] + l2 * ce[1] + l3 * ce[2] + ce[3]) / 4
    if not distill:
        return L
    teacher = ens if frozen_teacher is None else frozen_teacher
    kd = [np_self_distill(s, teacher, 1.0) for s in (d, lx, mu)]
    return (L + (l1 * kd[0] + l2 * kd[1] + l3 * kd[2]) / 3) / 2


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of scalar f at float64 array x."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        g[idx] = (f(up) - f(down)) / (2 * eps)
    return g


def scal(t):
    return float(t.asnumpy())


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def make_scores(rng, b=3, n=6):
    return [rng.normal(scale=0.3, size=(b, n)) for _ in range(3)]


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("tau", [0.02, 0.1, 1.0])
def test_info_nce_matches_numpy(rng, tau):
    scores = rng.normal(size=(4, 6))
    target = np.array([0, 2, 5, 1])
    assert abs(scal(info_nce(scores, target, tau)) - np_info_nce(scores, target, tau)) <= TOL


def test_info_nce_hand_example():
    assert scal(info_nce([[2.0, 0.0]], [0], 1.0)) == pytest.approx(np.log1p(np.exp(-2.0)), abs=1e-12)
    # float32 inputs stay float32 and close to the float64 value
    out = info_nce(np.array([[2.0, 0.0]], np.float32), Tensor(np.array([0], np.int32)), 1.0)
    assert out.dtype == ms.float32 and scal(out) == pytest.approx(0.126928, abs=1e-6)


def test_in_batch_targets():
    assert in_batch_targets(3, 4).asnumpy().tolist() == [0, 4, 8]


def test_dense_scores_matches_numpy(rng):
    q, p = rng.normal(size=(2, 5)), rng.normal(size=(6, 5))
    np.testing.assert_allclose(dense_scores(q, p).asnumpy(), q @ p.T, atol=TOL)


@pytest.mark.parametrize("chunk", [None, 1, 2, 7])
def test_sparse_scores_matches_dictionary_reference(rng, chunk):
    # small vocabulary: many shared ids across texts and repeats inside a text
    q_ids, p_ids = rng.integers(0, 12, size=(3, 5)), rng.integers(0, 12, size=(7, 8))
    q_w, p_w = rng.uniform(0, 1, size=(3, 5)), rng.uniform(0, 1, size=(7, 8))
    q_w[0, -2:] = 0.0  # padding carries weight 0
    p_w[3, -4:] = 0.0
    assert (q_ids[:, :, None] == q_ids[:, None, :]).sum() > 3 * 5  # repeats present
    got = sparse_scores(q_w, q_ids, p_w, p_ids, chunk_size=chunk).asnumpy()
    np.testing.assert_allclose(got, np_sparse(q_w, q_ids, p_w, p_ids), atol=TOL)


def test_sparse_scores_repeat_uses_max_weight():
    got = sparse_scores([[0.2, 0.5, 0.4]], [[7, 9, 7]], [[1.0]], [[7]]).asnumpy()
    assert got.tolist() == [[pytest.approx(0.4)]]


def test_colbert_scores_matches_loop_reference(rng):
    q, p = rng.normal(size=(2, 4, 3)), rng.normal(size=(5, 6, 3))
    q_mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    p_mask = np.ones((5, 6), int)
    p_mask[1, 2:] = 0
    p_mask[4, :5] = 0
    p[1, 2:] = 50.0  # large padded vectors would win the max if the mask were ignored
    got = colbert_scores(q, q_mask, p, p_mask.astype(bool)).asnumpy()
    np.testing.assert_allclose(got, np_colbert(q, q_mask, p, p_mask), atol=TOL)


def test_integrated_scores(rng):
    sd, sl, sm = make_scores(rng)
    np.testing.assert_allclose(integrated_scores(sd, sl, sm, (1.0, 0.3, 1.0)).asnumpy(), sd + 0.3 * sl + sm,
                               atol=1e-12)


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_self_distill_matches_numpy(rng, tau):
    s, t = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    assert abs(scal(self_distill_loss(s, t, tau)) - np_self_distill(s, t, tau)) <= TOL


@pytest.mark.parametrize("variant, lambdas", [("paper", (1.0, 0.1, 1.0)), ("lambda=w", (1.0, 0.3, 1.0))])
def test_m3_loss_matches_reference(rng, variant, lambdas):
    sd, sl, sm = make_scores(rng)
    target = in_batch_targets(3, 2)
    out = m3_loss(sd, sl, sm, target, temperature=0.05, variant=variant)
    tgt = [0, 2, 4]
    assert abs(scal(out["total"]) - np_m3(sd, sl, sm, tgt, 0.05, lambdas)) <= TOL
    assert abs(scal(out["L"]) - np_m3(sd, sl, sm, tgt, 0.05, lambdas, distill=False)) <= TOL
    assert scal(out["total"]) == pytest.approx((scal(out["L"]) + scal(out["L_distill"])) / 2, abs=1e-12)
    for key, s in (("dense", sd), ("lex", sl), ("mul", sm)):
        assert abs(scal(out[key]) - np_info_nce(s, tgt, 0.05)) <= TOL
    ablation = m3_loss(sd, sl, sm, target, temperature=0.05, variant=variant, use_self_distill=False)
    assert "L_distill" not in ablation and scal(ablation["total"]) == pytest.approx(scal(out["L"]), abs=1e-12)


def test_m3_loss_variants_differ_and_lambdas_override(rng):
    sd, sl, sm = make_scores(rng)
    t = [0, 2, 4]
    paper = scal(m3_loss(sd, sl, sm, t)["total"])                         # the default is the paper's lambda
    assert paper == pytest.approx(scal(m3_loss(sd, sl, sm, t, lambdas=(1.0, 0.1, 1.0))["total"]), abs=1e-12)
    teacher_w = scal(m3_loss(sd, sl, sm, t, variant="lambda=w")["total"])
    assert paper != pytest.approx(teacher_w)
    assert scal(m3_loss(sd, sl, sm, t, lambdas=(1.0, 0.3, 1.0))["total"]) == pytest.approx(teacher_w, abs=1e-12)


# ---------------------------------------------------------------- gradients (float64)


def test_info_nce_gradient_matches_finite_differences(rng):
    scores, target = rng.normal(size=(3, 5)), np.array([1, 0, 4])
    auto = ms.grad(lambda s: info_nce(s, target, 0.5))(Tensor(scores)).asnumpy()
    np.testing.assert_allclose(auto, fd_grad(lambda s: scal(info_nce(s, target, 0.5)), scores), atol=1e-7)


def test_info_nce_float32_gradient_close_to_float64(rng):
    scores, target = rng.normal(size=(3, 5)), np.array([1, 0, 4])
    g64 = ms.grad(lambda s: info_nce(s, target, 0.1))(Tensor(scores)).asnumpy()
    g32 = ms.grad(lambda s: info_nce(s, target, 0.1))(Tensor(scores.astype(np.float32))).asnumpy()
    np.testing.assert_allclose(g32, g64, atol=1e-5)


def test_self_distill_teacher_gets_no_gradient(rng):
    s, t = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    g_student, g_teacher = ms.grad(lambda a, b: self_distill_loss(a, b, 0.5), grad_position=(0, 1))(
        Tensor(s), Tensor(t)
    )
    np.testing.assert_allclose(g_student.asnumpy(), fd_grad(lambda x: scal(self_distill_loss(x, t, 0.5)), s),
                               atol=1e-7)
    assert np.all(g_teacher.asnumpy() == 0.0)
    # the loss does depend on the teacher, so a zero gradient is the stop-gradient at work
    assert np.abs(fd_grad(lambda x: scal(self_distill_loss(s, x, 0.5)), t)).max() > 1e-2


def test_m3_loss_gradient_treats_teacher_as_constant(rng):
    sd, sl, sm = make_scores(rng, b=2, n=4)
    target, tau = [0, 2], 0.2
    def total(a, b, c):
        return m3_loss(a, b, c, target, temperature=tau)["total"]

    autos = ms.grad(total, grad_position=(0, 1, 2))(Tensor(sd), Tensor(sl), Tensor(sm))
    frozen = (sd + 0.3 * sl + sm) / tau
    for k, auto in enumerate(autos):
        def ref(x, k=k, frozen=None):
            args = [sd, sl, sm]
            args[k] = x
            return np_m3(*args, target, tau, (1.0, 0.1, 1.0), frozen_teacher=frozen)

        expected = fd_grad(lambda x, k=k: ref(x, k, frozen), (sd, sl, sm)[k])
        np.testing.assert_allclose(auto.asnumpy(), expected, atol=1e-6)
        # a teacher that also received gradient would give this different answer
        assert np.abs(fd_grad(lambda x, k=k: ref(x, k), (sd, sl, sm)[k]) - expected).max() > 1e-3


def test_m3_loss_without_distill_gradient_matches_finite_differences(rng):
    sd, sl, sm = make_scores(rng, b=2, n=4)
    def total(a):
        return m3_loss(a, sl, sm, [0, 2], temperature=0.2, use_self_distill=False)["total"]

    auto = ms.grad(total)(Tensor(sd)).asnumpy()
    fd = fd_grad(lambda x: scal(total(x)), sd)
    np.testing.assert_allclose(auto, fd, atol=1e-7)


def _check_score_grads(fn, arrays, positions, rng):
    """Gradient of sum(fn(...) * R) w.r.t. arrays[positions] against finite differences."""
    out_shape = fn(*arrays).shape
    r = rng.normal(size=out_shape)

    def loss(*xs):
        return (fn(*xs) * Tensor(r)).sum()

    tensors = [Tensor(a) for a in arrays]
    autos = ms.grad(loss, grad_position=tuple(positions))(*tensors)
    for pos, auto in zip(positions, autos):
        def f(x, pos=pos):
            args = list(arrays)
            args[pos] = x
            return scal(loss(*args))

        np.testing.assert_allclose(auto.asnumpy(), fd_grad(f, arrays[pos]), atol=1e-7)


def test_dense_scores_gradient(rng):
    _check_score_grads(dense_scores, [rng.normal(size=(2, 3)), rng.normal(size=(4, 3))], (0, 1), rng)


def test_sparse_scores_gradient(rng):
    # repeated ids (3 in the first query and passage, 2 in the second passage) exercise the max-pooling
    q_ids, p_ids = np.array([[3, 5, 3], [1, 2, 4]]), np.array([[5, 3, 8, 3], [2, 2, 9, 1], [4, 6, 7, 0]])
    arrays = [rng.uniform(0.1, 1, size=(2, 3)), q_ids, rng.uniform(0.1, 1, size=(3, 4)), p_ids]
    _check_score_grads(sparse_scores, arrays, (0, 2), rng)


def test_colbert_scores_gradient(rng):
    q_mask, p_mask = np.array([[1, 0], [1, 1]]), np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1]])
    arrays = [rng.normal(size=(2, 2, 3)), q_mask, rng.normal(size=(3, 3, 3)), p_mask]
    _check_score_grads(colbert_scores, arrays, (0, 2), rng)


# ---------------------------------------------------------------- bad input


def test_nan_inputs_raise(rng):
    bad = rng.normal(size=(2, 3))
    bad[1, 1] = np.nan
    good = rng.normal(size=(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        info_nce(bad, [0, 1], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        self_distill_loss(good, bad, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        m3_loss(good, good, bad, [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        dense_scores(bad, good)
    with pytest.raises(ValueError, match="NaN"):
        sparse_scores(np.abs(bad), np.zeros((2, 3), int), np.abs(good), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="NaN"):
        colbert_scores(bad[:, :, None], np.ones((2, 3)), good[:, :, None], np.ones((2, 3)))


def test_bad_shapes_and_arguments_raise(rng):
    s = rng.normal(size=(2, 3))
    with pytest.raises(ValueError, match="2 dimensions"):
        info_nce(s[0], [0], 0.1)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        info_nce(s, [0, 3], 0.1)
    with pytest.raises(ValueError, match="integer indices"):
        info_nce(s, [0], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(s, [0, 1], 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        self_distill_loss(s, s[:, :2], 0.1)
    with pytest.raises(ValueError, match="hidden sizes"):
        dense_scores(s, rng.normal(size=(2, 4)))
    with pytest.raises(ValueError, match="variant"):
        m3_loss(s, s, s, [0, 1], variant="other")
    with pytest.raises(ValueError, match="score shapes"):
        m3_loss(s, s[:, :2], s, [0, 1])
    with pytest.raises(TypeError, match="integer token ids"):
        sparse_scores(np.abs(s), s, np.abs(s), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="non-negative"):
        sparse_scores(-np.abs(s), np.zeros((2, 3), int), np.abs(s), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="equal shapes"):
        sparse_scores(np.abs(s), np.zeros((2, 2), int), np.abs(s), np.zeros((2, 3), int))
    q = rng.normal(size=(1, 2, 3))
    with pytest.raises(ValueError, match="at least one valid token"):
        colbert_scores(q, [[1, 1]], q, [[0, 0]])
    with pytest.raises(ValueError, match="mask shapes"):
        colbert_scores(q, [[1, 1, 1]], q, [[1, 1]])
    with pytest.raises(TypeError, match="numeric"):
        info_nce([["a", "b"]], [0], 0.1)
