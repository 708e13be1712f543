"""Float32 weights packed once for the AVX-512 product kernel and kept across calls (``packed_weights.h``).

Each fused sub-layer call (``cpu.attention_block``, ``cpu.ffn_block``) packs its weights into ``gemm_f32.h``'s
panels before multiplying: it reads and writes every weight once per call (skipping it made M3-small encodes of 8 x
128 tokens 1.04x faster against the same kernel packing per call, 1.06x against OpenBLAS's own AVX-512 kernel; AMD
EPYC Zen 5, paired in one process). :class:`PackedWeights` does that once per layer and keeps the result; a call
given its ``id_tensor`` skips the packing and computes the same products, bit for bit. The price is a second copy of
the packed weights in memory, so :func:`wanted` packs a model only while that copy fits ``BGEM3_PACKED_WEIGHTS_MB``
(default 256 MB: M3-small's encoder, 85 MB, is packed; the full XLM-R large size, 1.2 GB, is not, and keeps one copy
of its weights). ``BGEM3_PACKED_WEIGHTS_MB=0`` switches packing off. Where AMX takes the products
(``cpu.uses_bf16x3``) the same objects hold each weight split into bfloat16 triples in ``gemm_bf16x3.h``'s tiles
instead (6 bytes a weight: M3-small's encoder 127 MB); packing those per call took about 13 ms of a 136 ms M3-small
encode of 8 x 128 tokens (0.6 ns a weight).

A packing is used only while it still describes its weight (same address, shape, k block and a sample of one
value per row); otherwise the call packs as before. The model drops its packings when it trains or loads weights
(``model.encoder.M3Encoder.drop_packed_weights``).

>>> packed_bytes([(1152, 384), (384, 384)], bf16x3=False)  # 36 panels of 32 columns x 384 k, 12 x 384 k, float32
2359296
"""
from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Sequence

import mindspore as ms
from mindspore import Tensor

from . import cpu

BUDGET_ENV = "BGEM3_PACKED_WEIGHTS_MB"
DEFAULT_BUDGET_MB = 256
PANEL = 32                      # gemm_f32.h's kF32Cols


def packed_bytes(shapes: Sequence[tuple[int, int]], bf16x3: bool | None = None) -> int:
    """Bytes the packings of weights of these [n, k] shapes take: float32 panels (columns rounded up to whole
    32-column panels), or with ``bf16x3`` (default: where AMX takes the products, ``cpu.uses_bf16x3``) AMX's tiles of
    bfloat16 triples (columns rounded up to 64, k to 32; 6 bytes a weight).

    >>> packed_bytes([(384, 384)], bf16x3=True)     # M3-small's query weight: 3 bfloat16 parts of each value
    884736
    """
    if bf16x3 is None:
        bf16x3 = cpu.available() and cpu.uses_bf16x3()
    if bf16x3:
        return sum(-(-n // 64) * 64 * -(-k // 32) * 32 * 6 for n, k in shapes)
    return sum(-(-n // PANEL) * PANEL * k * 4 for n, k in shapes)


def budget_bytes() -> int:
    """The memory packed weights may take (``BGEM3_PACKED_WEIGHTS_MB``, default 256; 0: none). Raises ValueError
    on a value that is not a non-negative number."""
    raw = os.environ.get(BUDGET_ENV, str(DEFAULT_BUDGET_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV} must be a number of megabytes, got {raw!r}") from None
    if not mb >= 0:
        raise ValueError(f"{BUDGET_ENV} must be >= 0, got {raw!r}")
    return int(mb * 2 ** 20)


def runs_here() -> bool:
    """True when packed weights would be used: the fused kernels run, and either AMX takes the products (packed as
    bfloat16 triples) or the AVX-512 float32 kernel is built and not switched off (on, or on for packed weights
    only: ``cpu.f32gemm_state``)."""
    return cpu.available() and (cpu.uses_bf16x3() or cpu.f32gemm_state() in (1, cpu.PACKED_ONLY))


def wanted(shapes: Sequence[tuple[int, int]]) -> bool:
    """Whether to pack weights of these shapes here: :func:`runs_here` and their packings within the budget."""
    total = packed_bytes(shapes)
    return 0 < total <= budget_bytes() and runs_here()


class PackedWeights:
    """The float32 weights W_j [n_j, k_j] of one fused call, packed once (``m3_f32_pack``) and kept until this
    object is garbage-collected. ``id_tensor`` (int64 [1]) is what the call takes; ``nbytes`` their size."""

    def __init__(self, weights: Sequence[Tensor]):
        if not weights:
            raise ValueError("PackedWeights needs at least one weight")
        shapes = [tuple(w.shape) for w in weights]
        if any(len(s) != 2 for s in shapes) or any(w.dtype != ms.float32 for w in weights):
            got = [(str(w.dtype), s) for w, s in zip(weights, shapes)]
            raise ValueError(f"PackedWeights takes float32 [n, k] weights, got {got}")
        op = cpu.custom_op(cpu._state, "m3_f32_pack", lambda *s: [1], cpu.available,
                           "fast CPU kernels are not available on this machine", dtypes=(ms.int64,))
        self.id_tensor = op(*weights)
        self.id = int(self.id_tensor.asnumpy()[0])
        self.nbytes = packed_bytes(shapes)
        weakref.finalize(self, _release, str(cpu._state["lib"]), self.id)


def _release(lib: str, set_id: int) -> None:
    if set_id > 0:
        ctypes.CDLL(lib).m3_f32_release(ctypes.c_int64(set_id))


def kept_sets() -> int:
    """How many packed sets the kernels hold (for tests)."""
    if not cpu.available():
        return 0
    fn = ctypes.CDLL(str(cpu._state["lib"])).m3_f32_packed_sets
    fn.restype = ctypes.c_int64
    return int(fn())
