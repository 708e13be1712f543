"""int8 linear layers for CPU inference: MindSpore ``ops.Custom`` (``func_type="aot"``) over ``int8_kernels.cc``.

Weights are quantised once, at load, per output channel and symmetrically (:func:`quantize_weight`:
``W[j] ~= scale[j] * q[j]``, ``q`` int8 in [-127, 127]) and packed for AVX-512 VNNI (:func:`pack_weight`).
Activations are quantised inside the kernel, per row (token), to uint8 with the row's own zero point
(``x[i] ~= s[i] * (u[i] - z[i])``); products accumulate exactly in int32 and are dequantised in float32:

    y[i, j] = s[i] * scale[j] * (sum_k u[i, k] q[j, k] - z[i] * sum_k q[j, k]) + b[j]

``attention_block`` / ``ffn_block`` are ``kernels.cpu``'s fused sub-layers with their four linear maps in int8;
softmax, GELU, residuals and layer norms stay float32; attention's two products run in bfloat16 with float32
accumulation where the CPU has AMX-BF16 or AVX512-BF16 (:func:`set_bf16_attention`), in float32 elsewhere.
A :class:`QuantLinear` holds one layer: the packed weights take a quarter of the float32 bytes. CPU only,
inference only; the library is compiled on first use by ``cpu.build_library``. The products run on AMX tiles
where the CPU has them and the OS grants them (:func:`uses_amx`), else on an AVX-512 VNNI micro-kernel, else in
a scalar loop: the same integers each time, so the same outputs. A NaN or inf in a kernel's input makes it
return 3 (MindSpore then raises ``RuntimeError: Return value ... is 3``); 2 means shapes that disagree with the
packed weights.

>>> layer = QuantLinear(np.eye(3, 5, dtype=np.float32), np.zeros(3, np.float32))
>>> layer.packed.shape, layer.nbytes()          # [ceil(N/64), ceil(K/4), 64 * 4] int8, + scale/sum/bias
((1, 2, 256), 548)
>>> x = Tensor(np.arange(10, dtype=np.float32).reshape(2, 5))                         # doctest: +SKIP
>>> layer(x).asnumpy().round(1)                                                      # doctest: +SKIP
array([[0., 1., 2.],
       [5., 6., 7.]], dtype=float32)
"""
from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from . import cpu

SOURCE = Path(__file__).with_name("int8_kernels.cc")
PANEL, KGROUP = 64, 4          # packed layout: panels of 64 output columns, 4 consecutive k per int32 lane
_state: dict = {}
cpu.register_block_cache(_state, "m3_int8_block_cache")


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] float -> (q int8 [N, K] in [-127, 127], scale float32 [N]) with ``|w - q * scale| <= scale / 2``
    per row (output channel); an all-zero row gets scale 0.

    >>> q, s = quantize_weight(np.array([[0.25, -1.0], [0.0, 0.0]], np.float32))
    >>> q.tolist(), (s * 127).round(6).tolist()
    ([[32, -127], [0, 0]], [1.0, 0.0])
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"quantize_weight takes a non-empty [N, K] matrix, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("quantize_weight: the weights contain NaN or inf")
    scale = (np.abs(w).max(axis=1).astype(np.float64) / 127).astype(np.float32)
    inv = np.divide(1.0, scale.astype(np.float64), out=np.zeros(len(scale)), where=scale > 0)
    q = np.empty(w.shape, np.int8)
    for i in range(0, len(w), 64):               # by blocks of rows: small float64 temporaries
        q[i:i + 64] = np.clip(np.rint(w[i:i + 64].astype(np.float64) * inv[i:i + 64, None]), -127, 127)
    return q, scale


