"""Tests for bgem3_lib.analysis.longdoc_eval: hand-worked numbers, NumPy references, the tiny random model."""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from tiny_m3 import tiny_model_dir

from bgem3_lib.analysis import longdoc_eval as le
from bgem3_lib.analysis.batching_stats import layer_activation_bytes
from bgem3_lib.model.tokenization import M3Tokenizer


class WordTokenizer:
    """One token per whitespace-separated word, ``<s>`` = 0, word = 5, ``</s>`` = 2."""

    def encode_ids(self, texts, max_length, warn=True):
        return [[0] + [5] * len(t.split()) + [2] for t in texts]


@functools.lru_cache(maxsize=None)
def _tiny():
    from bgem3_lib.model.bgem3 import BGEM3
    return BGEM3(str(tiny_model_dir()))


def test_variant_names():
    assert le.variant_name("cls", 512, 512) == "CLS"
    assert le.variant_name("mean", 600, 512) == "mean"
    assert le.variant_name("cls", 128, 512) == "MCLS-128 (CLS)"
    assert le.variant_name("mean", 256, 512) == "MCLS-256 (mean)"
    with pytest.raises(ValueError, match="pooling"):
        le.variant_name("max", 256, 512)


def test_visible_fraction_hand_worked():
    # window 10: [2, 6) fully inside, [6, 14) half (4 of 8), [14, 20) outside, [9, 11) half
    got = le.visible_fraction([2, 6, 14, 9], [6, 14, 20, 11], window=10)
    np.testing.assert_allclose(got, [1.0, 0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="start < end"):
        le.visible_fraction([3], [3], 10)
    with pytest.raises(ValueError, match="equal length"):
        le.visible_fraction([1, 2], [3], 10)


def test_paragraph_spans_hand_worked():
    spans = le.paragraph_spans(WordTokenizer(), ["a b c", "d e"], prefix="passage: ")
    # <s>=0, passage:=1, a b c = 2..4, d e = 5..6, </s> = 7
    assert spans.tolist() == [[2, 5], [5, 7]]
    assert le.paragraph_spans(WordTokenizer(), ["a b", "c"]).tolist() == [[1, 3], [3, 4]]
    with pytest.raises(ValueError, match="non-empty"):
        le.paragraph_spans(WordTokenizer(), ["a", "  "])


def test_paragraph_spans_real_tokenizer_tile_the_document():
    tok = M3Tokenizer.from_file()
    paras = ["The Normans were a people of northern France.", "Their duchy became a great power.",
             "Ils parlaient le normand, une langue d'oïl."]
    spans = le.paragraph_spans(tok, paras, prefix="passage: ")
    full = tok.encode_ids(["passage: " + "\n\n".join(paras)], 10**6, warn=False)[0]
    assert spans[-1, 1] == len(full) - 1                     # the last paragraph ends right before </s>
    assert np.all(spans[1:, 0] == spans[:-1, 1]) and np.all(spans[:, 1] > spans[:, 0])
    assert spans[0, 0] == len(tok.encode_ids(["passage: "], 99, warn=False)[0]) - 1


def test_training_activation_bytes_hand_worked():
    kw = dict(batch=2, length=4, hidden=3, heads=1, intermediate=5, layers=2, dtype_bytes=1)
    # one layer, batch 2: linear 2*4*(5*3 + 2*5) = 200, quadratic 2*2*1*4*4 = 64 -> 264
    assert le.training_activation_bytes(**kw) == {"stored": 528, "working": 0, "total": 528}
    # recompute: layer inputs 2 layers * 2*4*3 = 48, one layer rebuilt for the whole batch: 264
    assert le.training_activation_bytes(**kw, recompute=True) == {"stored": 48, "working": 264, "total": 312}
    # split-batch: one example at a time, 100 + 32 = 132
    assert le.training_activation_bytes(**kw, recompute=True, sub_batch=1)["working"] == 132
    # splitting without recompute does not reduce what is stored
    assert le.training_activation_bytes(**kw, sub_batch=1)["total"] == 528
    with pytest.raises(ValueError, match="sub_batch"):
        le.training_activation_bytes(**kw, recompute=True, sub_batch=3)
    with pytest.raises(ValueError, match="layers"):
        le.training_activation_bytes(**{**kw, "layers": 0})


@pytest.mark.parametrize("length", [128, 1024, 8192])
def test_training_activation_bytes_matches_layer_model(length):
    e5 = dict(hidden=384, heads=12, intermediate=1536)
    plain = le.training_activation_bytes(4, length, layers=12, **e5)["total"]
    assert plain == 12 * layer_activation_bytes(4, length, **e5)["total"]
    rec = le.training_activation_bytes(4, length, layers=12, recompute=True, sub_batch=1, **e5)
    assert rec["stored"] == 12 * 4 * length * 384 * 4
    assert rec["total"] < plain


def test_evaluate_variants_hand_worked():
    docs = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    q = np.array([[1.0, 0.1], [0.0, 1.0]])
    qrels = {"q1": {"d2": 1}, "q2": {"d3": 1}}
    out = le.evaluate_variants({"v": (q, docs)}, ["q1", "q2"], ["d1", "d2", "d3"], qrels,
                               ("ndcg@10", "recall@1", "recall@10"))
    # q1 scores 1.0, 0.86, 0.1: gold d2 second -> nDCG 1/log2(3); q2 gold d3 first -> 1
    assert out["v"]["ndcg@10"]["q1"] == pytest.approx(1 / math.log2(3))
    assert out["v"]["ndcg@10"]["q2"] == pytest.approx(1.0)
    assert out["v"]["recall@1"] == {"q1": 0.0, "q2": 1.0}
    assert out["v"]["recall@10"] == {"q1": 1.0, "q2": 1.0}
    with pytest.raises(ValueError, match="query / 3 document"):
        le.evaluate_variants({"v": (q[:1], docs)}, ["q1", "q2"], ["d1", "d2", "d3"], qrels)


def test_cached_arrays_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}

    first = le.cached_arrays("k1", compute, root=tmp_path)
    second = le.cached_arrays("k1", compute, root=tmp_path)
    assert len(calls) == 1 and sorted(second) == ["a", "b"]
    np.testing.assert_array_equal(first["a"], second["a"])
    assert not list(tmp_path.glob("*.tmp"))


