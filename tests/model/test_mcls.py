"""Tests for bgem3_lib.model.mcls on a tiny random model with the real XLM-R tokenizer."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from bgem3_lib.model.mcls import insert_cls, mcls_dense_embedding, mcls_positions


@functools.lru_cache(maxsize=None)
def _tiny(model_type: str, pooling: str, max_pos: int = 600):
    import mindspore as ms

    from bgem3_lib.model.bgem3 import BGEM3
    from bgem3_lib.model.config import M3Config
    from bgem3_lib.model.encoder import M3Encoder
    from bgem3_lib.model.tokenization import M3Tokenizer

    class Tiny(BGEM3):          # skips weight loading: random encoder, real tokenizer
        def __init__(self):
            self.config = M3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, vocab_size=250002, max_position_embeddings=max_pos,
                                   model_type=model_type, pooling=pooling)
            self.tokenizer = M3Tokenizer.from_file()
            self.encoder = M3Encoder(self.config)
            rng = np.random.default_rng(0)
            for p in self.encoder.get_parameters():
                if not p.name.endswith("gamma"):
                    p.set_data(ms.Tensor(rng.standard_normal(p.shape, dtype=np.float32) * 0.2))
            self.encoder.set_train(False)
            self.normalize_embeddings, self.heads, self.source = True, None, "tiny"
            self.query_instruction = self.passage_instruction = ""
            self.special_ids = (0, 2, 1, 3)
    return Tiny()


LONG = " ".join(["The committee met in Geneva and adopted the new broadcasting standard."] * 60)
SHORT = "A short passage about television standards."


def test_insert_cls_hand_worked():
    assert insert_cls([0, 5, 6, 7, 8, 2], 0, 2, every=3, max_length=16) == ([0, 5, 6, 0, 7, 8, 2], [0, 3])
    ids, pos = insert_cls([0] + list(range(10, 30)) + [2], 0, 2, every=4, max_length=9)
    assert len(ids) == 9 and ids[-1] == 2 and pos == [0, 4] and [ids[p] for p in pos] == [0, 0]
    assert mcls_positions(600, 256) == [0, 256, 512]
    with pytest.raises(ValueError):
        insert_cls([5, 6], 0, 2, 4, 10)


@pytest.mark.parametrize("model_type,pooling,seg", [("xlm-roberta", "cls", "cls"), ("bert", "mean", "mean")])
def test_short_text_equals_plain_embedding(model_type, pooling, seg):
    m = _tiny(model_type, pooling)
    plain = m.encode([SHORT, SHORT + " Twice."], show_progress=False)["dense_vecs"]
    mc = mcls_dense_embedding(m, [SHORT, SHORT + " Twice."], every=256, segment_pooling=seg)
    np.testing.assert_allclose(mc, plain, atol=2e-5)


def test_long_text_shape_positions_and_reference():
    from bgem3_lib.model.encoder import encoder_inputs

    m = _tiny("xlm-roberta", "cls")
    out = mcls_dense_embedding(m, [LONG, SHORT], max_length=520, every=128)
    assert out.shape == (2, 32) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    # independent reference: build the sequence by hand, run the encoder, average CLS rows
    body = m.tokenizer.encode_ids([LONG], 10**6)[0][1:-1]
    seq = []
    for t in body:
        if len(seq) % 128 == 0:
            seq.append(0)
        seq.append(t)
        if len(seq) == 519:
            break
    seq.append(2)
    ids = np.array([seq], np.int32)
    h = m.encoder(*encoder_inputs(ids, np.ones_like(ids), m.config)).asnumpy()[0]
    ref = h[[0, 128, 256, 384, 512]].mean(0)
    np.testing.assert_allclose(out[0], ref / np.linalg.norm(ref), atol=2e-5)
    plain = m.encode([LONG], max_length=520, show_progress=False)["dense_vecs"][0]
    assert not np.allclose(out[0], plain, atol=1e-3)       # more than one CLS changes the embedding


def test_bad_inputs():
    m = _tiny("xlm-roberta", "cls")
    with pytest.raises(ValueError, match="empty"):
        mcls_dense_embedding(m, ["ok", "  "])
    with pytest.raises(ValueError, match="max_length"):
        mcls_dense_embedding(m, ["ok"], max_length=1)
    with pytest.raises(TypeError):
        mcls_dense_embedding(m, [3])
    with pytest.raises(ValueError, match="segment_pooling"):
        mcls_dense_embedding(m, ["ok"], segment_pooling="max")
