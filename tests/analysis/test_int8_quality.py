"""bgem3_lib.analysis.int8_quality / int8_engines: ``agreement`` against hand-computed values and itself, the quality
pipeline (exhaustive scores, per-query metrics, bootstrap deltas, table) on hand-made encodings, the errors on bad
input, and ``encode_all`` of a tiny random model in float32 and int8 (two subprocesses, no ONNX export)."""
from __future__ import annotations

import numpy as np
import pytest
from tiny_m3 import tiny_model_dir

from bgem3_lib.analysis import int8_quality as iq
from bgem3_lib.evaluation.offline_sets import EvalSet
from bgem3_lib.kernels import int8 as qk


def _enc(dense, lexical, colbert) -> dict:
    return {"dense_vecs": np.asarray(dense, np.float32), "lexical_weights": lexical,
            "colbert_vecs": [np.asarray(c, np.float32) for c in colbert]}


def test_agreement_matches_a_hand_computed_case():
    a = _enc([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]], [{"1": 2.0, "2": 1.0}, {"7": 1.0}, {}],
             [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]], [[2.0, 0.0]]])
    b = _enc([[4.0, 3.0], [-1.0, 0.0], [0.0, 2.0]], [{"1": 1.0, "3": 1.0}, {"7": 1.0}, {"9": 0.5}],
             [[[1.0, 0.0], [1.0, 0.0]], [[1.0, -1.0]], [[0.0, 3.0]]])
    r = iq.agreement(a, b)
    # dense cosines 24/25, -1, 1; lexical sets {1,2}/{1,3} -> 1/3, {7}/{7} -> 1, {}/{9} -> 0
    assert r["dense_cos_mean"] == pytest.approx((0.96 - 1 + 1) / 3) and r["dense_cos_min"] == pytest.approx(-1)
    assert r["dense_max_abs"] == pytest.approx(2.0)
    assert r["lexical_jaccard"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    # weighted: min(2,1)+0+0 / (2+1+1) = 1/4; 1; 0 / 0.5 = 0
    assert r["lexical_weighted"] == pytest.approx((0.25 + 1 + 0) / 3)
    # token cosines 1, 0 | 0 | 0 -> mean over the 4 tokens
    assert r["colbert_cos"] == pytest.approx(0.25)


def test_identical_encodings_agree_fully():
    rng = np.random.default_rng(0)
    e = _enc(rng.standard_normal((4, 8)), [{"5": 0.3, "6": 1.2}, {}, {"9": 0.1}, {"5": 2.0}],
             [rng.standard_normal((n, 8)) for n in (1, 3, 2, 5)])
    r = iq.agreement(e, e)
    assert r["dense_max_abs"] == 0.0
    for key in ("dense_cos_mean", "dense_cos_min", "lexical_jaccard", "lexical_weighted", "colbert_cos"):
        assert r[key] == pytest.approx(1.0, abs=1e-12), key


def test_bad_inputs_raise_clear_errors():
    e = _enc(np.eye(2), [{}, {}], [np.ones((1, 2))] * 2)
    three = _enc(np.eye(3), [{}] * 3, [np.ones((1, 3))] * 3)
    with pytest.raises(ValueError, match="a has 2 texts and b 3: agreement compares encodings of the same"):
        iq.agreement(e, three)
    with pytest.raises(ValueError, match="one entry per text"):
        iq.agreement({**e, "lexical_weights": [{}]}, e)
    with pytest.raises(ValueError, match="must be a dict of"):
        iq.agreement({"dense_vecs": np.eye(2)}, e)
    with pytest.raises(ValueError, match=r"text 1: ColBERT shapes differ"):
        iq.agreement(e, {**e, "colbert_vecs": [np.ones((1, 2)), np.ones((2, 2))]})
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        iq.encode_all("tensorrt", ["q"], ["p"])
    with pytest.raises(ValueError, match="not a single string"):
        iq.encode_all("bgem3_lib-int8", "a query", ["p"])
    with pytest.raises(ValueError, match="blank"):
        iq.encode_all("bgem3_lib-int8", ["q", " "], ["p"])
    evalset, _ = _toy()
    with pytest.raises(ValueError, match="encoded 2 queries and 3 passages; the sets have 3 queries"):
        iq.retrieval_quality(iq.Encodings("x", _enc(np.eye(5, 3), [{}] * 5, [np.ones((1, 3))] * 5), 2), [evalset])


def _toy():
    """3 questions, 3 paragraphs; float32 ranks every gold paragraph first in all modes."""
    corpus = {"a": "Paris is the capital of France", "b": "Berlin lies on the Spree", "c": "Rome has seven hills"}
    evalset = EvalSet("xquad-xling", "de", {"q1": "x", "q2": "y", "q3": "z"}, corpus,
                      {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 1}},
                      {"q1": ["Paris"], "q2": ["Spree"], "q3": ["seven hills"]}, "toy")
    eye = np.eye(3, dtype=np.float32)
    lex = [{str(10 + i): 1.0} for i in range(3)]
    vecs = _enc(np.vstack([eye, eye]), lex + lex, [eye[i:i + 1] for i in range(3)] * 2)
    enc = iq.Encodings("bgem3_lib-float32", vecs, n_queries=3, seconds=2.0, n_tokens=100)
    return evalset, enc


