"""The float32 products on AMX as bfloat16 triples (``kernels/gemm_bf16x3.h``) against float64 NumPy: the error
of a float32 dot product, on every edge of the blocking (rows, columns and k off the tile sizes, k past one
1024 chunk), and the switch between AMX and the BLAS."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures import product_case

from bgem3_lib.kernels import cpu as ck

pytestmark = pytest.mark.skipif(not ck.available(), reason="fast CPU kernels not available here")
U = 2.0 ** -24           # float32's unit roundoff


@pytest.fixture
def amx():
    """AMX on for calls of 64 rows or more (the default threshold), where the CPU has it."""
    if not ck.set_bf16x3(True, min_rows=64):
        pytest.skip("no AMX-BF16 here")
    yield
    ck.set_bf16x3(True, min_rows=64)


def test_runs_on_amx_exactly_where_the_cpu_has_it():
    flags = Path("/proc/cpuinfo").read_text()
    assert ck.uses_bf16x3() == ("amx_bf16" in flags and "avx512_bf16" in flags)
    assert not ck.set_bf16x3(False) and not ck.uses_bf16x3()
    assert ck.set_bf16x3(True) == ck.uses_bf16x3()


@pytest.mark.parametrize("m, n, k", [(64, 64, 32), (97, 130, 45), (200, 1000, 1030), (129, 384, 2100),
                                     (300, 70, 4096)])
def test_matches_float64_to_float32_accuracy(amx, m, n, k):
    x, w, exact, size = product_case(np.random.default_rng(m + n + k), m, n, k)
    y = ck.product(x, w)
    assert y.shape == (m, n) and np.isfinite(y).all()
    assert (np.abs(y - exact) / size).max() < 8 * U      # measured 1.0-2.2 U here; the BLAS: 0.8-4.2 U


@pytest.mark.parametrize("m, n, k", [(64, 64, 32), (97, 130, 45), (129, 384, 2100)])
def test_weight_stored_k_by_n_and_accumulation(amx, m, n, k):
    x, w, exact, size = product_case(np.random.default_rng(m * n), m, n, k)
    base = np.random.default_rng(1).standard_normal((m, n)).astype(np.float32)
    y = ck.product(x, np.ascontiguousarray(w.T), "kn", add_to=base.copy())     # base + x @ (w^T), as a backward
    assert (np.abs(y - (base + exact)) / (size + np.abs(base))).max() < 8 * U   # measured 2.1-4.1 U here


def test_matches_the_blas(amx):
    x, w, exact, size = product_case(np.random.default_rng(5), 150, 200, 300)
    on = ck.product(x, w)
    assert ck.set_bf16x3(False) is False
    off = ck.product(x, w)
    assert not np.array_equal(on, off)                   # two different summations ...
    assert (np.abs(on - off) / size).max() < 16 * U      # ... of the same float32 accuracy


def test_short_calls_stay_on_the_blas(amx):
    x, w, _, _ = product_case(np.random.default_rng(6), 63, 40, 50)
    on = ck.product(x, w)
    ck.set_bf16x3(False)
    np.testing.assert_array_equal(on, ck.product(x, w))   # under the default threshold (64 rows): the BLAS
    assert ck.set_bf16x3(True, min_rows=200)
    x, w, _, _ = product_case(np.random.default_rng(7), 199, 40, 50)
    on = ck.product(x, w)
    ck.set_bf16x3(False)
    np.testing.assert_array_equal(on, ck.product(x, w))   # a raised threshold moves the edge
    assert ck.set_bf16x3(True, min_rows=64)
    assert not np.array_equal(on, ck.product(x, w))      # and back: 199 rows on AMX


def test_rejects_wrong_shapes_and_dtypes():
    with pytest.raises(ValueError, match="float32 x"):
        ck.product(np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="float64"):
        ck.product(np.ones((2, 3)), np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="layout"):
        ck.product(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), "tn")
    with pytest.raises(ValueError, match="add_to"):
        ck.product(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), add_to=np.ones((2, 3), np.float32))
