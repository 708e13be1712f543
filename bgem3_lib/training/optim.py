"""AdamW, the warm-up + linear-decay learning rate, and global-norm gradient clipping (MindSpore).

Our own small AdamW (decoupled weight decay, Loshchilov & Hutter; with Adam's bias correction) rather
than ``mindspore.nn.AdamWeightDecay``: its whole state is three named arrays per parameter and a step
counter, so a checkpoint can store it exactly and a resumed run continues bit-identically.

Per parameter ``p`` with gradient ``g`` at step ``t`` (1-based) and learning rate ``lr``::

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - lr * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p )

Weight decay is skipped for biases and LayerNorm parameters (``decay=False``).

On CPU with the fused kernels (``kernels.train.available()``) and float32 parameters, ``clip_and_step`` runs the
clipping norm (one BLAS dot per gradient) and the whole update (one pass per parameter into a new buffer that
the parameter takes over, ``m`` and ``v`` kept as NumPy arrays) outside MindSpore's per-op dispatch: with four trainable
layers (68 tensors) the MindSpore ops took 136 ms of a 1.46 s step. Same arithmetic, same order.

>>> [round(lr_at(s, 1.0, warmup=2, total=6), 3) for s in range(6)]
[0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
"""
from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of 0-based ``step``: linear warm-up over ``warmup`` steps to ``peak``, then
    linear decay reaching 0 at ``step = total``."""
    if total < 1 or warmup < 0 or not 0 <= step <= total:
        raise ValueError(f"need total >= 1, warmup >= 0 and 0 <= step <= total; got {step}, {warmup}, {total}")
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def no_decay(name: str) -> bool:
    """Biases and LayerNorm gains/shifts get no weight decay."""
    return name.endswith((".bias", ".beta", ".gamma")) or ".norm." in name


def clip_by_global_norm(grads: tuple, max_norm: float) -> tuple[tuple, float]:
    """Scale all gradients by ``min(1, max_norm / ||g||)``; returns (grads, norm before clipping)."""
    # ops.square, not ``** 2``: MindSpore's CPU Pow kernel is ~8x slower and off by an ulp on ~0.1% of values
    norm = float(ops.sqrt(sum(ops.square(g.astype(np.float32)).sum() for g in grads)).asnumpy())
    scale = clip_scale(norm, max_norm)
    if scale == 1.0:
        return tuple(grads), norm
    return tuple(g * scale for g in grads), norm


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor :func:`clip_by_global_norm` applies to every gradient: ``max_norm / (norm + 1e-6)`` when the
    global norm exceeds ``max_norm > 0``, else 1; raises ``FloatingPointError`` for a NaN/inf norm.

    >>> clip_scale(0.5, 1.0), round(clip_scale(4.0, 1.0), 6)
    (1.0, 0.25)
    """
    if not math.isfinite(norm):
        raise FloatingPointError(f"gradient norm is {norm}: the loss produced NaN/inf gradients")
    return 1.0 if max_norm <= 0 or norm <= max_norm else max_norm / (norm + 1e-6)


