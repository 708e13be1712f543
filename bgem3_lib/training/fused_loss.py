"""The unified loss (:func:`~bgem3_lib.training.losses.m3_loss`) as one CPU op with its backward written out.

Why: on CPU, MindSpore runs each small op in 20-70 us (PyNative, synchronous dispatch). ``m3_loss`` on a training
batch's ``[B, N]`` score matrices is some fifty such ops forward and as many backward: 11.7 ms of an M3-small
heads-only step of ~90 ms (B = 10, N = 40, measured on a 2-core AMD EPYC), for arithmetic that takes
microseconds. Here the forward and the backward are two NumPy functions (float64 inside, float32 out), run
as MindSpore ``pyfunc`` custom ops, so the loss costs two op calls.

The formulas (``s_k``: the three modes' scores, ``tau``: the temperature, ``Y``: one-hot targets, rows
``b = 1..B``)::

    s_inter = w1 s_dense + w2 s_lex + w3 s_mul
    P_k = softmax(s_k / tau)                     (k = dense, lex, mul, inter; rows)
    nce_k = -mean_b log P_k[b, target_b]
    L = (l1 nce_dense + l2 nce_lex + l3 nce_mul + nce_inter) / 4
    distill_k = -mean_b sum_n T[b, n] log P_k[b, n]    with the teacher T = P_inter held constant
    L_distill = (l1 distill_dense + l2 distill_lex + l3 distill_mul) / 3
    total = (L + L_distill) / 2                  (L without self-distillation)

and their gradients: ``d nce_k / d s_k = (P_k - Y) / (tau B)``, ``d distill_k / d s_k = (P_k - T) / (tau B)``, and
``nce_inter`` reaches ``s_k`` through ``s_inter`` times ``w_k``.

>>> s = np.array([[[1.0, 0.0]]] * 3)                  # [3, B=1, N=2]: every mode scores [[1, 0]]
>>> parts, _ = loss_forward(s, np.array([0]), (1, 0.3, 1), 1.0, (1, 0.1, 1), True)
>>> round(float(parts[PARTS.index("total")]), 6)     # m3_loss's docstring example
0.235709
"""
from __future__ import annotations

import numpy as np

PARTS = ("dense", "lex", "mul", "inter", "L", "distill_dense", "distill_lex", "distill_mul", "L_distill", "total")
_MODES = ("s_dense", "s_lex", "s_mul")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def loss_forward(s: np.ndarray, target: np.ndarray, weights, tau: float, lambdas, self_distill: bool):
    """s ``[3, B, N]`` (dense, lex, mul scores), target ``[B]`` -> (parts ``[10]`` float64 in :data:`PARTS` order,
    the distillation parts 0 without self-distillation; ``logp [4, B, N]``, the log-softmaxes, for the
    backward). Raises ``ValueError`` naming the first mode with a NaN or infinite score."""
    if s.ndim != 3 or s.shape[0] != 3 or target.shape != (s.shape[1],):
        raise ValueError(f"need scores [3, B, N] and target [B], got {s.shape} and {target.shape}")
    for k, name in enumerate(_MODES):
        if not np.isfinite(s[k]).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if ((target < 0) | (target >= s.shape[2])).any():
        raise ValueError(f"target must lie in [0, {s.shape[2]}), got {target.tolist()}")
    w, lam = np.asarray(weights, np.float64), np.asarray(lambdas, np.float64)
    scores = np.concatenate([s, np.tensordot(w, s, axes=1)[None]]) / tau           # [4, B, N]
    logp = _log_softmax(scores)
    rows = np.arange(s.shape[1])
    parts = np.zeros(len(PARTS))
    parts[:4] = -logp[:, rows, target].mean(axis=1)
    parts[4] = (lam @ parts[:3] + parts[3]) / 4
    if self_distill:
        teacher = np.exp(logp[3])
        parts[5:8] = -(teacher[None] * logp[:3]).sum(axis=-1).mean(axis=-1)
        parts[8] = lam @ parts[5:8] / 3
        parts[9] = (parts[4] + parts[8]) / 2
    else:
        parts[9] = parts[4]
    return parts, logp


