"""Tests for bgem3_lib.training.hidden_cache: cached lower-layer states equal a direct forward pass."""
from __future__ import annotations

import numpy as np
import pytest


def _encoder():
    import mindspore as ms

    from bgem3_lib.model.config import M3Config
    from bgem3_lib.model.encoder import M3Encoder

    cfg = M3Config(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                   vocab_size=50, max_position_embeddings=40)
    enc = M3Encoder(cfg)
    rng = np.random.default_rng(0)
    for p in enc.get_parameters():
        if not p.name.endswith("gamma"):
            p.set_data(ms.Tensor(rng.normal(0, 0.3, p.shape).astype(np.float32)))
    return enc


def test_cache_matches_direct_forward_and_is_reused(tmp_path):
    from bgem3_lib.model.encoder import encoder_inputs
    from bgem3_lib.training.hidden_cache import HiddenCache, build_hidden_cache

    enc = _encoder()
    rng = np.random.default_rng(1)
    ids = [[0, *rng.integers(4, 50, n).tolist(), 2] for n in (3, 11, 1, 7)]
    cache = build_hidden_cache(enc, ids, layer=2, path=tmp_path / "c", batch_tokens=20)
    for i, x in enumerate(ids):
        arr = np.array([x], np.int32)
        t_ids, t_mask, t_pos = encoder_inputs(arr, np.ones_like(arr), enc.cfg)
        ref = enc.run_layers(enc.embed(t_ids, t_pos), enc.mask_bias(t_mask), 0, 2).asnumpy()[0]
        assert cache(i).shape == (len(x), 16) and cache(i).dtype == np.float16
        np.testing.assert_allclose(cache(i).astype(np.float32), ref, atol=2e-3)   # fp16 storage
    mtime = (tmp_path / "c" / "states.npy").stat().st_mtime_ns
    again = build_hidden_cache(enc, ids, layer=2, path=tmp_path / "c")
    assert (tmp_path / "c" / "states.npy").stat().st_mtime_ns == mtime           # reused, not rebuilt
    assert np.array_equal(again(3), cache(3))
    other = build_hidden_cache(enc, ids[:2], layer=2, path=tmp_path / "c")       # other key -> rebuilt
    assert len(other) == 2 and not list(tmp_path.glob(".c.*"))
    with pytest.raises(FileNotFoundError):
        HiddenCache.open(tmp_path / "missing")
    with pytest.raises(ValueError, match="layer"):
        build_hidden_cache(enc, ids, layer=9)