LONG = "The committee met in Geneva and adopted the new broadcasting standard for colour television. " * 4


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_longdoc_variants_tiny_model(tmp_path, monkeypatch):
    from bgem3_lib.model.mcls import mcls_dense_embedding

    monkeypatch.setattr(le, "cache_dir", lambda: tmp_path)      # not BGEM3_HOME: assets live there
    m = _tiny()
    docs, queries = [LONG, "A short passage about television."], ["where did the committee meet?"]
    out = le.longdoc_variants(m, queries, docs, everies=(16,), max_length=64)
    assert list(out) == ["CLS", "mean", "MCLS-16 (CLS)", "MCLS-16 (mean)"]
    ref = mcls_dense_embedding(m, [m.passage_instruction + d for d in docs], every=16, max_length=64,
                               segment_pooling=("cls", "mean"))
    np.testing.assert_allclose(out["MCLS-16 (CLS)"][1], ref["cls"], atol=1e-6)
    np.testing.assert_allclose(out["MCLS-16 (mean)"][1], ref["mean"], atol=1e-6)
    assert out["CLS"][0].shape == (1, m.config.hidden_size)
    assert len(list((tmp_path / "mcls").glob("*.npz"))) == 3          # queries, plain docs, MCLS-16 docs
    again = le.longdoc_variants(m, queries, docs, everies=(16,), max_length=64)
    np.testing.assert_array_equal(again["mean"][1], out["mean"][1])
    assert le.model_fingerprint(m, heads=False) == le.model_fingerprint(m, heads=False)


@pytest.mark.filterwarnings("ignore:.*truncated")
def test_cli_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(le, "cache_dir", lambda: tmp_path)      # not BGEM3_HOME: assets live there
    out = tmp_path / "r.json"
    assert le.main(["--model", str(tiny_model_dir()), "--langs", "en", "--every", "32", "--max-queries", "12",
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["mean"]) == {"CLS", "mean", "MCLS-32 (CLS)", "MCLS-32 (mean)"}
    assert res["sets"]["en"]["queries"] == 12 and res["sets"]["en"]["documents"] == 48
    assert all(0.0 <= v <= 1.0 for row in res["mean"].values() for v in row.values())
    assert "MCLS-32 (CLS)" in capsys.readouterr().out
