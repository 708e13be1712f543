"""Differentiable fused CPU kernels for training one post-LN encoder layer (C++ in ``train_kernels.cc``).

Each sub-layer of ``encoder.Layer`` is one aot ``ops.Custom`` whose ``bprop`` is a second aot kernel returning
the gradients of x and of every parameter of the sub-layer at once. The parameters are op inputs, so
``mindspore.value_and_grad(f, grad_position, weights=params)`` (PyNative) gets their gradients. float32 only.

Tokens are packed, ``x [T, H]`` with sequence b in rows ``offsets[b]:offsets[b+1]`` (no padding, no mask; see
``cpu``). API (``offsets``: int32 [B+1], NumPy or Tensor, read on the host; ``eps``: float or [1] Tensor):

* ``attention_block_train(x, attention, offsets, heads, eps) -> [T, H]``: ``encoder.SelfAttention`` (query / key /
  value as three ``nn.Dense`` [H, H], or one fused ``qkv`` [3H, H]; ``out``; ``norm``);
* ``ffn_block_train(x, ffn, eps) -> [T, H]``: ``encoder.FeedForward`` with the exact (erf) GELU;
* ``layer_train(x, layer, offsets, heads, eps) -> [T, H]``: both, i.e. ``encoder.Layer``;
* ``Packing(mask)`` for a NumPy 0/1 mask [B, L]: ``.pack(x [B, L, H]) -> [T, H]``, ``.unpack(y [T, H]) -> [B, L, H]``
  (zeros at padding), ``.offsets``; both differentiable (``gather_rows``). For a stack of layers pack once, run
  ``layer_train`` per layer, unpack once (or pool from the packed rows);
* ``layer_train_padded(x [B, L, H], layer, mask, heads, eps) -> [B, L, H]``: pack, ``layer_train``, unpack;
  ``layers_train_padded(x, layers, mask, heads, eps)`` the same for a stack (packed once).

What each forward keeps for its backward stays in the library under a token (an input of both kernels; not
extra op outputs, whose gradients MindSpore would zero-fill), is read by the backward and then reused; per
layer at T tokens, F = 4H:

* attention: ``qkv [T, 3H]``, ``ctx [T, H]`` (attention output before W_o), ``probs [heads * sum_b n_b^2]``
  (softmax probabilities, per sequence and head a row-major [n_b, n_b]), ``xhat [T, H]`` (normalised pre-norm
  sum), ``rstd [T]`` (1 / sqrt(var + eps));
* feed-forward: ``dgelu [T, F]`` (GELU' at the GELU input), ``act [T, F]`` (the GELU output), ``xhat``, ``rstd``.

``begin_pass()`` gives back what forwards without a backward left (the trainer calls it per step);
``saved_count()`` counts what waits for a backward; ``free_saved()`` frees it all (at the end of training).
The heads: ``project_normalize_train`` (the ColBERT projection and its normalisation) and ``maxsim_train``
(MaxSim over passage spans).

At M3-small size (H 384, 12 heads) and 5,330 tokens in 40 texts of up to 512 that is about 56 MB of
probabilities and 115 MB of the rest per layer (the outputs y not counted). The products of tokens with a
weight (forward, and the backward's x gradients) run on AMX tiles as bfloat16 triples at float32 accuracy where
the CPU has AMX-BF16 (``gemm_bf16x3.h``, ``set_bf16x3``); the weight gradients and every product elsewhere go to
NumPy's OpenBLAS (single-threaded per OpenMP worker, the products split between the workers), bias / LayerNorm /
GELU / softmax gradients are fused row passes, and with AVX-512 and a head size that is a multiple of 16 the
per-head products use the register tiles of ``kernels_common.h`` (``BGEM3_ATTENTION_BLAS=1``: OpenBLAS).
``available()`` is False (use the plain cells) where ``cpu.available()`` is, or when the build fails.

>>> pack = Packing(mask)                                                           # doctest: +SKIP
>>> y = pack.unpack(layer_train(pack.pack(x), layer, pack.offsets, heads=12, eps=1e-5))  # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from . import cpu

SOURCE = Path(__file__).with_name("train_kernels.cc")
_state: dict = {}
cpu.register_block_cache(_state, "m3t_block_cache")


def available() -> bool:
    """True when the training kernels can run here (CPU device, library built); never raises."""
    return cpu.available() and cpu.library_built(_state, SOURCE, "fused CPU training kernels")


def set_bf16x3(on: bool, min_rows: int | None = None) -> bool:
    """The training kernels' token-by-weight products on AMX as bfloat16 triples (``on``, the default) or on the
    BLAS, for calls of at least ``min_rows`` tokens, like ``cpu.set_bf16x3`` for inference; returns True when
    such calls now run on AMX."""
    return available() and cpu.kernel_switch(_state["lib"], "m3t_bf16x3", int(bool(on)), min_rows)


def uses_bf16x3() -> bool:
    """True when the training kernels' token-by-weight products run on AMX (see ``set_bf16x3``)."""
    return available() and cpu.kernel_switch(_state["lib"], "m3t_bf16x3", -1, None)


