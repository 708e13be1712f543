"""Weights packed ahead (``kernels/packed.py``, ``packed_weights.h``): the fused blocks given them compute the same
bits as when they pack per call; a packing that no longer describes its weight (changed values, another k block)
is not used; the budget; the model packs once, drops its packings on training, and frees them."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from fixtures import on_f32_kernel
from mindspore import Parameter, Tensor, ops
from tiny_m3 import tiny_model_dir

from bgem3_lib.kernels import cpu as ck
from bgem3_lib.kernels import packed

pytestmark = pytest.mark.skipif(not ck.available(), reason="fast CPU kernels not available here")
H, HEADS, F, ROWS = 64, 4, 300, 100          # ROWS >= 64: the AVX-512 kernel's threshold; F > 256: two k layouts


@pytest.fixture
def f32_state():
    """The AVX-512 kernel available, AMX (which would take the products first) off; the defaults back after."""
    amx = ck.uses_bf16x3()
    ck.set_bf16x3(False)
    if not ck.set_f32gemm(True):
        ck.set_bf16x3(amx)
        pytest.skip("no AVX-512 here")
    yield
    ck.set_f32gemm_whole_k(1024)
    ck.choose_f32gemm(ck._state["lib"])
    ck.set_bf16x3(amx)


@pytest.fixture
def amx_state():
    """AMX taking the products (the default where the CPU has AMX-BF16); skipped elsewhere."""
    amx = ck.uses_bf16x3()
    if not ck.set_bf16x3(True):
        ck.set_bf16x3(amx)
        pytest.skip("no AMX-BF16 here")
    yield
    ck.set_bf16x3(amx)


class Linear:
    def __init__(self, rng, n, k):
        self.weight = Parameter(Tensor((rng.standard_normal((n, k)) * k ** -0.5).astype(np.float32)))
        self.bias = Tensor(rng.standard_normal(n).astype(np.float32) * 0.1)


class Norm:
    def __init__(self, h):
        self.gamma, self.beta = Tensor(np.ones(h, np.float32)), Tensor(np.zeros(h, np.float32))


class Attention:
    def __init__(self, rng):
        self.query, self.key, self.value, self.out = (Linear(rng, H, H) for _ in range(4))
        self.norm = Norm(H)

    def weights(self):
        return [self.query.weight, self.key.weight, self.value.weight, self.out.weight]


class FFN:
    def __init__(self, rng):
        self.inner, self.outer, self.norm = Linear(rng, F, H), Linear(rng, H, F), Norm(H)


def blocks(x, att, ffn, att_pack=None, ffn_pack=None):
    off, heads, eps = Tensor(np.array([0, 37, ROWS], np.int32)), Tensor(np.array([HEADS], np.int32)), ck.scalar(1e-5)
    return (ck.attention_block(x, att, off, heads, eps, att_pack).asnumpy(),
            ck.ffn_block(x, ffn, eps, ffn_pack).asnumpy())


def case(seed=0):
    rng = np.random.default_rng(seed)
    return Tensor(rng.standard_normal((ROWS, H)).astype(np.float32)), Attention(rng), FFN(rng)


def test_packed_ahead_gives_the_bits_of_packing_per_call(f32_state):
    x, att, ffn = case()
    per_call = on_f32_kernel(lambda: blocks(x, att, ffn))                     # the kernel, packing per call
    pa, pf = packed.PackedWeights(att.weights()), packed.PackedWeights([ffn.inner.weight, ffn.outer.weight])
    assert pa.id > 0 and pf.nbytes == packed.packed_bytes([(F, H), (H, F)])
    for got, want in zip(on_f32_kernel(lambda: blocks(x, att, ffn, pa, pf)), per_call):
        np.testing.assert_array_equal(got, want)
    ck.set_f32gemm("packed")                   # the state that runs the kernel for packed weights only
    assert ck.f32gemm_state() == ck.PACKED_ONLY and not ck.uses_f32gemm()
    for got, want in zip(on_f32_kernel(lambda: blocks(x, att, ffn, pa, pf)), per_call):
        np.testing.assert_array_equal(got, want)
    on_f32_kernel(lambda: blocks(x, att, ffn), expect=False)           # ... and the BLAS for weights packed per call
    ck.set_f32gemm(False)                      # off means off, packed or not
    on_f32_kernel(lambda: blocks(x, att, ffn, pa, pf), expect=False)


def test_a_packing_that_no_longer_describes_its_weight_is_not_used(f32_state):
    x, att, ffn = case(1)
    pa, pf = packed.PackedWeights(att.weights()), packed.PackedWeights([ffn.inner.weight, ffn.outer.weight])
    rng = np.random.default_rng(2)
    for lin in (att.value, ffn.outer):                                        # changed in place after packing
        ops.assign(lin.weight, Tensor(rng.standard_normal(lin.weight.shape).astype(np.float32) * 0.1))
    for got, want in zip(blocks(x, att, ffn, pa, pf), blocks(x, att, ffn)):
        np.testing.assert_array_equal(got, want)
    # a packing made with all of k in one block, read after the whole-k limit moved below k
    pa, pf = packed.PackedWeights(att.weights()), packed.PackedWeights([ffn.inner.weight, ffn.outer.weight])
    ck.set_f32gemm_whole_k(16)
    for got, want in zip(blocks(x, att, ffn, pa, pf), blocks(x, att, ffn)):
        np.testing.assert_array_equal(got, want)


def test_bf16x3_tiles_packed_ahead_are_what_the_call_reads(amx_state):
    """Where AMX takes the products, packings hold the weights split into bfloat16-triple tiles (6 bytes a weight):
    the blocks given them compute the bits of packing per call, and read those tiles: after a change to a weight that
    the sample of one value per row does not see, the call still computes with the packed (old) values."""
    x, att, ffn = case(4)
    before = blocks(x, att, ffn)
    pa, pf = packed.PackedWeights(att.weights()), packed.PackedWeights([ffn.inner.weight, ffn.outer.weight])
    assert packed.runs_here() and pf.nbytes == packed.packed_bytes([(F, H), (H, F)], bf16x3=True) == 2 * 320 * 64 * 6
    for got, want in zip(blocks(x, att, ffn, pa, pf), before):
        np.testing.assert_array_equal(got, want)
    w = ffn.inner.weight.asnumpy().copy()          # [F, H]: row 0's sampled value is column 0, the last is [-1, -1]
    w[0, 1] += 1.0
    ops.assign(ffn.inner.weight, Tensor(w))
    after = blocks(x, att, ffn)                     # packed per call: the new value counts
    assert not np.array_equal(after[1], before[1])
    np.testing.assert_array_equal(blocks(x, att, ffn, pa, pf)[1], before[1])
    ck.set_bf16x3(False)                            # the float32 path does not read the tiles
    np.testing.assert_allclose(blocks(x, att, ffn, pa, pf)[1], after[1], rtol=1e-5, atol=1e-5)


def test_packings_are_freed_with_their_object(f32_state):
    _, att, _ = case(3)
    gc.collect()                               # sets of earlier tests' objects not yet collected would go now
    before = packed.kept_sets()
    p = packed.PackedWeights(att.weights())
    assert packed.kept_sets() == before + 1
    del p
    gc.collect()
    assert packed.kept_sets() == before
    with pytest.raises(ValueError, match=r"float32 \[n, k\]"):
        packed.PackedWeights([Tensor(np.ones(3, np.float32))])


def test_budget(monkeypatch):
    monkeypatch.setenv(packed.BUDGET_ENV, "0")
    assert packed.budget_bytes() == 0 and not packed.wanted([(64, 64)])
    monkeypatch.setenv(packed.BUDGET_ENV, "0.5")
    assert packed.budget_bytes() == 2 ** 19
    assert not packed.wanted([(1024, 1024)])                   # 4 MiB of packings over half a MiB
    assert packed.wanted([(64, 64)]) == packed.runs_here()
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(packed.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=packed.BUDGET_ENV):
            packed.budget_bytes()


def test_the_model_packs_once_drops_on_training_and_encodes_the_same(f32_state):
    from bgem3_lib.model.bgem3 import BGEM3
    m = BGEM3(tiny_model_dir())
    texts = ["packed weights " * 12, "dense vectors", "x " * 50]
    enc = m.encoder
    packs = enc.layer_packs()
    assert len(packs) == len(enc.layers) and all(p is not None for pair in packs for p in pair)
    assert enc.layer_packs() is packs                           # made once
    with_packs = m.encode(texts, batch_size=8)["dense_vecs"]
    enc.set_train(True)
    assert enc._packs is None                                   # dropped: training changes the weights
    enc.set_train(False)
    enc._packs = []                                             # none: every call packs
    np.testing.assert_array_equal(m.encode(texts, batch_size=8)["dense_vecs"], with_packs)