class AdamW:
    """AdamW over ``params`` (MindSpore Parameters); ``lr_scales[i]`` multiplies the step's learning
    rate for parameter ``i`` (e.g. 1 for heads, 0.01 for encoder layers)."""

    def __init__(self, params: list[Parameter], lr_scales: list[float] | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        if not params:
            raise ValueError("AdamW got no parameters to train (is everything frozen?)")
        self.params = list(params)
        self.lr_scales = list(lr_scales) if lr_scales is not None else [1.0] * len(self.params)
        if len(self.lr_scales) != len(self.params):
            raise ValueError(f"{len(self.lr_scales)} lr_scales for {len(self.params)} parameters")
        self.b1, self.b2 = (float(b) for b in betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.decay = [0.0 if no_decay(p.name) else self.weight_decay for p in self.params]
        self.t = 0
        self.fused = _fused_ready(self.params)
        zeros = (lambda p: np.zeros(p.shape, np.float32)) if self.fused else (lambda p: ops.zeros(p.shape, p.dtype))
        self.m = [zeros(p) for p in self.params]
        self.v = [zeros(p) for p in self.params]

    def clip_and_step(self, grads: tuple, max_norm: float, lr: float) -> float:
        """:func:`clip_by_global_norm` then :meth:`step`, fused on CPU (see the module docstring); returns the
        gradient norm before clipping."""
        if not self.fused:
            grads, norm = clip_by_global_norm(grads, max_norm)
            self.step(grads, lr)
            return norm
        arrays = [np.ascontiguousarray(g.asnumpy(), np.float32) for g in grads]
        norm = math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in arrays))
        self._fused_step(arrays, lr, clip_scale(norm, max_norm))
        return norm

    def step(self, grads: tuple, lr: float) -> None:
        if self.fused:
            self._fused_step([np.ascontiguousarray(g.asnumpy(), np.float32) for g in grads], lr, 1.0)
            return
        if len(grads) != len(self.params):
            raise ValueError(f"{len(grads)} gradients for {len(self.params)} parameters")
        self.t += 1
        c1, c2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        div = ops.RealDiv()        # the quotients of ``/``; MindSpore's CPU ``Div`` kernel is several times slower
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"gradient of {p.name} has shape {g.shape}, parameter {p.shape}")
            self.m[i] = self.m[i] * self.b1 + g * (1.0 - self.b1)
            self.v[i] = self.v[i] * self.b2 + (g * g) * (1.0 - self.b2)
            update = div(div(self.m[i], c1), ops.sqrt(div(self.v[i], c2)) + self.eps)
            if self.decay[i]:                               # adding p * 0 would change no bit of the step
                update = update + p * self.decay[i]
            p.set_data(p - update * (lr * self.lr_scales[i]))

    def _fused_step(self, grads: list, lr: float, gscale: float) -> None:
        from ..kernels import train as train_kernels
        if len(grads) != len(self.params):
            raise ValueError(f"{len(grads)} gradients for {len(self.params)} parameters")
        self.t += 1
        c1, c2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"gradient of {p.name} has shape {g.shape}, parameter {p.shape}")
            data = np.ascontiguousarray(p.asnumpy(), np.float32)
            new = train_kernels.adamw_step(data, g, self.m[i], self.v[i], gscale=gscale, b1=self.b1, b2=self.b2,
                                           c1=c1, c2=c2, eps=self.eps, decay=self.decay[i], lr=lr * self.lr_scales[i])
            p.set_data(Tensor.from_numpy(new))     # a new buffer, as set_data(p - update) gave: no view of p changes

    def state_dict(self) -> dict:
        """``{"t": int, "m": {name: array}, "v": {name: array}}`` (copies)."""
        def array(x):
            return np.array(x) if isinstance(x, np.ndarray) else x.asnumpy()
        return {"t": self.t,
                "m": {p.name: array(m) for p, m in zip(self.params, self.m)},
                "v": {p.name: array(v) for p, v in zip(self.params, self.v)}}

    def load_state_dict(self, state: dict) -> None:
        for key in ("m", "v"):
            missing = [p.name for p in self.params if p.name not in state[key]]
            if missing:
                raise ValueError(f"optimizer state has no {key!r} for {missing[:3]}")
        for i, p in enumerate(self.params):
            for key, store in (("m", self.m), ("v", self.v)):
                arr = np.asarray(state[key][p.name])
                if arr.shape != tuple(p.shape):
                    raise ValueError(f"optimizer {key} of {p.name} has shape {arr.shape}, expected {p.shape}")
                store[i] = np.array(arr, np.float32) if self.fused else Tensor(arr.astype(np.float32), p.dtype)
        self.t = int(state["t"])


def _fused_ready(params: list) -> bool:
    """True when :class:`AdamW` can run its fused CPU step: float32 parameters, the training kernels built."""
    if not all(p.dtype == ms.float32 for p in params):
        return False
    from ..kernels import train as train_kernels
    return train_kernels.available()
