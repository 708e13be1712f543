"""Unified fine-tuning losses of M3-Embedding (arXiv 2402.03216, Sec. 3.3), in MindSpore.

Pure functions, differentiable with ``mindspore.grad`` in PyNative mode (inputs are checked on the host,
so do not ``jit`` them). Inputs may be ``mindspore.Tensor`` or NumPy arrays.

Score layout: a batch has ``B`` queries and ``N = B * G`` passages, where passages ``i*G .. i*G+G-1``
are query ``i``'s positive (first) and its ``G - 1`` hard negatives. Scoring every query against every
passage gives ``[B, N]`` scores whose other groups act as in-batch negatives, and the positive of
query ``i`` sits in column ``i * G`` (:func:`in_batch_targets`).

Pieces (paper notation):

* ``s_dense = <e_q, e_p>``, ``s_lex = sum_{t in q & p} w_qt w_pt``, ``s_mul = mean_i max_j <E_q[i], E_p[j]>``;
* InfoNCE ``L_* = -log softmax(s_* / tau)[positive]`` (:func:`info_nce`);
* teacher ``s_inter = w1 s_dense + w2 s_lex + w3 s_mul`` (:func:`integrated_scores`);
* ``L'_* = -sum softmax(s_inter / tau) log softmax(s_* / tau)``, teacher fixed (:func:`self_distill_loss`);
* ``L = (l1 L_dense + l2 L_lex + l3 L_mul + L_inter) / 4``, ``L' = (l1 L'_dense + l2 L'_lex +
  l3 L'_mul) / 3``, ``L_final = (L + L') / 2`` (:func:`m3_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..retrieval.modes import TEACHER_WEIGHTS

_FLOATS = (ms.float16, ms.bfloat16, ms.float32, ms.float64)

VARIANT_LAMBDAS = {
    # The paper's final text (Sec. 3.3, fine-tuning stage) and FlagEmbedding 1.4.2 (m3/modeling.py) alike:
    # sparse terms weighted 0.1, dense and ColBERT 1.
    "paper": (1.0, 0.1, 1.0),
    # NOT in any version of the paper: lambda set to the teacher's weights w = (1, 0.3, 1). An ablation of
    # the choice of lambda, kept to show what it changes.
    "lambda=w": (1.0, 0.3, 1.0),
}


def _tensor(x, name: str, floating: bool = True, finite: bool = True) -> Tensor:
    """Convert to a Tensor and reject wrong dtypes and (``finite``) non-finite floats."""
    if not isinstance(x, Tensor):
        arr = np.asarray(x)
        if arr.dtype.kind not in "iubf":
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        if floating and arr.dtype.kind in "iub":
            arr = arr.astype(np.float32)
        x = Tensor(arr)
    if floating:
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if finite and not bool(ops.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    elif x.dtype in _FLOATS:
        raise TypeError(f"{name} must hold integer token ids or a boolean mask, got {x.dtype}")
    return x


def _shape(x: Tensor, name: str, ndim: int) -> tuple:
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _temperature(t: float) -> float:
    t = float(t)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {t}")
    return t


def _scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype (a bare Python float would be rounded to float32)."""
    return Tensor(value, dtype=like.dtype)


def _lowest(dtype) -> float:
    """Most negative finite value of a float dtype (fill for masked maxima)."""
    return float(np.finfo({ms.float64: np.float64, ms.float32: np.float32}.get(dtype, np.float16)).min)


def _log_softmax(x: Tensor) -> Tensor:
    """Row-wise log-softmax over the last axis, computed as ``z - log(sum(exp(z)))`` with ``z = x - max``.

    MindSpore 2.7's CPU ``ops.log_softmax`` is accurate only to ~1e-6 even in float64; the max shift
    does not change the result, hence it needs no gradient.
    """
    z = x - ops.stop_gradient(x.max(axis=-1, keepdims=True))
    return z - ops.log(ops.exp(z).sum(axis=-1, keepdims=True))


def in_batch_targets(batch_size: int, group_size: int) -> Tensor:
    """Column of each query's positive in ``[B, B*G]`` in-batch scores: ``[0, G, 2G, ...]`` (int32)."""
    if batch_size < 1 or group_size < 1:
        raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size}, {group_size}")
    return Tensor(np.arange(batch_size, dtype=np.int32) * group_size)


