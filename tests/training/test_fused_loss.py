"""training.fused_loss: the unified loss as one host op, against m3_loss (MindSpore ops and their autograd) and
against finite differences of its own float64 forward."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from bgem3_lib.training.fused_loss import PARTS, fused_m3_loss, loss_backward, loss_forward
from bgem3_lib.training.losses import in_batch_targets, m3_loss


@pytest.fixture
def scores():
    rng = np.random.default_rng(3)
    return [Tensor(rng.standard_normal((4, 12)).astype(np.float32)) for _ in range(3)]


CONFIGS = [((1.0, 0.3, 1.0), 0.02, (1.0, 0.1, 1.0), True), ((0.4, 1.0, 0.7), 0.5, (0.3, 1.0, 2.0), True),
           ((1.0, 0.3, 1.0), 0.05, (1.0, 0.1, 1.0), False)]


@pytest.mark.parametrize("weights, tau, lambdas, sd", CONFIGS)
def test_parts_and_gradients_match_m3_loss(scores, weights, tau, lambdas, sd):
    target = in_batch_targets(4, 3)
    ref = m3_loss(*scores, target, weights=weights, temperature=tau, lambdas=lambdas, use_self_distill=sd)
    got = fused_m3_loss(*scores, target, weights, tau, lambdas, sd)
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(float(got[k]), float(ref[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    # the gradient of a mix of every part (each part's own coefficient), as value_and_grad sees it
    coef = {k: 0.5 + i for i, k in enumerate(sorted(ref))}

    def mix(loss):
        def f(a, b, c):
            out = loss(a, b, c)
            return sum(out[k] * coef[k] for k in out)
        return f

    ref_fn = mix(lambda a, b, c: m3_loss(a, b, c, target, weights=weights, temperature=tau, lambdas=lambdas,
                                         use_self_distill=sd))
    got_fn = mix(lambda a, b, c: fused_m3_loss(a, b, c, target, weights, tau, lambdas, sd))
    _, g_ref = ms.value_and_grad(ref_fn, grad_position=(0, 1, 2))(*scores)
    _, g_got = ms.value_and_grad(got_fn, grad_position=(0, 1, 2))(*scores)
    for r, g in zip(g_ref, g_got):
        np.testing.assert_allclose(g.asnumpy(), r.asnumpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sd", [True, False])
def test_backward_is_the_forward_s_derivative(sd):
    """Central differences of loss_forward (float64) in every score, for a random vector of part weights;
    the teacher moves with the scores here, so only nce terms are compared where sd (distill holds T fixed)."""
    rng = np.random.default_rng(0)
    s, target = rng.standard_normal((3, 3, 5)), np.array([0, 2, 4])
    cfg = ((1.0, 0.3, 1.0), 0.7, (1.0, 0.1, 1.0), sd)
    d = rng.standard_normal(len(PARTS))
    if sd:                                                        # only what does not go through the teacher
        d[[PARTS.index(k) for k in ("distill_dense", "distill_lex", "distill_mul", "L_distill", "total")]] = 0
    grad = loss_backward(loss_forward(s, target, *cfg)[1], target, d, *cfg)
    num, h = np.zeros_like(s), 1e-6
    for idx in np.ndindex(*s.shape):
        e = np.zeros_like(s)
        e[idx] = h
        num[idx] = (d @ loss_forward(s + e, target, *cfg)[0] - d @ loss_forward(s - e, target, *cfg)[0]) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)


def test_bad_scores_raise_with_the_mode_named(scores):
    target = in_batch_targets(4, 3)
    bad = scores[1].asnumpy().copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="s_lex contains NaN"):
        fused_m3_loss(scores[0], Tensor(bad), scores[2], target, (1, 0.3, 1), 0.02, (1, 0.1, 1))
    with pytest.raises(ValueError, match="one \\[B, N\\] shape"):
        fused_m3_loss(scores[0], scores[1][:, :5], scores[2], target, (1, 0.3, 1), 0.02, (1, 0.1, 1))
    with pytest.raises(ValueError, match="target must lie"):
        loss_forward(np.zeros((3, 2, 3)), np.array([0, 3]), (1, 0.3, 1), 0.02, (1, 0.1, 1), True)