def pack_weight(q: np.ndarray) -> np.ndarray:
    """q int8 [N, K] -> int8 [ceil(N/64), ceil(K/4), 256], zero padded: panel p, k-group g holds, for each of its
    64 columns c, q[64p + c, 4g:4g + 4] (what one VNNI ``vpdpbusd`` per 16 columns consumes).

    >>> pack_weight(np.arange(8, dtype=np.int8).reshape(2, 4))[0, 0, :10].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 0, 0]
    """
    n, k = q.shape
    panels, groups = -(-n // PANEL), -(-k // KGROUP)
    padded = np.zeros((panels * PANEL, groups * KGROUP), np.int8)
    padded[:n, :k] = q
    return np.ascontiguousarray(padded.reshape(panels, PANEL, groups, KGROUP).transpose(0, 2, 1, 3)
                                .reshape(panels, groups, PANEL * KGROUP))


class QuantLinear(nn.Cell):
    """A linear layer ``x [..., K] -> x @ W^T + b [..., N]`` holding W as packed int8 (no float32 copy).

    Parameters (not trained): ``packed`` int8 [ceil(N/64), ceil(K/4), 256], ``scale`` float32 [N], ``wsum``
    int32 [N] (sum_k q[j, k], the zero-point correction), ``bias`` float32 [N]."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        q, scale = quantize_weight(weight)
        bias = np.asarray(bias, np.float32)
        if bias.shape != (q.shape[0],) or not np.isfinite(bias).all():
            raise ValueError(f"bias must be finite with shape ({q.shape[0]},), got {bias.shape}")
        self.out_features, self.in_features = q.shape
        self.packed = Parameter(Tensor(pack_weight(q)), name="packed", requires_grad=False)
        self.scale = Parameter(Tensor(scale), name="scale", requires_grad=False)
        self.wsum = Parameter(Tensor(q.sum(axis=1, dtype=np.int32)), name="wsum", requires_grad=False)
        self.bias = Parameter(Tensor(bias), name="bias", requires_grad=False)

    @classmethod
    def from_dense(cls, dense) -> "QuantLinear":
        """Quantise an ``nn.Dense``-like cell (``weight`` [N, K], ``bias`` [N])."""
        return cls(dense.weight.asnumpy(), dense.bias.asnumpy())

    def nbytes(self) -> int:
        """Bytes held: packed weights plus the per-channel scale, sum and bias."""
        return sum(int(np.prod(p.shape)) * (1 if p.dtype == ms.int8 else 4) for p in self.get_parameters())

    def construct(self, x):
        return linear(x, self)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Quantising a model
    frees its float32 weights between the packed arrays it keeps: without this the process keeps the holes."""
    gc.collect()                                  # the replaced cells sit in reference cycles
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def call_kernel(name: str, arrays, out: np.ndarray, library: Path | None = None) -> int:
    """Run kernel ``name`` of the built library (or of ``library``) on C-contiguous NumPy ``arrays`` and ``out``
    through the aot ABI, without MindSpore (for tests and benchmarks); returns the kernel's code (0: success)."""
    arrays = [*arrays, out]
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError("call_kernel needs C-contiguous arrays")
    if library is None and not available():
        raise RuntimeError("the int8 CPU kernels are not available on this machine")
    n = len(arrays)
    shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
    fn = getattr(ctypes.CDLL(str(library or _state["lib"])), name)
    return fn(n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]), (ctypes.c_int * n)(*[a.ndim for a in arrays]),
              (ctypes.POINTER(ctypes.c_int64) * n)(*shapes), None, None, None)


def _device() -> str:
    return ms.get_context("device_target")


def available() -> bool:
    """True when the int8 kernels can run here: CPU device, the float32 kernels available (they run the heads
    and share the BLAS), and ``int8_kernels.cc`` built. Never raises."""
    if os.environ.get("BGEM3_CPU_KERNELS", "1") == "0" or _device() != "CPU" or not cpu.available():
        return False
    return cpu.library_built(_state, SOURCE, "int8 CPU kernels")


def _ask(function: str, arg: int) -> bool:
    """The built library's plain C switch ``function(arg)`` == 1 (False when the kernels are not available)."""
    return available() and getattr(ctypes.CDLL(str(_state["lib"])), function)(arg) == 1


def uses_vnni() -> bool:
    """True when the built library runs the AVX-512 VNNI micro-kernel (False: the scalar fallback)."""
    return available() and ctypes.CDLL(str(_state["lib"])).m3_int8_vnni() == 1


def set_amx(on: bool) -> bool:
    """Run products whose K is a multiple of 64 on the AMX tile unit (``on``, the default) or on AVX-512 VNNI;
    returns True when AMX now runs them (compiled in by ``-march=native`` and granted by the OS). Both compute
    the same integers, so outputs are bit-identical; the switch exists for tests and benchmarks."""
    return _ask("m3_int8_amx", int(bool(on)))


def uses_amx() -> bool:
    """True when the int8 products (K a multiple of 64) run on AMX here."""
    return _ask("m3_int8_amx", -1)


BF16_ATTENTION_PATHS = {0: None, 1: "amx", 2: "avx512_bf16"}