def dense_scores(q, p) -> Tensor:
    """Inner products ``q @ p.T``: q ``[B, H]``, p ``[N, H]`` -> ``[B, N]``.

    >>> dense_scores([[1.0, 0.0]], [[0.6, 0.8], [1.0, 0.0]]).asnumpy().tolist()
    [[0.6, 1.0]]
    """
    q, p = _tensor(q, "q"), _tensor(p, "p")
    (_, h), (_, h2) = _shape(q, "q", 2), _shape(p, "p", 2)
    if h != h2:
        raise ValueError(f"q and p hidden sizes differ: {h} vs {h2}")
    return ops.matmul(q, p.T)


def _unique_token_weights(weights: Tensor, ids: Tensor) -> Tensor:
    """Max-pool weights of repeated ids onto the id's first position, zero at later repeats.

    weights, ids ``[R, L]`` -> ``[R, L]``;
    e.g. ids ``[7, 9, 7]``, weights ``[.2, .5, .4]`` -> ``[.4, .5, 0]``.
    """
    length = ids.shape[1]
    same = ops.equal(ids[:, :, None], ids[:, None, :])  # [R, L, L]
    spread = ops.broadcast_to(weights[:, None, :], same.shape)
    pooled = ops.where(same, spread, ops.full_like(spread, _lowest(weights.dtype))).max(axis=-1)
    earlier = Tensor(np.tril(np.ones((length, length), dtype=bool), k=-1))  # [i, k] = k < i
    repeat = ops.logical_and(same, earlier[None]).any(axis=-1)
    return ops.where(repeat, ops.zeros_like(pooled), pooled)