def loss_backward(logp: np.ndarray, target: np.ndarray, dparts: np.ndarray, weights, tau: float, lambdas,
                  self_distill: bool) -> np.ndarray:
    """The gradient ``[3, B, N]`` of ``sum_i dparts[i] * parts[i]`` with respect to the three modes' scores, from
    :func:`loss_forward`'s ``logp``. The teacher gets no gradient (held constant, as ``stop_gradient`` holds it).

    >>> s = np.array([[[1.0, 0.0]]] * 3)
    >>> _, logp = loss_forward(s, np.array([0]), (1, 0.3, 1), 1.0, (1, 0.1, 1), False)
    >>> dL = np.eye(len(PARTS))[PARTS.index("dense")]               # d nce_dense / d s_dense = P - Y
    >>> loss_backward(logp, np.array([0]), dL, (1, 0.3, 1), 1.0, (1, 0.1, 1), False)[0].round(6).tolist()
    [[-0.268941, 0.268941]]
    """
    w, lam = np.asarray(weights, np.float64), np.asarray(lambdas, np.float64)
    d = np.asarray(dparts, np.float64)
    b = logp.shape[1]
    probs = np.exp(logp)                                                    # [4, B, N]
    onehot = np.zeros(logp.shape[1:])
    onehot[np.arange(b), target] = 1.0
    c_l = d[4] + d[9] * (0.5 if self_distill else 1.0)                     # what reaches L
    c_nce = d[:3] + c_l * lam / 4                                           # each mode's nce
    c_inter = d[3] + c_l / 4
    grad = c_nce[:, None, None] * (probs[:3] - onehot) + (w * c_inter)[:, None, None] * (probs[3] - onehot)
    if self_distill:
        c_dis = d[5:8] + (d[8] + d[9] * 0.5) * lam / 3
        grad += c_dis[:, None, None] * (probs[:3] - probs[3][None])
    return grad / (tau * b)


_OPS: dict = {}


def _loss_op(weights, tau: float, lambdas, self_distill: bool):
    """The forward ``pyfunc`` op (with its backward) for one loss configuration, made once."""
    import mindspore as ms
    from mindspore import ops

    key = (tuple(map(float, weights)), float(tau), tuple(map(float, lambdas)), bool(self_distill))
    if key in _OPS:
        return _OPS[key]
    cfg = key

    def forward(s_dense, s_lex, s_mul, target):
        s = np.stack([s_dense, s_lex, s_mul]).astype(np.float64)
        return loss_forward(s, target.astype(np.int64), *cfg)[0].astype(np.float32)

    def backward(s_dense, s_lex, s_mul, target, dparts):      # recomputes logp (microseconds) rather than keep it
        s = np.stack([s_dense, s_lex, s_mul]).astype(np.float64)
        t = target.astype(np.int64)
        g = loss_backward(loss_forward(s, t, *cfg)[1], t, dparts, *cfg).astype(np.float32)
        return g[0], g[1], g[2]

    back = ops.Custom(backward, out_shape=lambda a, b, c, t, d: (a, a, a),
                      out_dtype=lambda *types: (ms.float32,) * 3, func_type="pyfunc")

    def bprop(s_dense, s_lex, s_mul, target, out, dout):
        g_dense, g_lex, g_mul = back(s_dense, s_lex, s_mul, target, dout)
        return g_dense, g_lex, g_mul, ops.zeros_like(target)

    _OPS[key] = ops.Custom(forward, out_shape=lambda a, b, c, t: [len(PARTS)], out_dtype=lambda *types: ms.float32,
                           func_type="pyfunc", bprop=bprop)
    return _OPS[key]


def fused_m3_loss(s_dense, s_lex, s_mul, target, weights, temperature: float, lambdas,
                  use_self_distill: bool = True) -> dict:
    """:func:`~bgem3_lib.training.losses.m3_loss` (same arguments, ``lambdas`` given) as one op forward and one
    backward, on the host (for CPU training): Tensors ``[B, N]`` float32 and target ``[B]`` int32 -> the same dict
    of 0-d Tensors (the distillation parts only with ``use_self_distill``)."""
    from mindspore import Tensor

    shapes = {tuple(x.shape) for x in (s_dense, s_lex, s_mul)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"the three modes' scores must share one [B, N] shape, got {sorted(shapes)}")
    if not isinstance(target, Tensor):
        target = Tensor(np.asarray(target, np.int32))
    parts = _loss_op(weights, temperature, lambdas, use_self_distill)(s_dense, s_lex, s_mul, target)
    parts.asnumpy()      # a pyfunc's exception (NaN scores, bad targets) surfaces when its output is read: read now
    keep = PARTS if use_self_distill else PARTS[:5] + PARTS[-1:]
    return {k: parts[PARTS.index(k)] for k in keep}
