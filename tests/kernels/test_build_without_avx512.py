"""The kernel libraries on a CPU without AVX-512: every source compiles for x86-64-v3 (AVX2, FMA), where the
AVX-512 and AMX paths are compiled out and the products fall back to the BLAS; the inference library's product
then matches NumPy and says the AVX-512 path is off. (-O0: the point is what compiles, not its speed.)"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from bgem3_lib.kernels import cpu as ck
from bgem3_lib.kernels import int8, maxsim, train

pytestmark = pytest.mark.skipif(not ck.available(), reason="fast CPU kernels not available here")
AVX2_ONLY = ("-O0", "-march=x86-64-v3")


@pytest.mark.parametrize("source", [ck.SOURCE, train.SOURCE, int8.SOURCE, maxsim.SOURCE], ids=lambda p: p.name)
def test_every_kernel_source_builds_for_avx2(source):
    assert ck.build_library(source, extra_flags=AVX2_ONLY).is_file()


def test_products_fall_back_to_the_blas():
    lib = ctypes.CDLL(str(ck.build_library(ck.SOURCE, extra_flags=AVX2_ONLY)))
    lib.m3_f32gemm.argtypes = [ctypes.c_int, ctypes.c_int64]
    assert lib.m3_f32gemm(1, 1) == 0                     # asked for, but compiled out
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((70, 300), dtype=np.float32), rng.standard_normal((50, 300), dtype=np.float32)
    y = np.zeros((70, 50), np.float32)
    ptr = ctypes.POINTER(ctypes.c_float)
    lib.m3_product.argtypes = [ptr, ptr, ptr] + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.m3_product(*(a.ctypes.data_as(ptr) for a in (x, w, y)), 70, 50, 300, 0, 0)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)
