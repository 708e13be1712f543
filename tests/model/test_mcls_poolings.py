"""bgem3_lib.model.mcls on the packed path, both poolings in one pass: the tiny random model (64 usable positions,
real tokenizer) against plain ``encode`` and hand-built sequences run through the padded encoder."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from tiny_m3 import tiny_model_dir

from bgem3_lib.model.mcls import cls_counts, mcls_dense_embedding, mcls_layout

BOTH = ("cls", "mean")


def mcls_poolings(model, texts, every, **kw):
    return mcls_dense_embedding(model, texts, every, segment_pooling=BOTH, **kw)

LONG = "The committee met in Geneva and adopted the new broadcasting standard for colour television. " * 4
SHORT = "A short passage about television."


@functools.lru_cache(maxsize=None)
def _model():
    from bgem3_lib.model.bgem3 import BGEM3
    return BGEM3(str(tiny_model_dir()))


def _with_pooling(model, pooling, texts):
    saved = model.config.pooling
    model.config.pooling = pooling
    try:
        return model.encode(texts, show_progress=False)["dense_vecs"]
    finally:
        model.config.pooling = saved


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_every_at_max_length_gives_the_plain_poolings():
    m = _model()
    texts = [LONG, SHORT]
    out = mcls_poolings(m, texts, every=m.config.max_length)
    for pooling in ("cls", "mean"):
        np.testing.assert_allclose(out[pooling], _with_pooling(m, pooling, texts), atol=2e-5)
    assert out["cls"].shape == (2, m.config.hidden_size)
    assert not np.allclose(out["cls"], out["mean"], atol=1e-3)


def test_hand_built_reference_for_windows():
    from bgem3_lib.model.encoder import encoder_inputs
    m = _model()
    seq, cls_pos = mcls_layout(m, [LONG], every=20)[0]
    assert len(seq) == m.config.max_length == 64 and cls_pos == [0, 20, 40, 60]
    assert [seq[p] for p in cls_pos] == [m.config.bos_token_id] * 4 and seq[-1] == m.config.eos_token_id
    ids = np.array([seq], np.int32)
    h = m.encoder(*encoder_inputs(ids, np.ones_like(ids), m.config)).asnumpy()[0]
    cls_ref = h[[0, 20, 40, 60]].mean(0)
    mean_ref = np.mean([h[0:20].mean(0), h[20:40].mean(0), h[40:60].mean(0), h[60:64].mean(0)], axis=0)
    out = mcls_poolings(m, [LONG], every=20)
    np.testing.assert_allclose(out["cls"][0], cls_ref / np.linalg.norm(cls_ref), atol=3e-5)
    np.testing.assert_allclose(out["mean"][0], mean_ref / np.linalg.norm(mean_ref), atol=3e-5)


def test_cls_counts():
    m = _model()
    assert cls_counts(m, [LONG, SHORT], every=20).tolist() == [4, 1]
    assert cls_counts(m, [LONG], every=10**6).tolist() == [1]


def test_bad_inputs():
    m = _model()
    with pytest.raises(ValueError, match="empty"):
        mcls_poolings(m, ["ok", "   "], every=16)
    with pytest.raises(ValueError, match="every"):
        mcls_poolings(m, ["ok"], every=1)
    with pytest.raises(ValueError, match="max_length"):
        mcls_poolings(m, ["ok"], every=16, max_length=1)
    with pytest.raises(ValueError, match="segment_pooling"):
        mcls_dense_embedding(m, ["ok"], segment_pooling=("cls", "max"))
    with pytest.raises(ValueError, match="batch_size"):
        mcls_poolings(m, ["ok"], every=16, batch_size=0)
    with pytest.raises(TypeError):
        mcls_poolings(m, [3], every=16)