def set_f32gemm(on: bool, min_rows: int | None = None) -> bool:
    """The training kernels' token-by-weight products and weight gradients on the package's AVX-512 kernel
    (``on``, the default) or on the BLAS, where AMX does not take them, like ``cpu.set_f32gemm``; returns True
    when they now run there."""
    return available() and cpu.kernel_switch(_state["lib"], "m3t_f32gemm", int(bool(on)), min_rows)


def f32gemm_calls() -> int:
    """The training library's count of AVX-512 float32 kernel calls (``cpu.f32gemm_calls``); 0 without it."""
    return int(_c_function("m3t_f32gemm_calls", ctypes.c_int64)()) if available() else 0


def _op(name: str, out_shape, outputs: int, bprop=None, key=None, dtypes=None) -> ops.Custom:
    """Kernel ``name`` as an aot ``ops.Custom`` with ``outputs`` outputs (float32 unless ``dtypes`` lists them),
    made once per ``key`` (``cpu.custom_op``)."""
    return cpu.custom_op(_state, name, out_shape, available,
                         "fused CPU training kernels are not available on this machine", outputs=outputs,
                         dtypes=dtypes, bprop=bprop, key=key)


def _zeros(*tensors):
    return tuple(ops.zeros_like(t) for t in tensors)


def _token() -> Tensor:
    """A new key for what one forward call saves for its backward (kept in the library, see train_kernels.cc's
    SavedStore: as extra op outputs, each would get a zero-filled gradient from MindSpore's autograd)."""
    _state["token"] = _state.get("token", 0) + 1
    return Tensor(np.array([_state["token"]], np.int64))


def _c_function(name: str, restype=None, argtypes=None):
    """Plain C function ``name`` of the built library (ctypes, not the aot ABI), looked up once."""
    key = ("c", name)
    if key not in _state:
        fn = getattr(ctypes.CDLL(str(_state["lib"])), name)
        fn.restype = restype
        if argtypes is not None:
            fn.argtypes = argtypes
        _state[key] = fn
    return _state[key]


def _drain() -> None:
    """Wait for every op MindSpore has queued (PyNative). ``mindspore.runtime.synchronize`` is for devices: on CPU it
    waits for nothing and logs "[ERROR] CPU device is not supported" (once per training step, from begin_pass)."""
    from mindspore.common.api import _pynative_executor
    _pynative_executor.sync()


def begin_pass() -> None:
    """Give back the saved buffers of forwards whose backward never ran (e.g. a forward without gradients); call
    before a training pass. Their memory is kept for reuse; a backward of an earlier forward then fails."""
    if available():
        _drain()                           # no queued kernel of an earlier pass still to read its buffer
        _c_function("m3t_saved_release_all")()


