"""The BLAS under the CPU kernels: which library (:func:`find_blas`), and does it use this CPU's vector width?

The float32 products of ``kernels.cpu`` (and ``kernels.train``) that AMX or the package's AVX-512 kernel do not
take run on NumPy's OpenBLAS. OpenBLAS picks its kernel from the CPU at load time unless ``OPENBLAS_CORETYPE``
names one; some machines set it (with ``OPENBLAS_L2_SIZE``) to keep old OpenBLAS builds off CPUs they misdetect.
Pinned to ``Haswell`` (AVX2, 256-bit) on an AVX-512 CPU, its float32 matmul ran at 200 GFLOP/s against 350-400
with its own ``Cooperlake`` kernel on a 2-core AMD EPYC (Zen 5); ONNX Runtime and PyTorch bring their own BLAS
and are not slowed. Where :func:`blas_report` finds such a narrow kernel, ``cpu.choose_f32gemm`` sends the linear
layers' products to the package's AVX-512 kernel. ``python -m bgem3_lib info`` prints the report.

>>> narrow_kernel_note("Cooperlake", "fpu avx2 avx512f", None) is None
True
>>> print(narrow_kernel_note("Haswell", "fpu avx2 avx512f", "Haswell"))
OpenBLAS runs its Haswell kernel (256-bit vectors) on a CPU with 512-bit AVX-512, as OPENBLAS_CORETYPE=Haswell asks: ...
"""
from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path


def find_mkl(choice: str = "mkl") -> dict:
    """Intel MKL's single dynamic library (``pip install mkl`` puts ``libmkl_rt.so.*`` in ``sys.prefix/lib``; or
    ``choice`` is its path), loaded now with the *sequential* threading layer: the kernels' OpenMP workers each
    run their own single-threaded products, as with OpenBLAS. Raises ``RuntimeError`` when it is missing."""
    import sys
    libs = [choice] if choice != "mkl" else sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(handle, "MKL_Set_Threading_Layer"):
            handle.MKL_Set_Threading_Layer(1)          # MKL_THREADING_SEQUENTIAL, before any MKL computation
            return {"lib": lib, "sgemm": "cblas_sgemm", "set_threads": "MKL_Set_Num_Threads",
                    "get_threads": "MKL_Get_Max_Threads", "int_type": "int"}
    raise RuntimeError(f"BGEM3_BLAS={choice}: no loadable libmkl_rt (pip install mkl, or give the library's path)")


def find_blas() -> dict | None:
    """The BLAS of the kernels: NumPy's (or SciPy's) bundled OpenBLAS (library path, symbol names, integer width),
    or Intel MKL with ``BGEM3_BLAS=mkl`` (or ``=/path/to/libmkl_rt.so.N``; see :func:`find_mkl`; an opt-in
    experiment: MKL 2026.2's single-threaded sgemm measured 1.08-1.24x OpenBLAS's on this package's shapes)."""
    choice = os.environ.get("BGEM3_BLAS", "openblas")
    if choice != "openblas":
        return find_mkl(choice)
    import numpy
    roots = [Path(numpy.__file__).parent, Path(numpy.__file__).parent.parent / "numpy.libs"]
    try:
        import scipy
        roots.append(Path(scipy.__file__).parent.parent / "scipy.libs")
    except ImportError:
        pass
    for root in roots:
        for lib in sorted(glob.glob(str(root / "**" / "*openblas*.so*"), recursive=True)):
            try:
                handle = ctypes.CDLL(lib)
            except OSError:
                continue
            for prefix in ("", "scipy_"):
                for suffix, int_type in (("64_", "long long"), ("", "int")):
                    names = [f"{prefix}cblas_sgemm{suffix}", f"{prefix}openblas_set_num_threads{suffix}",
                             f"{prefix}openblas_get_num_threads{suffix}"]
                    if all(hasattr(handle, n) for n in names):
                        return {"lib": lib, "sgemm": names[0], "set_threads": names[1], "get_threads": names[2],
                                "int_type": int_type}
    return None


def cpu_signature() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"


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
    """``{"lib", "core", "pinned", "note"}`` for the BLAS the CPU kernels would load (:func:`find_blas`): its
    path, OpenBLAS's running core (None for MKL or when unknown), ``OPENBLAS_CORETYPE`` and
    :func:`narrow_kernel_note`'s note."""
    blas, core = find_blas(), None
    if blas is not None and "openblas_set_num_threads" in blas["set_threads"]:
        fn = getattr(ctypes.CDLL(blas["lib"]), blas["set_threads"].replace("set_num_threads", "get_corename"), None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            core = fn().decode().strip() or None
    pinned = os.environ.get("OPENBLAS_CORETYPE") or None
    return {"lib": blas["lib"] if blas else None, "core": core, "pinned": pinned,
            "note": narrow_kernel_note(core, cpu_signature(), pinned)}