def set_bf16_attention(on: bool) -> str | None:
    """Compute the int8 path's attention (scores and context) in bfloat16 with float32 accumulation (``on``, the
    default wherever it can run) or in float32 as the float32 path does. Returns where bfloat16 attention now
    runs at head size 64: ``"amx"`` (AMX tiles, ``attention_bf16.h``; ``set_amx(False)`` moves it off them),
    ``"avx512_bf16"`` (AVX512-BF16 dot products, ``attention_dpbf16.h``: Zen 4/5, Cooper Lake) or None (float32).
    Both bfloat16 kernels round the same values (q / sqrt d, k, v, the softmax's unnormalised weights)."""
    return _bf16_attention(int(bool(on)))


def uses_bf16_attention() -> str | None:
    """Where the int8 path's attention runs in bfloat16 here (head size 64): ``"amx"``, ``"avx512_bf16"`` or None
    (float32); see :func:`set_bf16_attention`."""
    return _bf16_attention(-1)


def _bf16_attention(arg: int) -> str | None:
    if not available():
        return None
    return BF16_ATTENTION_PATHS[ctypes.CDLL(str(_state["lib"])).m3_int8_bf16_attention(arg)]


def _op(name: str, out_shape) -> ops.Custom:
    if _device() != "CPU":
        raise RuntimeError(f"the int8 kernels run on CPU only; MindSpore's device is {_device()}")
    return cpu.custom_op(_state, name, out_shape, available,
                         "the int8 CPU kernels are not available on this machine (see the warning)")


def _check(x: Tensor, k: int, what: str, ndim: int | None = None) -> None:
    if x.dtype != ms.float32:
        raise ValueError(f"{what}: x must be float32, got {x.dtype}")
    if (ndim is not None and x.ndim != ndim) or x.ndim < 1 or x.shape[-1] != k:
        shape = "[T, K]" if ndim == 2 else "[..., K]"
        raise ValueError(f"{what}: x has shape {tuple(x.shape)}, expected {shape} with K = {k}")


def _weights(layer: QuantLinear) -> tuple:
    return layer.packed, layer.scale, layer.wsum, layer.bias


def linear(x: Tensor, layer: QuantLinear) -> Tensor:
    """x [..., K] float32 -> x @ W^T + b [..., N] through the int8 kernel (error on NaN/inf in x)."""
    _check(x, layer.in_features, "int8 linear")
    f = _op("m3_int8_linear", lambda xs, ps, ss, *rest: list(xs[:-1]) + [ss[0]])
    return f(x, *_weights(layer))


def attention_block(x: Tensor, qkv: QuantLinear, out: QuantLinear, norm, offsets: Tensor, heads: Tensor,
                    eps: Tensor) -> Tensor:
    """``cpu.attention_block`` on packed tokens x [T, H] with int8 ``qkv`` [3H, H] and ``out`` [H, H] projections;
    ``norm`` has ``gamma`` / ``beta`` [H]."""
    _check(x, qkv.in_features, "int8 attention block", ndim=2)
    if qkv.out_features != 3 * qkv.in_features or (out.in_features, out.out_features) != (x.shape[1],) * 2:
        raise ValueError(f"int8 attention block: qkv must be [3H, H] and out [H, H] for H = {x.shape[1]}, got "
                         f"{[qkv.out_features, qkv.in_features]} and {[out.out_features, out.in_features]}")
    f = _op("m3_int8_attention_block", lambda xs, *s: xs)
    return f(x, *_weights(qkv), *_weights(out), norm.gamma, norm.beta, eps, offsets, heads)


def ffn_block(x: Tensor, inner: QuantLinear, outer: QuantLinear, norm, eps: Tensor) -> Tensor:
    """``cpu.ffn_block`` on packed tokens x [T, H] with int8 ``inner`` [F, H] and ``outer`` [H, F] linears."""
    _check(x, inner.in_features, "int8 FFN block", ndim=2)
    if (outer.in_features, outer.out_features) != (inner.out_features, inner.in_features):
        raise ValueError(f"int8 FFN block: outer must be [H, F] = {[inner.in_features, inner.out_features]}, "
                         f"got {[outer.out_features, outer.in_features]}")
    f = _op("m3_int8_ffn_block", lambda xs, *s: xs)
    return f(x, *_weights(inner), *_weights(outer), norm.gamma, norm.beta, eps)