def free_saved() -> None:
    """Free every saved buffer, spare ones included (the memory kept for reuse between training steps: about
    170 MB per trained M3-small layer at 5,330 tokens); the trainer calls it when training ends. Builds nothing:
    a no-op when the library was never loaded."""
    if _state.get("lib"):
        _drain()
        _c_function("m3t_saved_clear")()


def saved_count() -> int:
    """Forwards whose saved buffers wait for their backward (0 after a complete forward + backward)."""
    if not available():
        return 0
    _drain()
    return int(_c_function("m3t_saved_live", ctypes.c_int64)())


def _attention_bprop(*args):
    inputs, dout = args[:-2], args[-1]
    x, proj, (wo, _, gamma, _, eps, offsets, heads, token) = inputs[0], inputs[1:-8], inputs[-8:]
    h = lambda xs: [xs[1]]  # noqa: E731
    bwd = _op("m3t_attention_bwd",
              lambda dy, xs, *s: (dy, *s[:-5], s[-5], h(xs), h(xs), h(xs), dy, [xs[0], 3 * xs[1]]),
              7 + len(proj), key=("m3t_attention_bwd", len(proj)))
    grads = bwd(dout, x, *proj, wo, gamma, token, offsets, heads)[:-2]          # less work space
    return (*grads, *_zeros(eps, offsets, heads, token))


def _ffn_bprop(x, w1, b1, w2, b2, gamma, beta, eps, token, out, dout):
    bwd = _op("m3t_ffn_bwd", lambda dy, xs, w1s, w2s, g, t: (dy, w1s, [w1s[0]], w2s, [w2s[0]], g, g, [dy[0], w1s[0]],
                                                               dy), 9)
    return (*bwd(dout, x, w1, w2, gamma, token)[:-2], *_zeros(eps, token))  # less work space


def _scalar(value) -> Tensor:
    return value if isinstance(value, Tensor) else cpu.scalar(float(value))


def _projections(attention) -> list:
    """The query / key / value weights and biases: fused ``qkv`` [3H, H] or three ``query`` / ``key`` / ``value``."""
    dense = [attention.qkv] if hasattr(attention, "qkv") else [attention.query, attention.key, attention.value]
    return [t for d in dense for t in (d.weight, d.bias)]


def attention_block_train(x: Tensor, attention, offsets, heads: int, eps) -> Tensor:
    """``encoder.SelfAttention`` on packed tokens x [T, H] -> [T, H], differentiable in x and the cell's parameters
    (query / key / value or fused qkv, out, norm). ``offsets``: int32 [B+1] (NumPy or Tensor; read on the host)."""
    off = offsets.asnumpy() if isinstance(offsets, Tensor) else np.asarray(offsets)
    # The number of heads travels as the length of a placeholder input (the backward's output shapes must follow
    # from its input shapes, which MindSpore caches inferred shapes by).
    head_count = Tensor(np.zeros(heads, np.int32))
    fwd = _op("m3t_attention_fwd", lambda xs, *s: xs, 1, bprop=_attention_bprop)
    return fwd(x, *_projections(attention), attention.out.weight, attention.out.bias, attention.norm.gamma,
               attention.norm.beta, _scalar(eps), Tensor(off.astype(np.int32)), head_count, _token())


def ffn_block_train(x: Tensor, ffn, eps) -> Tensor:
    """``encoder.FeedForward`` (erf GELU) on x [T, H] -> [T, H], differentiable in x and the six parameters."""
    fwd = _op("m3t_ffn_fwd", lambda xs, *s: xs, 1, bprop=_ffn_bprop)
    return fwd(x, ffn.inner.weight, ffn.inner.bias, ffn.outer.weight, ffn.outer.bias, ffn.norm.gamma,
               ffn.norm.beta, _scalar(eps), _token())


def layer_train(x: Tensor, layer, offsets, heads: int, eps) -> Tensor:
    """``encoder.Layer`` on packed tokens x [T, H] -> [T, H] (both sub-layers, 16 parameters)."""
    eps = _scalar(eps)
    return ffn_block_train(attention_block_train(x, layer.attention, offsets, heads, eps), layer.ffn, eps)