def sparse_scores(q_w, q_ids, p_w, p_ids, chunk_size: int | None = None) -> Tensor:
    """Lexical matching ``s_lex[b, n] = sum over ids t shared by q_b and p_n of w_q(t) * w_p(t)``.

    q_w, q_ids ``[B, L]``; p_w, p_ids ``[N, M]`` -> ``[B, N]``. A token repeated within one text counts
    once with its largest weight (as in BGE-M3). Positions to ignore (padding, special tokens) must carry
    weight 0. No vocabulary-sized tensor is built: ids are compared through an equality mask
    ``[B, L, c, M]`` over chunks of ``c`` passages (``chunk_size``, default: about 4M mask entries).

    >>> sparse_scores([[0.5, 0.2]], [[7, 9]], [[0.4, 1.0, 0.3]], [[9, 3, 7]]).asnumpy().round(6).tolist()
    [[0.23]]

    (0.5 * 0.3 for id 7 plus 0.2 * 0.4 for id 9.)
    """
    q_w, p_w = _tensor(q_w, "q_w"), _tensor(p_w, "p_w")
    q_ids, p_ids = _tensor(q_ids, "q_ids", floating=False), _tensor(p_ids, "p_ids", floating=False)
    b, length = _shape(q_w, "q_w", 2)
    n, m = _shape(p_w, "p_w", 2)
    if tuple(q_ids.shape) != (b, length) or tuple(p_ids.shape) != (n, m):
        raise ValueError(
            f"weights and ids must have equal shapes: q {q_w.shape} vs {q_ids.shape}, "
            f"p {p_w.shape} vs {p_ids.shape}"
        )
    if bool((q_w < 0).any()) or bool((p_w < 0).any()):
        raise ValueError("lexical weights must be non-negative")
    q_u = _unique_token_weights(q_w, q_ids)
    p_u = _unique_token_weights(p_w, p_ids)
    chunk = chunk_size or max(1, (1 << 22) // max(1, b * length * m))
    parts = []
    for start in range(0, n, chunk):
        ids_c, w_c = p_ids[start : start + chunk], p_u[start : start + chunk]
        match = ops.equal(q_ids[:, :, None, None], ids_c[None, None]).astype(q_u.dtype)  # [B, L, c, M]
        per_q_token = (match * w_c[None, None]).sum(axis=-1)  # [B, L, c]
        parts.append((per_q_token * q_u[:, :, None]).sum(axis=1))  # [B, c]
    return ops.cat(parts, axis=1)


def colbert_scores(q, q_mask, p, p_mask) -> Tensor:
    """Multi-vector (late interaction) score: mean over valid query tokens of the max over valid
    passage tokens of the token dot products.

    q ``[B, n, H]``, q_mask ``[B, n]``; p ``[N, m, H]``, p_mask ``[N, m]`` (bool or 0/1) -> ``[B, N]``.

    >>> q = [[[1.0, 0.0], [0.0, 1.0]]]
    >>> p = [[[0.8, 0.6], [0.0, 1.0], [9.0, 9.0]]]
    >>> colbert_scores(q, [[1, 1]], p, [[1, 1, 0]]).asnumpy().round(6).tolist()
    [[0.9]]

    (Query token 1 matches best 0.8, token 2 matches 1.0; the masked [9, 9] row is ignored.)
    """
    q, p = _tensor(q, "q"), _tensor(p, "p")
    q_mask = _tensor(q_mask, "q_mask", floating=False).astype(ms.bool_)
    p_mask = _tensor(p_mask, "p_mask", floating=False).astype(ms.bool_)
    b, n, h = _shape(q, "q", 3)
    big_n, m, h2 = _shape(p, "p", 3)
    if h != h2:
        raise ValueError(f"q and p hidden sizes differ: {h} vs {h2}")
    if tuple(q_mask.shape) != (b, n) or tuple(p_mask.shape) != (big_n, m):
        raise ValueError(f"mask shapes {q_mask.shape}, {p_mask.shape} do not match q {q.shape}, p {p.shape}")
    if not bool(q_mask.any(axis=1).all()) or not bool(p_mask.any(axis=1).all()):
        raise ValueError("every query and passage needs at least one valid token in its mask")
    sim = ops.matmul(q.reshape(b * n, h), p.reshape(big_n * m, h).T).reshape(b, n, big_n, m)
    sim = ops.where(p_mask[None, None], sim, ops.full_like(sim, _lowest(sim.dtype)))
    best = sim.max(axis=-1)  # [B, n, N]
    weight = q_mask.astype(best.dtype)[:, :, None]
    return (best * weight).sum(axis=1) / weight.sum(axis=1)


def integrated_scores(s_dense, s_lex, s_mul, weights: Sequence[float] = TEACHER_WEIGHTS) -> Tensor:
    """Teacher scores ``s_inter = w1 * s_dense + w2 * s_lex + w3 * s_mul`` (all ``[B, N]``)."""
    return _integrated(_tensor(s_dense, "s_dense"), _tensor(s_lex, "s_lex"), _tensor(s_mul, "s_mul"), weights)


def _integrated(s_dense: Tensor, s_lex: Tensor, s_mul: Tensor, weights: Sequence[float]) -> Tensor:
    if not tuple(s_dense.shape) == tuple(s_lex.shape) == tuple(s_mul.shape):
        raise ValueError(f"score shapes differ: {s_dense.shape}, {s_lex.shape}, {s_mul.shape}")
    if len(weights) != 3:
        raise ValueError(f"weights must be (w_dense, w_lex, w_mul), got {weights}")
    w1, w2, w3 = (float(w) for w in weights)
    return _scalar(w1, s_dense) * s_dense + _scalar(w2, s_lex) * s_lex + _scalar(w3, s_mul) * s_mul


def info_nce(scores, target_idx, temperature: float = 0.02) -> Tensor:
    """InfoNCE: ``mean_b -log softmax(scores[b] / tau)[target_idx[b]]``.

    scores ``[B, G]`` (query vs positive, negatives and in-batch passages); target_idx ``[B]`` ints.

    >>> round(float(info_nce([[2.0, 0.0]], [0], temperature=1.0)), 6)  # log(1 + e^-2)
    0.126928
    """
    scores = _tensor(scores, "scores")
    target = Tensor(_targets(target_idx, scores)[:, None])
    return -ops.gather_elements(_log_softmax(scores / _scalar(_temperature(temperature), scores)), 1, target).mean()


def _targets(target_idx, scores: Tensor) -> np.ndarray:
    """``target_idx`` checked against non-empty ``scores [B, G]``: ``B`` integer indices in ``[0, G)``, as int32."""
    b, g = _shape(scores, "scores", 2)
    if b == 0 or g == 0:
        raise ValueError(f"scores must be non-empty, got shape {(b, g)}")
    target = np.asarray(target_idx.asnumpy() if isinstance(target_idx, Tensor) else target_idx)
    if target.shape != (b,) or target.dtype.kind not in "iu":
        raise ValueError(f"target_idx must be {b} integer indices, got shape {target.shape} ({target.dtype})")
    if target.min() < 0 or target.max() >= g:
        raise ValueError(f"target_idx must lie in [0, {g}), got {target.tolist()}")
    return target.astype(np.int32)


def self_distill_loss(student_scores, teacher_scores, temperature: float = 0.02) -> Tensor:
    """``mean_b -sum_j softmax(teacher / tau)[b, j] * log_softmax(student / tau)[b, j]``.

    Both ``[B, N]``. The teacher distribution is wrapped in ``stop_gradient``: only the student learns.

    >>> round(float(self_distill_loss([[0.0, 0.0]], [[5.0, 5.0]], temperature=1.0)), 6)  # log 2
    0.693147
    """
    student, teacher = _tensor(student_scores, "student_scores"), _tensor(teacher_scores, "teacher_scores")
    _shape(student, "student_scores", 2)
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"student {student.shape} and teacher {teacher.shape} shapes differ")
    tau = _scalar(_temperature(temperature), student)
    target = ops.stop_gradient(ops.softmax(teacher / tau, axis=-1))
    return -(target * _log_softmax(student / tau)).sum(axis=-1).mean()


