"""Fused CPU kernels for inference: MindSpore ``ops.Custom`` (``func_type="aot"``) over ``cpu_kernels.cc``.

Why: on CPU, MindSpore 2.7's own kernels are several times slower than PyTorch's on the same tensors
(measured on a 2-core EPYC: matmul ~2x, exact GELU ~20x, batched attention matmul ~3x, softmax ~2x;
``benchmarks/encode.py`` re-measures the matmul), and NumPy's OpenBLAS matmul is the fastest here.
These kernels run one transformer sub-layer per call on *packed* tokens ``x [T, H]`` (padding
removed, sequence ``b`` in rows ``offsets[b]:offsets[b+1]``), compute the linear layers on AMX tiles at
float32 accuracy where the CPU has AMX-BF16 (``gemm_bf16x3.h``, ``set_bf16x3``), in the package's own AVX-512
float32 kernel elsewhere with AVX-512 (``gemm_f32.h``, ``set_f32gemm``: it does not depend on the kernel OpenBLAS
picks, which ``OPENBLAS_CORETYPE=Haswell`` holds at AVX2 on some machines) and with NumPy's OpenBLAS on the
rest (and for calls under 64 rows), run attention on AMX tiles at float32 accuracy where the CPU has AMX-BF16 and
the head size is a multiple of 32 (``attention_bf16x3.h``, ``set_bf16x3_attention``), else in an AVX-512
register-tiled kernel where the CPU has it and the head size is a multiple of 16 (OpenBLAS otherwise, or with
``BGEM3_ATTENTION_BLAS=1``), and fuse bias, GELU,
softmax, residual and layer norm into single passes.

The C++ source is compiled with ``g++`` on first use into ``cache_dir()/kernels`` (keyed by a hash
of source, compiler flags, BLAS and CPU), so nothing binary lives in the repository. Inference
only (no gradients); ``available()`` is False — and callers use plain MindSpore ops — when the
device is not CPU, ``g++`` or an OpenBLAS is missing, the build fails, or ``BGEM3_CPU_KERNELS=0``.

>>> import numpy as np                                                     # doctest: +SKIP
>>> x = Tensor(np.ones((3, 4), np.float32))                                # doctest: +SKIP
>>> linear(x, Tensor(np.eye(4, dtype=np.float32)), Tensor(np.zeros(4, np.float32))).shape  # doctest: +SKIP
(3, 4)
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..paths import cache_dir
from .blas_check import blas_report, cpu_signature, find_blas

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
_state: dict = {}
_block_caches: list[tuple[dict, str]] = [(_state, "m3_block_cache")]   # register_block_cache


def sources_digest() -> str:
    """A short digest of every kernel source and header in this package and of this CPU's flags: what the
    kernels' outputs depend on beyond their inputs (a key for caches of kernel results)."""
    files = sorted([*SOURCE.parent.glob("*.cc"), *SOURCE.parent.glob("*.h")])
    h = hashlib.sha256(cpu_signature().encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build_library(source: Path = SOURCE, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (default ``cpu_kernels.cc``; once per source, the ``*.h`` beside it, flags, BLAS and
    CPU) with ``FLAGS`` and ``extra_flags`` and return the shared library's path."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    blas = find_blas()
    if blas is None:
        raise RuntimeError("no OpenBLAS library found next to numpy/scipy")
    defines = [f'-DBGEM3_BLAS_LIB="{blas["lib"]}"', f'-DBGEM3_SGEMM="{blas["sgemm"]}"',
               f'-DBGEM3_SET_THREADS="{blas["set_threads"]}"', f'-DBGEM3_GET_THREADS="{blas["get_threads"]}"',
               f'-DBGEM3_BLAS_INT={blas["int_type"]}']
    flags = [*FLAGS, *extra_flags]
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256("\n".join([source.read_text(), *headers, compiler, *flags, *defines,
                                    cpu_signature()]).encode())
    out = cache_dir() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [compiler, *flags, *defines, str(source), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {source.name} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)                      # atomic: concurrent builders never see half a file
    if ctypes.CDLL(str(out)).m3_blas_ready() != 0:
        raise RuntimeError(f"{out.name}: BLAS symbols did not resolve in {blas['lib']}")
    return out


def available() -> bool:
    """True when the fused kernels can run here (CPU device, library built); never raises."""
    if os.environ.get("BGEM3_CPU_KERNELS", "1") == "0" or ms.get_context("device_target") != "CPU":
        return False
    if "lib" not in _state:
        try:
            _state["lib"] = build_library()
            choose_f32gemm(_state["lib"])
        except (RuntimeError, OSError) as exc:
            warnings.warn(f"fast CPU kernels unavailable, using plain MindSpore ops: {exc}", stacklevel=2)
            _state["lib"] = None
    return _state["lib"] is not None


def f32gemm_by_default() -> bool:
    """Whether the float32 products go to the package's AVX-512 kernel (``gemm_f32.h``) rather than the BLAS when
    nobody chose (``BGEM3_F32GEMM`` unset): where the BLAS runs vectors narrower than the CPU's
    (``blas_check.narrow_kernel_note``), e.g. OpenBLAS pinned to Haswell on an AVX-512 CPU. There the kernel
    measured 1.08-2.05x the BLAS on the encoder's shapes and 1.56-1.60x on M3-small encodes (AMD EPYC Zen 5,
    ``benchmarks/results/f32_gemm.md``); against OpenBLAS's own AVX-512 kernel it measured 0.95-1.15x on the
    products at 1024-2048 rows but 0.96-1.04x on M3-small encodes, so the BLAS keeps those machines."""
    return blas_report()["note"] is not None


PACKED_ONLY = 2     # gemm_f32.h's kPackedOnly: the AVX-512 kernel only for weights packed ahead (kernels/packed.py)


def choose_f32gemm(lib: Path) -> None:
    """Set the AVX-512 float32 kernel's switch in a freshly built library (``m3_f32gemm`` or ``m3t_f32gemm``):
    ``BGEM3_F32GEMM=0`` / ``=1`` force it off / on; unset, on where :func:`f32gemm_by_default`, else on only for
    weights packed ahead (``PACKED_ONLY``: with the packing skipped it beats the BLAS, ``kernels/packed.py``)."""
    handle = ctypes.CDLL(str(lib))
    names = [name for name in ("m3_f32gemm", "m3t_f32gemm") if hasattr(handle, name)]
    if names:
        choice = os.environ.get("BGEM3_F32GEMM")
        on = int(choice != "0") if choice is not None else 1 if f32gemm_by_default() else PACKED_ONLY
        for name in names:
            kernel_switch(lib, name, on, None)


def kernel_switch(lib: Path | None, function: str, on: int, min_rows: int | None) -> bool:
    """Call one of the library's product-path switches ``function(on, min_rows)`` (AMX ``m3_bf16x3``, AVX-512
    ``m3_f32gemm``, and the ``m3t_`` ones of ``train``; ``on`` -1: ask; ``min_rows`` None: keep); False when the
    library is missing."""
    if lib is None:
        return False
    fn = getattr(ctypes.CDLL(str(lib)), function)
    fn.argtypes = [ctypes.c_int, ctypes.c_int64]
    return fn(on, -1 if min_rows is None else int(min_rows)) == 1


def set_bf16x3(on: bool, min_rows: int | None = None) -> bool:
    """Compute the linear layers' float32 products on the AMX tile unit, each operand split into three bfloat16
    parts (``on``, the default; ``gemm_bf16x3.h``), or on the BLAS, for calls of at least ``min_rows`` token rows
    (default 64: below that, splitting the weights per call costs what the tiles save); returns True when such
    calls now run on AMX (this build and CPU have AMX-BF16 and the OS granted the tiles)."""
    return available() and kernel_switch(_state["lib"], "m3_bf16x3", int(bool(on)), min_rows)


def uses_bf16x3() -> bool:
    """True when the linear layers' products run on AMX as bfloat16 triples (see ``set_bf16x3``)."""
    return available() and kernel_switch(_state["lib"], "m3_bf16x3", -1, None)


def set_bf16x3_attention(on: bool, min_rows: int | None = None) -> bool:
    """Compute attention's two products (scores, context) on the AMX tile unit at float32 accuracy, every operand
    split into three bfloat16 parts, with the softmax online over blocks of 128 keys (``on``, the default;
    ``attention_bf16x3.h``), or in the AVX-512 register-tiled kernel / OpenBLAS (False), for calls of at least
    ``min_rows`` token rows (default 1) whose head size is a multiple of 32; returns True when such calls now run
    on AMX (this build and CPU have AMX-BF16, the OS granted the tiles, ``BGEM3_ATTENTION_BLAS`` is not 1)."""
    return available() and kernel_switch(_state["lib"], "m3_bf16x3_attention", int(bool(on)), min_rows)


def uses_bf16x3_attention() -> bool:
    """True when attention runs on AMX as bfloat16 triples (see ``set_bf16x3_attention``)."""
    return available() and kernel_switch(_state["lib"], "m3_bf16x3_attention", -1, None)


def set_f32gemm(on: bool | str, min_rows: int | None = None) -> bool:
    """Compute the linear layers' float32 products with the package's own AVX-512 kernel (``on``; ``gemm_f32.h``:
    weights packed per call or ahead, 12 x 32 register blocks), or on the BLAS (False), or on the kernel only where
    the weights were packed ahead (``"packed"``, ``kernels/packed.py``), for calls of at least ``min_rows`` token
    rows (default 64) that AMX does not take; returns True when calls of unpacked weights now run there (this build
    has AVX-512). Independent of the BLAS's own CPU detection (``OPENBLAS_CORETYPE``); the default when the
    library loads is :func:`choose_f32gemm`'s."""
    if on not in (True, False, "packed"):
        raise ValueError(f"on must be True, False or 'packed', got {on!r}")
    state = PACKED_ONLY if on == "packed" else int(on)
    return available() and kernel_switch(_state["lib"], "m3_f32gemm", state, min_rows)


def set_f32gemm_whole_k(k: int | None = None) -> int:
    """Up to which k the AVX-512 kernel takes all of k in one block (default 1024; past it, blocks of 256);
    ``None``: only ask. Returns the value in force (0 without the library). For tests and benchmarks."""
    if not available():
        return 0
    fn = ctypes.CDLL(str(_state["lib"])).m3_f32gemm_whole_k
    fn.argtypes, fn.restype = [ctypes.c_int64], ctypes.c_int64
    return int(fn(-1 if k is None else int(k)))


def f32gemm_state() -> int:
    """The AVX-512 float32 kernel's switch: 0 off (or not built), 1 on, ``PACKED_ONLY`` on for packed weights."""
    return int(ctypes.CDLL(str(_state["lib"])).m3_f32gemm_wanted()) if available() else 0


def f32gemm_calls() -> int:
    """How many worker shares of a product the AVX-512 float32 kernel has computed in this process (0 without the
    library): tests tell by it which path took a call, since the BLAS may sum in the same order and give the same
    bits."""
    if not available():
        return 0
    fn = ctypes.CDLL(str(_state["lib"])).m3_f32gemm_calls
    fn.restype = ctypes.c_int64
    return int(fn())


def cached_block_bytes(release: bool = False) -> int:
    """Bytes of freed multi-MiB kernel buffers (packed weights, activations, attention scratch) that the loaded
    kernel libraries (float32, int8, training) keep mapped for their next call (``block_cache.h``: at most 384 MiB
    each); ``release``: unmap them and return what they were. E.g. after encoding long texts, to give that memory
    back while the model stays loaded."""
    total = 0
    for state, function in _block_caches:
        if state.get("lib") is not None:
            fn = getattr(ctypes.CDLL(str(state["lib"])), function)
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int64
            total += int(fn(int(bool(release))))
    return total


def register_block_cache(state: dict, function: str) -> None:
    """Let :func:`cached_block_bytes` see the block cache of the library that ``state`` will hold."""
    _block_caches.append((state, function))


def uses_f32gemm() -> bool:
    """True when the linear layers' products that AMX does not take run on the AVX-512 kernel (``set_f32gemm``)."""
    return available() and kernel_switch(_state["lib"], "m3_f32gemm", -1, None)


def product(x: np.ndarray, w: np.ndarray, layout: str = "nk", add_to: np.ndarray | None = None) -> np.ndarray:
    """``x [M, K] @ w^T`` for ``w [N, K]`` (``layout="nk"``, a linear layer's weight) or ``x @ w`` for ``w [K, N]``
    (``"kn"``, as a backward pass multiplies), float32, as the kernels compute it (AMX or the BLAS); with
    ``add_to`` [M, N] the product is added to it in place and returned. For tests and benchmarks. Raises
    ValueError on other shapes, dtypes or layouts.

    >>> import numpy as np                                           # doctest: +SKIP
    >>> product(np.ones((2, 3), np.float32), np.eye(3, dtype=np.float32)).shape   # doctest: +SKIP
    (2, 3)
    """
    if layout not in ("nk", "kn"):
        raise ValueError(f"layout must be 'nk' or 'kn', got {layout!r}")
    k_at = 1 if layout == "nk" else 0
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[k_at] or x.dtype != np.float32 or w.dtype != np.float32:
        raise ValueError(f"product wants float32 x [M, K] and w [{'N, K' if k_at else 'K, N'}], got {x.dtype} "
                         f"{x.shape} and {w.dtype} {w.shape}")
    n = w.shape[1 - k_at]
    if add_to is not None and (add_to.shape != (x.shape[0], n) or add_to.dtype != np.float32
                               or not add_to.flags.c_contiguous):
        raise ValueError(f"add_to must be a C-ordered float32 [{x.shape[0]}, {n}] array, got {add_to.dtype} "
                         f"{add_to.shape}")
    if not available():
        raise RuntimeError("fast CPU kernels are not available on this machine")
    x, w = np.ascontiguousarray(x), np.ascontiguousarray(w)
    y = add_to if add_to is not None else np.empty((x.shape[0], n), np.float32)
    fn = ctypes.CDLL(str(_state["lib"])).m3_product
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    fn(x.ctypes.data, w.ctypes.data, y.ctypes.data, x.shape[0], n, x.shape[1], int(layout == "kn"),
       int(add_to is not None))
    return y


def library_built(state: dict, source: Path, what: str) -> bool:
    """Build ``source`` once into ``state["lib"]`` (its path, or None after a failed build, with a warning that
    names ``what``); True when it is there. For the kernel libraries beside ``cpu_kernels.cc``."""
    if "lib" not in state:
        try:
            state["lib"] = build_library(source)
            choose_f32gemm(state["lib"])
        except (RuntimeError, OSError) as exc:
            warnings.warn(f"{what} unavailable: {exc}", stacklevel=3)
            state["lib"] = None
    return state["lib"] is not None


def custom_op(state: dict, name: str, out_shape, ready, unavailable: str, *, outputs: int = 1, dtypes=None,
              bprop=None, key=None) -> ops.Custom:
    """Kernel ``name`` of the library ``state["lib"]`` as an aot ``ops.Custom`` with shape rule ``out_shape`` (input
    shapes -> output shape(s)) and ``outputs`` outputs, float32 unless ``dtypes`` lists them, with backward
    ``bprop`` (or none); made once and kept in ``state[key or name]``. The first call for a key calls ``ready()``
    (which builds ``state["lib"]``) and raises RuntimeError(``unavailable``) when it is False."""
    key = key or name
    if key not in state:
        if not ready():
            raise RuntimeError(unavailable)
        kinds = tuple(dtypes or (ms.float32,) * outputs)
        dtype = (lambda *types: kinds[0]) if outputs == 1 else (lambda *types: kinds)
        state[key] = ops.Custom(f"{state['lib']}:{name}", out_shape=out_shape, out_dtype=dtype, func_type="aot",
                                bprop=bprop)
    return state[key]


def _op(name: str, out_shape) -> ops.Custom:
    return custom_op(_state, name, out_shape, available, "fast CPU kernels are not available on this machine")


def scalar(value: float) -> Tensor:
    """A one-element float32 tensor (how the kernels receive eps)."""
    return Tensor(np.array([value], np.float32))


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """[..., K] @ weight[N, K]^T + bias[N] -> [..., N] (float32)."""
    return _op("m3_linear", lambda xs, ws, bs: list(xs[:-1]) + [ws[0]])(x, weight, bias)


def embed(ids: Tensor, pos: Tensor, word, position, token_type0, gamma, beta, eps: Tensor) -> Tensor:
    """Packed ids/positions [T] int32 -> LayerNorm(word[ids] + position[pos] + token_type0) [T, H]."""
    return _op("m3_embed", lambda i, *s: [i[0], s[1][1]])(ids, pos, word, position, token_type0, gamma, beta, eps)


def attention_block(x: Tensor, attention, offsets: Tensor, heads: Tensor, eps: Tensor, packed=None) -> Tensor:
    """Post-LN self-attention sub-layer of ``encoder.SelfAttention`` on packed tokens [T, H]; ``packed``: a
    ``packed.PackedWeights`` of its query, key, value and out weights (the products then skip packing them)."""
    f = _op("m3_attention_block", lambda xs, *s: xs)
    q, k, v = attention.query, attention.key, attention.value
    extra = (packed.id_tensor,) if packed is not None else ()
    return f(x, q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, attention.out.weight, attention.out.bias,
             attention.norm.gamma, attention.norm.beta, eps, offsets, heads, *extra)


def ffn_block(x: Tensor, ffn, eps: Tensor, packed=None) -> Tensor:
    """Post-LN GELU feed-forward sub-layer of ``encoder.FeedForward`` on packed tokens [T, H]; ``packed``: a
    ``packed.PackedWeights`` of its inner and outer weights."""
    f = _op("m3_ffn_block", lambda xs, *s: xs)
    extra = (packed.id_tensor,) if packed is not None else ()
    return f(x, ffn.inner.weight, ffn.inner.bias, ffn.outer.weight, ffn.outer.bias, ffn.norm.gamma,
             ffn.norm.beta, eps, *extra)