def _gather_bprop(x, idx, out, dout):
    scatter = _op("m3t_scatter_rows", lambda dy, i, xs: xs, 1)
    return scatter(dout, idx, x), ops.zeros_like(idx)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [R, H], idx int32 [N] -> [N, H] with row i = x[idx[i]], zeros where idx[i] < 0; differentiable in x
    (idx's non-negative entries must be distinct)."""
    return _op("m3t_gather_rows", lambda xs, i: [i[0], xs[1]], 1, bprop=_gather_bprop)(x, idx)


class Packing:
    """Packed layout of a padded batch: ``Packing(mask)`` for a NumPy 0/1 mask [B, L] (attended tokens first in
    each row or anywhere: rows are taken in order). ``pack(x [B, L, H]) -> [T, H]``, ``unpack(y [T, H]) ->
    [B, L, H]`` (zeros at padding), ``offsets`` int32 [B+1] for the kernels."""

    def __init__(self, mask: np.ndarray):
        mask = np.asarray(mask).astype(bool)
        self.shape = mask.shape
        rows = np.flatnonzero(mask)
        inverse = np.full(mask.size, -1, np.int32)
        inverse[rows] = np.arange(rows.size, dtype=np.int32)
        self.rows, self.inverse = Tensor(rows.astype(np.int32)), Tensor(inverse)
        self.offsets = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)

    def pack(self, x: Tensor) -> Tensor:
        return gather_rows(x.reshape(-1, x.shape[-1]), self.rows)

    def unpack(self, y: Tensor) -> Tensor:
        return gather_rows(y, self.inverse).reshape(*self.shape, y.shape[-1])


def layer_train_padded(x: Tensor, layer, mask: np.ndarray, heads: int, eps) -> Tensor:
    """``encoder.Layer`` on a padded batch x [B, L, H] with NumPy mask [B, L] -> [B, L, H], zeros at padding
    (where ``encoder.Layer`` returns values no loss should use). For a stack, pack once and unpack once."""
    begin_pass()
    p = Packing(mask)
    return p.unpack(layer_train(p.pack(x), layer, p.offsets, heads, eps))


def layers_train_padded(x: Tensor, layers, mask: np.ndarray, heads: int, eps) -> Tensor:
    """``encoder.Layer``s one after the other on a padded batch x [B, L, H] (packed once, unpacked once)."""
    begin_pass()
    p, eps = Packing(mask), _scalar(eps)
    y = p.pack(x)
    for layer in layers:
        y = layer_train(y, layer, p.offsets, heads, eps)
    return p.unpack(y)


def _project_bprop(x, weight, bias, eps, want, out, dout):
    bwd = _op("m3t_project_bwd", lambda g, xs, ws, *s: (xs, ws, [ws[0]], g), 4)
    dx, dw, db, _ = bwd(dout[0], x, weight, out[0], out[1], eps, want)      # less work space
    return dx, dw, db, *_zeros(eps, want)


def project_normalize_train(x: Tensor, weight: Tensor, bias: Tensor, eps: float, input_grad: bool = True):
    """The ColBERT head on packed tokens: ``z = x weight^T + bias`` (x [T, H], weight [D, H], bias [D]), each row
    divided by ``max(||z||, eps)`` -> ``(y [T, D], ||z|| [T, 1])``, differentiable in x (zeros unless
    ``input_grad``), weight and bias (:class:`~bgem3_lib.training.batch_scores.ProjectNormalize`'s numbers)."""
    fwd = _op("m3t_project_fwd", lambda xs, ws, *s: ([xs[0], ws[0]], [xs[0], 1]), 2, bprop=_project_bprop)
    return fwd(x, weight, bias, _scalar(eps), Tensor(np.array([int(bool(input_grad))], np.int32)))


