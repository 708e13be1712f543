"""AdamW, lr_at and clip_by_global_norm against a hand-written float64 NumPy AdamW, hand-worked learning
rates and NumPy norms."""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
import pytest

from bgem3_lib.training.optim import AdamW, clip_by_global_norm, lr_at, no_decay


def numpy_adamw(params: dict, grads_per_step: list, lrs: list, scales: dict, decay: dict,
                b1=0.9, b2=0.999, eps=1e-8):
    """Reference AdamW (Loshchilov & Hutter, decoupled decay; Kingma & Ba bias correction) in float64."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for k in p:
            g = grads[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            step_lr = lr * scales[k]
            p[k] = p[k] - step_lr * m_hat / (np.sqrt(v_hat) + eps) - step_lr * decay[k] * p[k]
    return p, m, v


def _setup(seed=0, weight_decay=0.05, betas=(0.9, 0.999)):
    rng = np.random.default_rng(seed)
    init = {"enc.layer.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "enc.layer.bias": rng.normal(size=(4,)).astype(np.float32),
            "enc.norm.gamma": (1 + 0.1 * rng.normal(size=(3,))).astype(np.float32),
            "head.weight": rng.normal(size=(1, 3)).astype(np.float32)}
    params = [ms.Parameter(ms.Tensor(v), name=k) for k, v in init.items()]
    scales = {"enc.layer.weight": 0.1, "enc.layer.bias": 0.1, "enc.norm.gamma": 0.1, "head.weight": 1.0}
    opt = AdamW(params, [scales[k] for k in init], betas=betas, weight_decay=weight_decay)
    return rng, init, params, scales, opt


def test_adamw_matches_numpy_over_several_steps():
    rng, init, params, scales, opt = _setup()
    decay = {"enc.layer.weight": 0.05, "enc.layer.bias": 0.0, "enc.norm.gamma": 0.0, "head.weight": 0.05}
    assert opt.decay == [decay[p.name] for p in params]
    steps, grads, lrs = 6, [], []
    for s in range(steps):
        g = {k: rng.normal(scale=[1.0, 0.01, 3.0][s % 3], size=v.shape).astype(np.float32) for k, v in init.items()}
        lr = 0.03 * lr_at(s, 1.0, warmup=2, total=steps)
        opt.step(tuple(ms.Tensor(g[p.name]) for p in params), lr)
        grads.append(g)
        lrs.append(lr)
    ref_p, ref_m, ref_v = numpy_adamw(init, grads, lrs, scales, decay)
    for p in params:
        np.testing.assert_allclose(p.asnumpy(), ref_p[p.name], rtol=2e-5, atol=1e-6, err_msg=p.name)
    state = opt.state_dict()
    assert state["t"] == steps
    for k in init:
        np.testing.assert_allclose(state["m"][k], ref_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(state["v"][k], ref_v[k], rtol=1e-5, atol=1e-9, err_msg=k)


def test_first_step_is_lr_times_sign_plus_decay():
    """Hand-worked: at t = 1 bias correction makes m_hat = g, v_hat = g^2, so the step is lr*(sign(g) + wd*p)."""
    p = ms.Parameter(ms.Tensor(np.array([2.0, -1.0, 0.5], np.float32)), name="w.weight")
    opt = AdamW([p], weight_decay=0.1, eps=0.0)
    opt.step((ms.Tensor(np.array([0.3, -4.0, 1e-3], np.float32)),), lr=0.5)
    # 2 - 0.5*(1 + 0.2) = 1.4; -1 - 0.5*(-1 - 0.1) = -0.45; 0.5 - 0.5*(1 + 0.05) = -0.025
    np.testing.assert_allclose(p.asnumpy(), [1.4, -0.45, -0.025], rtol=1e-5, atol=1e-6)


def test_zero_lr_scale_freezes_a_parameter():
    a = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="a.weight")
    b = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="b.weight")
    opt = AdamW([a, b], [0.0, 1.0])
    for _ in range(3):
        opt.step((ms.Tensor(np.ones(3, np.float32)), ms.Tensor(np.ones(3, np.float32))), lr=0.1)
    assert np.array_equal(a.asnumpy(), np.ones(3, np.float32))
    assert (b.asnumpy() < 1).all()


def test_state_round_trip_continues_identically():
    rng, init, params, _, opt = _setup(seed=3)
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in init.items()} for _ in range(4)]
    for g in grads[:2]:
        opt.step(tuple(ms.Tensor(g[p.name]) for p in params), 0.01)
    saved_state = opt.state_dict()
    saved_params = {p.name: p.asnumpy().copy() for p in params}
    for g in grads[2:]:
        opt.step(tuple(ms.Tensor(g[p.name]) for p in params), 0.01)

    twins = [ms.Parameter(ms.Tensor(saved_params[k]), name=k) for k in init]
    opt2 = AdamW(twins, opt.lr_scales, weight_decay=opt.weight_decay)
    opt2.load_state_dict(saved_state)
    assert opt2.t == 2
    for g in grads[2:]:
        opt2.step(tuple(ms.Tensor(g[p.name]) for p in twins), 0.01)
    for p, q in zip(params, twins):
        assert np.array_equal(p.asnumpy(), q.asnumpy()), p.name


def test_adamw_bad_inputs():
    p = ms.Parameter(ms.Tensor(np.zeros((2, 2), np.float32)), name="x.weight")
    with pytest.raises(ValueError, match="no parameters"):
        AdamW([])
    with pytest.raises(ValueError, match="2 lr_scales for 1 parameters"):
        AdamW([p], [1.0, 1.0])
    opt = AdamW([p])
    with pytest.raises(ValueError, match="2 gradients for 1 parameters"):
        opt.step((ms.Tensor(np.zeros((2, 2), np.float32)),) * 2, 0.1)
    with pytest.raises(ValueError, match=r"gradient of x\.weight has shape"):
        opt.step((ms.Tensor(np.zeros((2, 3), np.float32)),), 0.1)
    with pytest.raises(ValueError, match=r"no 'm' for \['x\.weight'\]"):
        opt.load_state_dict({"t": 1, "m": {}, "v": {"x.weight": np.zeros((2, 2))}})
    with pytest.raises(ValueError, match=r"optimizer v of x\.weight has shape \(3,\)"):
        opt.load_state_dict({"t": 1, "m": {"x.weight": np.zeros((2, 2))}, "v": {"x.weight": np.zeros(3)}})


@pytest.mark.parametrize("name, expected", [
    ("layers.0.attention.query.weight", False), ("layers.0.attention.key.bias", True),
    ("embeddings.norm.gamma", True), ("embeddings.norm.beta", True), ("layers.1.ffn.norm.x", True),
    ("embeddings.word", False), ("sparse_linear.weight", False), ("colbert_linear.bias", True),
])
def test_no_decay_names(name, expected):
    assert no_decay(name) is expected


def test_lr_at_hand_worked():
    # warm-up over 4 steps to 2.0 (0.5, 1, 1.5, 2), then linear decay over the 6 remaining steps to 0
    got = [lr_at(s, 2.0, warmup=4, total=10) for s in range(11)]
    expected = [0.5, 1.0, 1.5, 2.0, 2.0, 2.0 * 5 / 6, 2.0 * 4 / 6, 1.0, 2.0 * 2 / 6, 2.0 / 6, 0.0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert [lr_at(s, 1.0, warmup=0, total=4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_at(0, 3e-4, warmup=1, total=1) == pytest.approx(3e-4)
    assert lr_at(1, 3e-4, warmup=1, total=1) == 0.0
    assert lr_at(4, 1.0, warmup=4, total=4) == 0.0        # all warm-up: reaches 0 at total
    assert lr_at(3, 1.0, warmup=4, total=4) == 1.0


@pytest.mark.parametrize("step, warmup, total", [(-1, 0, 4), (5, 0, 4), (0, 0, 0), (0, -1, 4)])
def test_lr_at_rejects_bad_arguments(step, warmup, total):
    with pytest.raises(ValueError, match="need total >= 1"):
        lr_at(step, 1.0, warmup, total)


def test_clip_by_global_norm_against_numpy():
    rng = np.random.default_rng(7)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(3, 4), (5,), (2, 2, 2)]]
    norm_ref = math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrays))
    grads = tuple(ms.Tensor(a) for a in arrays)

    clipped, norm = clip_by_global_norm(grads, 1.5)
    assert norm == pytest.approx(norm_ref, rel=1e-6)
    assert norm_ref > 1.5
    for c, a in zip(clipped, arrays):
        np.testing.assert_allclose(c.asnumpy(), a * (1.5 / norm_ref), rtol=1e-5, atol=1e-7)
    after = math.sqrt(sum(float((c.asnumpy().astype(np.float64) ** 2).sum()) for c in clipped))
    assert after == pytest.approx(1.5, rel=1e-5)

    for max_norm in (norm_ref * 1.01, 0.0, -1.0):      # below the limit, or clipping disabled
        same, norm2 = clip_by_global_norm(grads, max_norm)
        assert norm2 == pytest.approx(norm_ref, rel=1e-6)
        for s, a in zip(same, arrays):
            assert np.array_equal(s.asnumpy(), a)


def test_clip_hand_worked_and_non_finite():
    (c1, c2), norm = clip_by_global_norm((ms.Tensor(np.array([3.0], np.float32)),
                                          ms.Tensor(np.array([[0.0, 4.0]], np.float32))), 2.5)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(c1.asnumpy(), [1.5], rtol=1e-6)
    np.testing.assert_allclose(c2.asnumpy(), [[0.0, 2.0]], rtol=1e-6)
    for bad in (np.nan, np.inf):
        with pytest.raises(FloatingPointError, match="NaN/inf"):
            clip_by_global_norm((ms.Tensor(np.array([1.0, bad], np.float32)),), 1.0)


def test_fused_cpu_step_equals_the_mindspore_step():
    """``clip_and_step`` on the fused CPU kernel (the trainer's path on CPU) against the MindSpore ops path
    (``clip_by_global_norm`` + ``step``, what runs on Ascend/GPU) over 4 steps, clipping active in some: the same
    parameters, moments and norms to float32 rounding."""
    sides = []
    for fused in (True, False):
        rng, init, params, _, opt = _setup(seed=5)
        if fused and not opt.fused:
            pytest.skip("fused CPU training kernels not available here")
        if not fused:
            opt.fused = False
            opt.m = [ms.ops.zeros(p.shape, p.dtype) for p in params]
            opt.v = [ms.ops.zeros(p.shape, p.dtype) for p in params]
        norms = [opt.clip_and_step(tuple(ms.Tensor(rng.normal(scale=s, size=v.shape).astype(np.float32))
                                         for v in init.values()), 1.0, 0.01)
                 for s in (0.1, 3.0, 0.2, 5.0)]
        state = opt.state_dict()
        sides.append((norms, {p.name: p.asnumpy().copy() for p in params}, state["m"], state["v"]))
    (n_f, p_f, m_f, v_f), (n_m, p_m, m_m, v_m) = sides
    assert max(n_f) > 1.0 > min(n_f)                       # the clip both applied and not
    np.testing.assert_allclose(n_f, n_m, rtol=1e-6)
    for k in p_m:
        np.testing.assert_allclose(p_f[k], p_m[k], rtol=1e-6, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(m_f[k], m_m[k], rtol=1e-5, atol=1e-9, err_msg=k)
        np.testing.assert_allclose(v_f[k], v_m[k], rtol=1e-5, atol=1e-12, err_msg=k)
