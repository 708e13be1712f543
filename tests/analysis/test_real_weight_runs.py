"""bgem3_lib.analysis.real_weight_runs: the same real e5-small weights through bgem3_lib (MindSpore),
transformers (PyTorch) and MindNLP give the same dense vectors; the answer-recall scoring is right on a
hand-made case.

The agreement test uses ``m3-small-base`` (the assets ``make test`` fetches): the encoder, tokenizer, mean
pooling and ``query: `` / ``passage: `` prefixes of M3-small, without its trained heads, which dense
retrieval does not use. Measured max |Δ| between implementations: 0.9e-7 to 1.6e-7 (float32 rounding of
unit vectors); the bound below leaves 10x room and still catches a dropped prefix, a pooling that counts
padding, or a mis-loaded tensor (all >= 1e-3).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures import xquad

from bgem3_lib.analysis import real_weight_runs as rw

MAX_ABS_DIFF = 2e-6


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return rw.write_hf_directory("m3-small-base", root=tmp_path_factory.mktemp("hf"))


def _texts():
    """Queries and passages of very different lengths (one over 512 tokens), so padding and truncation matter."""
    de, en = xquad("de")["data"][0]["paragraphs"], xquad("en")["data"]
    queries = [de[0]["qas"][0]["question"], xquad("zh")["data"][1]["paragraphs"][0]["qas"][0]["question"], "Wer?"]
    passages = [en[0]["paragraphs"][0]["context"], "Denver Broncos",
                " ".join(p["context"] for p in en[1]["paragraphs"][:5])]
    return queries, passages


def test_hf_directory_holds_the_dense_conventions(hf_dir):
    head = json.loads((hf_dir / "m3_dense.json").read_text())
    assert head["pooling"] == "mean" and head["normalize"] and head["prefixes"] == ["query: ", "passage: "]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["hidden_size"] == 384 and cfg["num_hidden_layers"] == 12
    assert rw.write_hf_directory("m3-small-base", root=hf_dir.parent) == hf_dir    # written once


def test_three_implementations_agree(hf_dir):
    queries, passages = _texts()
    runs = {name: rw.encode_dense(name, hf_dir, queries, passages, cache=False, batch_size=2, query_batch_size=2)
            for name in rw.IMPLEMENTATIONS}
    assert len({r.ids_digest for r in runs.values()}) == 1, "the implementations tokenized differently"
    assert len({r.n_tokens for r in runs.values()}) == 1
    for r in runs.values():
        assert r.queries.shape == (3, 384) and r.passages.shape == (3, 384)
        np.testing.assert_allclose(np.linalg.norm(r.queries, axis=1), 1.0, atol=1e-5)
    diffs = rw.embedding_differences(runs)
    # bgem3_lib adds its own prefixes (encode_queries / encode_corpus), the torch runs those of m3_dense.json:
    # a prefix missing on either side would move the vectors far beyond the bound
    assert (diffs["max |Δ|"] <= MAX_ABS_DIFF).all(), diffs


def test_answer_hits_hand_made():
    # 3 passages; query 0 ranks them 2, 0, 1; query 1 ranks them 1, 2, 0 (inner products below)
    passages = ["The party was fun", "Ridley Scott directed it", "An art exhibition in Paris"]
    p = np.eye(3)
    q = np.array([[0.5, 0.1, 0.9], [0.0, 0.8, 0.3]])
    answers = [["art"], ["party", "Paris"]]
    hits = rw.answer_hits(q, p, passages, answers, ks=(1, 2, 3))
    # query 0: "art" is a word of passage 2 (its top 1) but not of "party"; query 1: "Paris" in its 2nd passage
    assert {k: v.tolist() for k, v in hits.items()} == {1: [True, False], 2: [True, True], 3: [True, True]}
    assert sorted(rw.answer_hits(q, p, passages, answers)) == [20, 100]      # the runner's ANSWER_KS, cut at 3


def test_embedding_differences_rejects_mismatched_runs():
    a = rw.DenseRun("a", np.ones((2, 4)), np.ones((1, 4)), 1.0, 3, "d")
    b = rw.DenseRun("transformers", np.ones((1, 4)), np.ones((1, 4)), 1.0, 3, "d")
    with pytest.raises(ValueError, match="different inputs"):
        rw.embedding_differences({"a": a, "transformers": b})


def test_encode_dense_checks_inputs(hf_dir):
    with pytest.raises(ValueError, match="unknown implementation"):
        rw.encode_dense("onnx", hf_dir, ["a"], ["b"])
    with pytest.raises(ValueError, match="non-empty"):
        rw.encode_dense("transformers", hf_dir, ["a", " "], ["b"])


@pytest.mark.slow
def test_recall_matches_the_evaluation_runner(tmp_path):
    """bgem3_lib's hits equal, question by question, what ``evaluate_set`` (the book's evaluation path) finds
    for the same model on the full 240-paragraph corpus."""
    from bgem3_lib import BGEM3
    from bgem3_lib.evaluation.offline_sets import load_xquad_xling
    from bgem3_lib.evaluation.runner import evaluate_set
    from bgem3_lib.evaluation.subsets import subset_evalset
    es = subset_evalset(load_xquad_xling("de"), n_queries=100, seed=0)
    res = rw.xling_comparison(["de"], n_questions=100, model="m3-small-base",
                              implementations=("bgem3_lib", "transformers"), cache=False)
    per_query = {}
    evaluate_set(BGEM3("m3-small-base"), es, ["dense"], task="xquad-xling", cache_root=tmp_path, per_query=per_query)
    run = res.runs["bgem3_lib"]
    hits = rw.answer_hits(run.queries, run.passages, list(es.corpus.values()), [es.answers[q] for q in es.queries])
    for k, h in hits.items():
        runner = per_query["xquad-xling", "de", "dense", f"answer_recall@{k}"]
        assert list(runner) == list(es.queries)
        assert h.tolist() == [bool(v) for v in runner.values()]
        assert res.table.loc["de", f"R@{k} bgem3_lib"] == pytest.approx(np.mean(list(runner.values())))
    assert res.table.loc["de", "R@20 bgem3_lib"] < 1.0          # a corpus large enough to miss some answers