def m3_loss(s_dense, s_lex, s_mul, target, weights: Sequence[float] = TEACHER_WEIGHTS, temperature: float = 0.02,
            variant: str = "paper", use_self_distill: bool = True, lambdas: Sequence[float] | None = None) -> dict:
    """Unified loss with self-knowledge distillation.

    Args:
        s_dense, s_lex, s_mul: ``[B, N]`` raw scores of the three modes (before the temperature).
        target: ``[B]`` column of each query's positive (see :func:`in_batch_targets`).
        weights: ``(w1, w2, w3)`` of the integrated teacher ``s_inter``.
        temperature: ``tau`` dividing every score (FlagEmbedding's default 0.02). FlagEmbedding divides
            each mode's scores by ``tau`` before summing them into the teacher; that is the same as
            ``s_inter / tau`` here.
        variant: ``"paper"`` (lambda = (1, 0.1, 1): the paper's Sec. 3.3 and FlagEmbedding 1.4.2) or
            ``"lambda=w"`` (lambda = the teacher's w = (1, 0.3, 1), used by no version of the paper);
            ``lambdas`` overrides either.
        use_self_distill: if False (ablation) the total is ``L`` alone.

    Returns ``{"dense", "lex", "mul", "inter", "L"}`` plus, with self-distillation,
    ``{"distill_dense", "distill_lex", "distill_mul", "L_distill"}``, and ``"total"``: 0-d Tensors,
    ``total = (L + L_distill) / 2`` or ``L``.

    Example (B = 1, two candidates, tau = 1, paper): every mode scores ``[[1, 0]]``, so each
    ``L_* = log(1 + e^-1) = 0.313262``; ``s_inter = [[2.3, 0]]`` gives ``L_inter = log(1 + e^-2.3) =
    0.095545``; ``L = (2.1 * 0.313262 + 0.095545) / 4 = 0.188349``; each ``L'_* = 0.908877 * 0.313262 +
    0.091123 * 1.313262 = 0.404385``, ``L' = 2.1 * 0.404385 / 3 = 0.283069``;
    total ``(L + L') / 2 = 0.235709``. (Computed as :func:`info_nce` and :func:`self_distill_loss` would, on
    the four score matrices stacked: a few kernels instead of a set per term, one host check.)

    >>> out = m3_loss([[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]], [0], temperature=1.0)
    >>> round(float(out["total"]), 6)
    0.235709
    """
    if variant not in VARIANT_LAMBDAS:
        raise ValueError(f"variant must be one of {sorted(VARIANT_LAMBDAS)}, got {variant!r}")
    lam = lambdas if lambdas is not None else VARIANT_LAMBDAS[variant]
    if len(lam) != 3:
        raise ValueError(f"lambdas must be (l_dense, l_lex, l_mul), got {lam}")
    modes = [_tensor(x, k, finite=False) for x, k in zip((s_dense, s_lex, s_mul), ("s_dense", "s_lex", "s_mul"))]
    s_inter = _integrated(*modes, weights)
    if len({x.dtype for x in modes}) > 1 or not bool(ops.isfinite(ops.stack(modes)).all()):   # one host sync
        integrated_scores(*modes, weights)                        # names the culprit
    target = Tensor(np.tile(_targets(target, s_inter)[None, :, None], (4, 1, 1)))
    tau = _scalar(_temperature(temperature), s_inter)
    logp = _log_softmax(ops.stack([*modes, s_inter]) / tau)                            # [4, B, N]
    nce = -ops.gather_elements(logp, 2, target).mean(axis=(1, 2))
    out = dict(zip(("dense", "lex", "mul", "inter"), nce))
    l1, l2, l3 = (_scalar(float(x), s_inter) for x in lam)
    out["L"] = (l1 * out["dense"] + l2 * out["lex"] + l3 * out["mul"] + out["inter"]) / 4
    if not use_self_distill:
        out["total"] = out["L"]
        return out
    teacher = ops.stop_gradient(ops.softmax(s_inter / tau, axis=-1))
    distill = -(teacher[None] * logp[:3]).sum(axis=-1).mean(axis=-1)
    out.update(dict(zip(("distill_dense", "distill_lex", "distill_mul"), distill)))
    out["L_distill"] = (l1 * out["distill_dense"] + l2 * out["distill_lex"] + l3 * out["distill_mul"]) / 3
    out["total"] = (out["L"] + out["L_distill"]) / 2
    return out
