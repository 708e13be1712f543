"""Does the BLAS under the CPU kernels use this CPU's vector width?

The float32 products of ``kernels.cpu`` (and ``kernels.train``) run on NumPy's OpenBLAS wherever the CPU has no
AMX. OpenBLAS picks its kernel from the CPU at load time unless ``OPENBLAS_CORETYPE`` names one; some machines
set it (with ``OPENBLAS_L2_SIZE``) to keep old OpenBLAS builds off CPUs they misdetect. Pinned to ``Haswell``
(AVX2, 256-bit) on an AVX-512 CPU, its float32 matmul ran at 200 GFLOP/s against 350-400 with its own
``Cooperlake`` kernel on a 2-core AMD EPYC (Zen 5); ONNX Runtime and PyTorch bring their own BLAS and are not
slowed. ``python -m bgem3_lib info`` prints :func:`blas_report`.

>>> narrow_kernel_note("Cooperlake", "fpu avx2 avx512f", None) is None
True
>>> print(narrow_kernel_note("Haswell", "fpu avx2 avx512f", "Haswell"))
OpenBLAS runs its Haswell kernel (256-bit vectors) on a CPU with 512-bit AVX-512, as OPENBLAS_CORETYPE=Haswell asks: ...
"""
from __future__ import annotations

import ctypes
import os

# OpenBLAS core names (``openblas_get_corename``, lower case) by the vector width of their float32 kernels.
CORE_BITS = {**{c: 512 for c in ("skylakex", "cooperlake", "sapphirerapids")},
             **{c: 256 for c in ("haswell", "zen", "excavator", "sandybridge", "steamroller", "piledriver",
                                 "bulldozer")},
             **{c: 128 for c in ("nehalem", "core2", "penryn", "dunnington", "prescott", "atom", "barcelona")}}


def cpu_vector_bits(flags: str) -> int:
    """The widest float32 vectors the CPU flags (``/proc/cpuinfo``'s ``flags`` line) allow.

    >>> cpu_vector_bits("fpu avx avx2 avx512f"), cpu_vector_bits("fpu avx avx2"), cpu_vector_bits("sse2")
    (512, 256, 128)
    """
    have = set(flags.split())
    return 512 if "avx512f" in have else 256 if "avx" in have else 128


def narrow_kernel_note(core: str | None, flags: str, pinned: str | None) -> str | None:
    """A one-paragraph note when OpenBLAS's ``core`` has narrower vectors than the CPU ``flags`` allow, else None
    (also None for a core name this table does not know)."""
    bits = CORE_BITS.get((core or "").lower())
    cpu = cpu_vector_bits(flags)
    if bits is None or bits >= cpu:
        return None
    why = f", as OPENBLAS_CORETYPE={pinned} asks" if pinned else ""
    return (f"OpenBLAS runs its {core} kernel ({bits}-bit vectors) on a CPU with {cpu}-bit "
            f"{'AVX-512' if cpu == 512 else 'AVX'}{why}: products left to it run below this CPU's speed "
            "(about half on an AMD EPYC Zen 5), so the kernels' linear layers use this package's own AVX-512 "
            "kernel where the CPU has one. Machines set the variable to keep old OpenBLAS builds off new "
            "CPUs; `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` runs one command without it.")


def blas_report() -> dict:
    """``{"lib", "core", "pinned", "note"}`` for the BLAS the CPU kernels would load (``cpu.find_blas``): its
    path, OpenBLAS's running core (None for MKL or when unknown), ``OPENBLAS_CORETYPE`` and
    :func:`narrow_kernel_note`'s note."""
    from .cpu import _cpu_signature, find_blas
    blas, core = find_blas(), None
    if blas is not None and "openblas_set_num_threads" in blas["set_threads"]:
        fn = getattr(ctypes.CDLL(blas["lib"]), blas["set_threads"].replace("set_num_threads", "get_corename"), None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            core = fn().decode().strip() or None
    pinned = os.environ.get("OPENBLAS_CORETYPE") or None
    return {"lib": blas["lib"] if blas else None, "core": core, "pinned": pinned,
            "note": narrow_kernel_note(core, _cpu_signature(), pinned)}
