"""BGEM3 user API: real weights on real text (XQuAD), and bad input handling."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures import xquad

from bgem3_lib import BGEM3


@pytest.fixture(scope="module")
def base():
    return BGEM3("m3-small-base")


def _xquad_questions(lang: str):
    """(questions, index of their source paragraph among the 240)."""
    qs, gold, p = [], [], 0
    for art in xquad(lang)["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                qs.append(qa["question"])
                gold.append(p)
            p += 1
    return qs, np.array(gold)


def test_xquad_dense_retrieval_r_at_1(base):
    paragraphs = [para["context"] for art in xquad("en")["data"] for para in art["paragraphs"]]
    assert len(paragraphs) == 240
    P = base.encode_corpus(paragraphs, batch_size=32, max_length=512)["dense_vecs"]
    r1 = {}
    for lang in ("en", "de"):
        qs, gold = _xquad_questions(lang)
        assert len(qs) == 1190
        Q = base.encode_queries(qs, batch_size=128, max_length=512)["dense_vecs"]
        r1[lang] = float(np.mean(np.argmax(Q @ P.T, axis=1) == gold))
    print(f"XQuAD R@1 with m3-small-base: en->en {r1['en']:.4f}, de->en {r1['de']:.4f}")
    assert r1["en"] >= 0.85
    assert r1["de"] >= 0.70


def test_encode_outputs_in_input_order_and_normalised(base):
    texts = ["query: a much longer sentence about the weather in Paris today", "query: hi",
             "query: medium length text here"]
    out = base.encode(texts, batch_size=2)
    single = [base.encode(t)["dense_vecs"] for t in texts]
    np.testing.assert_allclose(out["dense_vecs"], np.stack(single), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["dense_vecs"], axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("bad, exc, msg", [
    ([], ValueError, "empty list"),
    ("", ValueError, "empty string"),
    (["ok", ""], ValueError, r"texts\[1\] is an empty string"),
    (["ok", 3], TypeError, r"texts\[1\] is int"),
    (None, TypeError, "got None"),
    ([None], TypeError, r"texts\[0\] is NoneType"),
    (42, TypeError, "got int"),
])
def test_bad_texts_are_named(base, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        base.encode(bad)


def test_over_length_warns_and_is_truncated(base):
    with pytest.warns(UserWarning, match="longer than max_length=16 tokens were truncated"):
        out = base.encode(["word " * 100], max_length=16)
    assert out["dense_vecs"].shape == (1, 384)
    with pytest.raises(ValueError, match="exceeds the model's position table"):
        base.encode(["x"], max_length=10_000)


def test_dense_only_model_refuses_sparse_with_reason(base):
    with pytest.raises(ValueError, match="no sparse/ColBERT heads"):
        base.encode(["hello"], return_sparse=True)


def test_missing_model_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        BGEM3("no-such-model")
    (tmp_path / "config.json").write_text('{"model_type": "xlm-roberta", "hidden_size": 8, '
                                          '"num_hidden_layers": 1, "num_attention_heads": 2, '
                                          '"intermediate_size": 8}')
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
        BGEM3(str(tmp_path))
