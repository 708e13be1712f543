"""The kernels' cache of multi-MiB buffers (``block_cache.h``): blocks freed by one fused call are handed to the
next instead of going back to glibc's heaps (where full-size encodes left gigabytes of holes) or being mapped
afresh; results do not depend on what a reused block held."""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

from bgem3_lib.kernels import cpu as ck
from bgem3_lib.model.config import M3Config
from bgem3_lib.model.encoder import SelfAttention

pytestmark = pytest.mark.skipif(not ck.available(), reason="fast CPU kernels not available here")


def _attention(hidden=256, heads=4, seed=0):
    attn = SelfAttention(M3Config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                                  intermediate_size=4 * hidden))
    rng = np.random.default_rng(seed)
    for p in attn.get_parameters():
        base = 1.0 if p.name.endswith("gamma") else 0.0
        p.set_data(Tensor((base + rng.normal(0, 0.1, p.shape)).astype(np.float32)))
    return attn, rng


def test_freed_blocks_are_reused_by_the_next_call_and_can_be_released():
    attn, rng = _attention()
    rows = 1200                                      # q, k, v: 1200 x 768 floats = 3.5 MiB, a cached block
    x = Tensor(rng.normal(0, 1, (rows, 256)).astype(np.float32))
    offsets, heads = Tensor(np.array([0, 500, rows], np.int32)), Tensor(np.array([4], np.int32))

    def call():
        return ck.attention_block(x, attn, offsets, heads, ck.scalar(1e-5)).asnumpy()

    ck.cached_block_bytes(release=True)
    assert ck.cached_block_bytes() == 0
    first = call()
    held = ck.cached_block_bytes()
    assert held >= 3 * 2 ** 20                       # at least the q, k, v buffer came back to the cache
    for _ in range(3):                               # the same call takes the same blocks again: nothing new
        again = call()
        assert ck.cached_block_bytes() == held
        np.testing.assert_array_equal(again, first)  # blocks hold the last call's values: never read before written
    assert ck.cached_block_bytes(release=True) == held
    assert ck.cached_block_bytes() == 0
    np.testing.assert_array_equal(call(), first)


def test_a_smaller_call_reuses_larger_blocks_and_a_larger_call_maps_new_ones():
    attn, rng = _attention()
    offsets_of = lambda n: Tensor(np.array([0, n - 700, n], np.int32))  # noqa: E731  (the longest: 700)
    heads = Tensor(np.array([4], np.int32))
    ck.cached_block_bytes(release=True)
    big = Tensor(rng.normal(0, 1, (1200, 256)).astype(np.float32))
    ck.attention_block(big, attn, offsets_of(1200), heads, ck.scalar(1e-5)).asnumpy()
    held = ck.cached_block_bytes()
    near = Tensor(rng.normal(0, 1, (1000, 256)).astype(np.float32))     # within 2x of every block: all reused
    ck.attention_block(near, attn, offsets_of(1000), heads, ck.scalar(1e-5)).asnumpy()
    assert ck.cached_block_bytes() == held
    huge = Tensor(rng.normal(0, 1, (6000, 256)).astype(np.float32))     # q, k, v 17.6 MiB: no cached block fits
    ck.attention_block(huge, attn, offsets_of(6000), heads, ck.scalar(1e-5)).asnumpy()
    assert ck.cached_block_bytes() > held + 17 * 2 ** 20
    ck.cached_block_bytes(release=True)