def _maxsim_bprop(q, p, spans, out, dout):
    bwd = _op("m3t_maxsim_bwd", lambda db, qs, ps, *s: (qs, ps), 2)
    dq, dp = bwd(dout[0], q, p, out[1], spans)
    return dq, dp, ops.zeros_like(spans)


def maxsim_train(q: Tensor, p: Tensor, spans: Tensor) -> Tensor:
    """MaxSim on packed tokens: q [Tq, D], p [T, D], spans int32 [N, 2] (each passage's first packed row and row
    count; disjoint) -> best [Tq, N], ``best[r, j] = max_k <q_r, p_k>`` over passage j's rows. The gradient reaches
    q and p at the (first) arg-max rows, as :class:`~bgem3_lib.training.batch_scores.MaxSim`'s does."""
    fwd = _op("m3t_maxsim_fwd", lambda qs, ps, ss: ([qs[0], ss[0]], [qs[0], ss[0]]), 2, bprop=_maxsim_bprop,
              dtypes=(ms.float32, ms.int32))
    return fwd(q, p, spans)[0]


def widen_half(a: np.ndarray) -> np.ndarray:
    """``a`` (float16, any shape) as a new float32 array, exactly, in one vectorised pass (F16C / AVX-512 where
    the kernels run; else NumPy's cast, several times slower).

    >>> widen_half(np.array([[1.5, -0.0], [6.1e-5, 65504.0]], np.float16)).tolist()
    [[1.5, -0.0], [6.097555160522461e-05, 65504.0]]
    """
    a = np.asarray(a)
    if a.dtype != np.float16:
        raise ValueError(f"widen_half takes float16, got {a.dtype}")
    if not available():
        return a.astype(np.float32)
    a = a if a.flags.c_contiguous else a.copy(order="C")          # (ascontiguousarray would make 0-d 1-d)
    out = np.empty(a.shape, np.float32)
    _c_function("m3t_half_to_float", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64])(
        a.ctypes.data, out.ctypes.data, a.size)
    return out


def adamw_step(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, *, gscale: float, b1: float, b2: float,
               c1: float, c2: float, eps: float, decay: float, lr: float) -> np.ndarray:
    """One AdamW step on float32 C-contiguous arrays of one shape: returns the new parameter (a new array; ``m``
    and ``v`` are updated in place), the arithmetic of ``training.optim.AdamW.step`` on the gradient ``g * gscale``,
    in one pass (OpenMP).

    At step 1 (c1 = 1 - 0.9, c2 = 1 - 0.999) the update is g / |g| = 1 per value, times lr:

    >>> p, g = np.ones(3, np.float32), np.full(3, 0.5, np.float32)
    >>> m, v = np.zeros(3, np.float32), np.zeros(3, np.float32)
    >>> new = adamw_step(p, g, m, v, gscale=1.0, b1=0.9, b2=0.999, c1=0.1, c2=1e-3, eps=1e-8, decay=0.0, lr=0.1)
    >>> new.round(5), m.round(5)
    (array([0.9, 0.9, 0.9], dtype=float32), array([0.05, 0.05, 0.05], dtype=float32))
    """
    arrays = (p, g, m, v)
    if not all(a.dtype == np.float32 and a.flags.c_contiguous and a.shape == p.shape for a in arrays):
        raise ValueError("adamw_step needs float32 C-contiguous arrays of one shape")
    if not (m.flags.writeable and v.flags.writeable):
        raise ValueError("adamw_step updates m and v in place: they must be writeable")
    if not available():
        raise RuntimeError("fused CPU training kernels are not available on this machine")
    adamw = _c_function("m3t_adamw", None, [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_float] * 10)
    out = np.empty_like(p)
    adamw(p.ctypes.data, out.ctypes.data, g.ctypes.data, m.ctypes.data, v.ctypes.data, p.size, gscale,
                    b1, 1.0 - b1, b2, 1.0 - b2, c1, c2, eps, decay, lr)
    return out