def test_retrieval_quality_and_compare_on_hand_made_encodings():
    evalset, fp = _toy()
    per_query = iq.retrieval_quality(fp, [evalset])
    assert set(per_query) == {("xquad-xling", "de", mode, m) for mode in iq.MODES for m in iq.METRICS}
    assert all(v == {"q1": 1.0, "q2": 1.0, "q3": 1.0} for v in per_query.values())
    # int8 stand-in: question 3's vectors point at paragraph 1 in every mode -> its metrics drop to 0
    q8 = {k: list(v) if isinstance(v, list) else v.copy() for k, v in fp.out.items()}
    q8["dense_vecs"][2], q8["lexical_weights"][2], q8["colbert_vecs"][2] = [1, 0, 0], {"10": 1.0}, np.eye(3)[:1]
    q8 = iq.Encodings("bgem3_lib-int8", q8, 3, seconds=1.0, n_tokens=100)
    rows = iq.compare({"bgem3_lib-float32": fp, "bgem3_lib-int8": q8}, [evalset], n_boot=200)
    r = rows["bgem3_lib-int8"]
    assert r["vs"] == "bgem3_lib-float32" and r["tokens_per_second"] == 100.0
    assert r["dense_cos_min"] == pytest.approx(0.0) and r["lexical_jaccard"] == pytest.approx(5 / 6)
    for mode in iq.MODES:
        assert r[f"{mode} answer_recall@20"] == pytest.approx(1.0)          # 3 paragraphs: all in the top 20
        assert r[f"{mode} Δndcg@10"]["diff"] == pytest.approx((0.5 - 1) / 3)      # gold now 3rd: 1/log2(4)
        assert r[f"{mode} Δanswer_recall@20"] == {"diff": 0.0, "low": 0.0, "high": 0.0}
    shown = iq.table(rows)
    assert list(shown.columns) == ["bgem3_lib-float32", "bgem3_lib-int8 (vs bgem3_lib-float32)"]
    assert shown.loc["dense nDCG@10", "bgem3_lib-int8 (vs bgem3_lib-float32)"] == "83.3"
    assert shown.loc["encode s / tokens/s", "bgem3_lib-float32"] == "2.0 / 50"
    assert "largest |Δ| 16.7 points (<= 0.5: NO)" in iq.acceptance(rows)[0]


def test_compare_refuses_an_ort_export_of_another_model():
    evalset, fp = _toy()
    other = iq.Encodings("ort-float32", {**fp.out, "dense_vecs": fp.out["dense_vecs"] + 1e-3}, 3, 1.0, 100)
    with pytest.raises(RuntimeError, match="ORT float32 disagrees with bgem3_lib float32"):
        iq.compare({"bgem3_lib-float32": fp, "ort-float32": other}, [evalset], n_boot=10)


@pytest.mark.skipif(not qk.available(), reason="int8 CPU kernels not available here")
def test_int8_encodings_of_a_tiny_model_stay_close_to_float32():
    queries = ["Wer schrieb Faust?", "東京は日本の首都です。", "x"]
    passages = ["Goethe schrieb den Faust in zwei Teilen.", "BGE M3 is an embedding model " * 3]
    runs = {e: iq.encode_all(e, queries, passages, model=str(tiny_model_dir()), cache=False, batch_size=2)
            for e in ("bgem3_lib-float32", "bgem3_lib-int8")}
    fp, q8 = runs["bgem3_lib-float32"], runs["bgem3_lib-int8"]
    assert fp.out["dense_vecs"].shape == (5, 32) and fp.n_queries == 3 and len(q8.out["colbert_vecs"]) == 5
    assert fp.n_tokens == q8.n_tokens > 5 and fp.seconds > 0
    r = iq.agreement(fp.out, q8.out)
    assert r["dense_cos_mean"] > 0.99 and r["dense_cos_min"] > 0.99 and r["colbert_cos"] > 0.99
    assert r["lexical_jaccard"] > 0.9 and 0 < r["dense_max_abs"] < 0.1


@pytest.mark.slow
@pytest.mark.skipif(not qk.available(), reason="int8 CPU kernels not available here")
def test_ort_engines_export_a_mean_pooled_model_with_its_prefixes(tmp_path):
    """The ORT path end to end on a tiny mean-pooled model with e5 prefixes: BAAI layout (heads as .pt by torch),
    the mean-pooled export and its quantization; ORT float32 matches bgem3_lib float32, int8 stays close."""
    import json
    import shutil
    model = tmp_path / "tiny-mean-e5"
    shutil.copytree(tiny_model_dir(), model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "pooling": "mean"}))
    (model / "e5_prefixes").write_text(json.dumps(["query: ", "passage: "]))
    layout = iq.m3_layout(str(model))
    assert all((layout / f).is_file() for f in ("colbert_linear.pt", "sparse_linear.pt", "model.safetensors"))
    assert json.loads((layout / "m3_dense.json").read_text())["pooling"] == "mean"
    queries, passages = ["Wer schrieb Faust?", "x"], ["Goethe schrieb den Faust.", "BGE M3 " * 30]
    runs = {e: iq.encode_all(e, queries, passages, model=str(model), cache=False, batch_size=2) for e in iq.ENGINES}
    assert len({r.n_tokens for r in runs.values()}) == 1                  # the same prefixed, cut texts everywhere
    same = iq.agreement(runs["bgem3_lib-float32"].out, runs["ort-float32"].out)
    assert same["dense_max_abs"] <= iq.ORT_TOL and same["lexical_jaccard"] == 1.0 and same["colbert_cos"] > 0.9999
    assert iq.agreement(runs["ort-float32"].out, runs["ort-int8"].out)["dense_cos_mean"] > 0.98
    assert iq.onnx_models(layout)[0].parent.name == "onnx-mean"
