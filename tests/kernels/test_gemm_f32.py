"""The float32 products on AVX-512 registers (``kernels/gemm_f32.h``) against float64 NumPy: the error of a float32
dot product on every edge of the blocking (rows off the 12-row register block and past one 144-row chunk, columns
off the 32-column panel and past one 1024-column block, k off the 16-wide transpose and past one 256 block, with k
up to 1024 in one block or in blocks of 256), both weight layouts, accumulation, and the switch between this kernel
and the BLAS."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures import on_f32_kernel, product_case

from bgem3_lib.kernels import cpu as ck

pytestmark = pytest.mark.skipif(not ck.available(), reason="fast CPU kernels not available here")
U = 2.0 ** -24           # float32's unit roundoff
EDGES = [(12, 32, 16), (13, 40, 17), (97, 130, 45), (150, 1030, 300), (300, 70, 2100), (64, 16, 1)]
WHOLE_K = 1024           # the kernel's default: k up to this in one block


@pytest.fixture
def f32gemm():
    """This kernel on for calls of 1 row or more, AMX (which would take the products first) off."""
    amx = ck.uses_bf16x3()
    ck.set_bf16x3(False)
    if not ck.set_f32gemm(True, min_rows=1):
        ck.set_bf16x3(amx)
        pytest.skip("no AVX-512 here")
    yield
    ck.set_f32gemm_whole_k(WHOLE_K)
    ck.set_f32gemm(True, min_rows=64)
    ck.choose_f32gemm(ck._state["lib"])                  # this machine's default
    ck.set_bf16x3(amx)


def test_runs_exactly_where_the_cpu_has_avx512():
    flags = Path("/proc/cpuinfo").read_text().split()
    assert ck.set_f32gemm(True) == ("avx512f" in flags)
    assert not ck.set_f32gemm(False) and not ck.uses_f32gemm()
    assert ck.set_f32gemm(True) == ck.uses_f32gemm()
    ck.choose_f32gemm(ck._state["lib"])                  # back to the default of this machine


@pytest.mark.parametrize("env, note, on", [(None, "narrow", True), (None, None, False), ("1", None, True),
                                           ("0", "narrow", False)])
def test_default_follows_the_blas_kernel_and_the_environment(monkeypatch, env, note, on):
    """On by default exactly where the BLAS runs narrower vectors than the CPU; BGEM3_F32GEMM decides over it."""
    if "avx512f" not in Path("/proc/cpuinfo").read_text().split():
        pytest.skip("no AVX-512 here")
    monkeypatch.setattr(ck, "blas_report", lambda: {"note": note})
    if env is None:
        monkeypatch.delenv("BGEM3_F32GEMM", raising=False)
    else:
        monkeypatch.setenv("BGEM3_F32GEMM", env)
    try:
        ck.choose_f32gemm(ck._state["lib"])
        assert ck.uses_f32gemm() is on
    finally:
        monkeypatch.undo()
        ck.choose_f32gemm(ck._state["lib"])


@pytest.mark.parametrize("whole_k", [WHOLE_K, 0])
@pytest.mark.parametrize("m, n, k", EDGES)
def test_matches_float64_to_float32_accuracy(f32gemm, m, n, k, whole_k):
    assert ck.set_f32gemm_whole_k(whole_k) == whole_k
    x, w, exact, size = product_case(np.random.default_rng(m + n + k), m, n, k)
    y = ck.product(x, w)
    assert y.shape == (m, n) and np.isfinite(y).all()
    assert (np.abs(y - exact) / size).max() < 8 * U      # measured 0.5-1.7 U here (partial sums per 256 k)


@pytest.mark.parametrize("whole_k", [WHOLE_K, 0])
@pytest.mark.parametrize("m, n, k", EDGES)
def test_weight_stored_k_by_n_and_accumulation(f32gemm, m, n, k, whole_k):
    ck.set_f32gemm_whole_k(whole_k)
    x, w, exact, size = product_case(np.random.default_rng(m * n + k), m, n, k)
    base = np.random.default_rng(1).standard_normal((m, n)).astype(np.float32)
    y = ck.product(x, np.ascontiguousarray(w.T), "kn", add_to=base.copy())     # base + x @ (w^T), as a backward
    assert (np.abs(y - (base + exact)) / (size + np.abs(base))).max() < 8 * U


def test_whole_k_block_up_to_its_limit_only(f32gemm):
    """k = 300: one block of 300 by default, 256 + 44 with the limit at 0 (two summations); k = 1100, past the
    default limit: blocks of 256 either way (the same bits)."""
    assert ck.set_f32gemm_whole_k() == WHOLE_K
    for k, same in ((300, False), (1100, True)):
        x, w, _, _ = product_case(np.random.default_rng(k), 100, 64, k)
        whole = ck.product(x, w)
        ck.set_f32gemm_whole_k(0)
        blocked = ck.product(x, w)
        ck.set_f32gemm_whole_k(WHOLE_K)
        assert np.array_equal(whole, blocked) is same


def test_matches_the_blas(f32gemm):
    x, w, exact, size = product_case(np.random.default_rng(5), 150, 200, 700)
    on = on_f32_kernel(lambda: ck.product(x, w), True)
    assert ck.set_f32gemm(False) is False
    off = on_f32_kernel(lambda: ck.product(x, w), False)     # two summations (maybe in the same order) ...
    assert (np.abs(on - off) / size).max() < 16 * U      # ... of the same float32 accuracy


def test_short_calls_stay_on_the_blas(f32gemm):
    assert ck.set_f32gemm(True, min_rows=64)
    x, w, _, _ = product_case(np.random.default_rng(6), 63, 40, 700)
    on = on_f32_kernel(lambda: ck.product(x, w), False)      # under the threshold: the BLAS
    ck.set_f32gemm(False)
    np.testing.assert_array_equal(on, ck.product(x, w))
    assert ck.set_f32gemm(True, min_rows=64)
    x, w, _, _ = product_case(np.random.default_rng(7), 64, 40, 700)
    on_f32_kernel(lambda: ck.product(x, w), True)            # at it: this kernel
