"""The evaluation runner: hand-worked five-mode table, real MIRACL / MKQA files end to end with
fake corpora, dense-only models, and bad inputs."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest
from tiny_m3 import TableModel, tiny_model_dir

from bgem3_lib.evaluation.benchmark_data import load_miracl_qrels, load_miracl_topics, mkqa_sample_path
from bgem3_lib.evaluation.offline_sets import EvalSet
from bgem3_lib.evaluation.runner import COLUMNS, IR_METRICS, evaluate_set, limit_queries, run_eval
from bgem3_lib.retrieval.modes import MODES

E = np.eye(2, dtype=np.float32)
# dense / lexical / multi-vector encodings, chosen so every mode ranks differently (see the test)
TABLE = {"A": (E[0], {"1": 1.0}, E[:1]), "B": (np.array([0.6, 0.8], np.float32), {"2": 0.5}, E[1:]),
         "C": (E[1], {"3": 1.0}, np.array([[0.6, 0.8]], np.float32)),
         "Q1": (np.array([0.6, 0.8], np.float32), {"1": 1.0}, E[:1]), "Q2": (E[1], {"2": 1.0}, E[:1])}


def _hand_set() -> EvalSet:
    return EvalSet("hand", "xx", {"q1": "Q1", "q2": "Q2"}, {"a": "A", "b": "B", "c": "C"},
                   {"q1": {"a": 1}, "q2": {"c": 1}}, None, "hand-made")


def test_five_modes_match_hand_worked_ranks(tmp_path):
    # scores (q1 | q2), weights (1, 0.3, 1); rank of the relevant doc in brackets:
    #   dense    A .6 B 1 C .8 -> [3]          | A 0 B .8 C 1 -> [1]
    #   sparse   A 1 B 0 C 0 -> [1]            | A 0 B .5 C 0 -> A, C tie below B, C after A -> [3]
    #   colbert  A 1 B 0 C .6 -> [1]           | same -> C [2]
    #   d+s      A .9 B 1 C .8 -> [2]          | A 0 B .95 C 1 -> [1]
    #   all      A 1.9 B 1 C 1.4 -> [1]        | A 1 B .95 C 1.6 -> [1]
    ranks = {"dense": (3, 1), "sparse": (1, 3), "colbert": (1, 2), "dense+sparse": (2, 1), "all": (1, 1)}
    rows = evaluate_set(TableModel(TABLE), _hand_set(), MODES, weights=(1.0, 0.3, 1.0), cache_root=tmp_path)
    df = pd.DataFrame(rows, columns=COLUMNS)
    assert list(df.columns) == COLUMNS and set(df["mode"]) == set(MODES) and len(df) == 5 * len(IR_METRICS)
    got = df.set_index(["mode", "metric"])["value"]
    for mode, (r1, r2) in ranks.items():
        assert got[mode, "mrr@10"] == pytest.approx((1 / r1 + 1 / r2) / 2, abs=1e-12), mode
        assert got[mode, "ndcg@10"] == pytest.approx((1 / math.log2(r1 + 1) + 1 / math.log2(r2 + 1)) / 2), mode
        assert got[mode, "recall@20"] == got[mode, "recall@100"] == 1.0


def test_dense_only_model_runs_dense_and_says_why(tmp_path, capsys):
    df = run_eval("tydi", TableModel(heads=False), MODES, ["sw"], tmp_path / "out", limit=3, cache_root=tmp_path)
    out = capsys.readouterr().out
    assert "skipping modes sparse, colbert, dense+sparse, all" in out and "dense-only" in out
    assert "MIRACL-style stand-in" in out                                # the set's size note is printed
    assert set(df["mode"]) == {"dense"} and set(df["metric"]) == set(IR_METRICS)
    back = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(back.columns) == COLUMNS and len(back) == len(df)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == back.to_dict(orient="records")


def test_limit_docs_evaluates_a_seeded_sub_corpus(tmp_path, capsys):
    df = run_eval("tydi", TableModel(heads=False), ["dense"], ["sw"], tmp_path / "out", limit=5, limit_docs=12,
                  cache_root=tmp_path)
    out = capsys.readouterr().out
    assert "Subset (seed 0): 5 of" in out and "12 of" in out                 # the note says what was kept
    again = run_eval("tydi", TableModel(heads=False), ["dense"], ["sw"], tmp_path / "out2", limit=5, limit_docs=12,
                     cache_root=tmp_path)
    pd.testing.assert_frame_equal(df, again)                                  # seeded: same subset, same scores


def test_xquad_xling_adds_answer_recall_and_averages(tmp_path):
    df = run_eval("xquad-xling", TableModel(), ["dense", "all"], ["de", "zh"], tmp_path / "o", limit=4,
                  cache_root=tmp_path)
    assert set(df["metric"]) == set(IR_METRICS) | {"answer_recall@20", "answer_recall@100"}
    assert set(df["lang"]) == {"de", "zh", "avg"}
    v = df.set_index(["lang", "mode", "metric"])["value"]
    assert v["avg", "all", "ndcg@10"] == pytest.approx((v["de", "all", "ndcg@10"] + v["zh", "all", "ndcg@10"]) / 2)


def test_per_query_values_are_the_rows_behind_every_mean(tmp_path):
    per_query = {}
    df = run_eval("xquad-xling", TableModel(), ["dense", "all"], ["de", "zh"], tmp_path / "o", limit=4,
                  cache_root=tmp_path, per_query=per_query)
    rows = df[df.lang != "avg"].set_index(["task", "lang", "mode", "metric"])["value"]
    assert set(per_query) == set(rows.index)
    for key, by_qid in per_query.items():
        assert len(by_qid) == 4 and rows[key] == pytest.approx(np.mean(list(by_qid.values()))), key


def _write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(gzip.compress(data.encode()) if gz else data.encode())


@pytest.fixture(scope="module")
def tiny():
    from bgem3_lib import BGEM3
    return BGEM3(str(tiny_model_dir()))


def test_miracl_end_to_end_on_real_topics_with_a_tiny_corpus(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path))
    topics, qrels = load_miracl_topics("yo"), load_miracl_qrels("yo")
    qids = [q for q in topics if q in qrels][:2]
    # relevant passages repeat their query's text; judged non-relevant ones and distractors do not
    rows = [{"docid": d, "title": "", "text": topics[q] if rel else f"Ìwé {d} kò ní ìdáhùn"}
            for q in qids for d, rel in qrels[q].items()]
    rows += [{"docid": f"x{i}", "title": "Àkọlé", "text": f"ọ̀rọ̀ mìíràn nọ́mbà {i}"} for i in range(4)]
    _write_jsonl(tmp_path / "corpora" / "miracl" / "yo" / "docs-0.jsonl.gz", rows, gz=True)
    df = run_eval("miracl", tiny, MODES, ["yo"], tmp_path / "out", limit=2, batch_size=8, max_length=32)
    assert list(pd.read_csv(tmp_path / "out" / "results.csv").columns) == COLUMNS
    assert len(df) == len(MODES) * len(IR_METRICS) and df["value"].between(0, 1).all()
    v = df.set_index(["mode", "metric"])["value"]
    assert v["dense", "mrr@10"] == v["colbert", "mrr@10"] == 1.0      # identical text scores highest
    # a judged document missing from the corpus is named
    _write_jsonl(tmp_path / "corpora" / "miracl" / "yo" / "docs-0.jsonl.gz", rows[1:], gz=True)
    with pytest.raises(ValueError, match="not in the corpus"):
        run_eval("miracl", tiny, ["dense"], ["yo"], tmp_path / "out2", limit=2, max_length=32)


def test_mkqa_end_to_end_with_the_real_sample_and_a_tiny_nq_corpus(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path))
    (tmp_path / "corpora" / "mkqa").mkdir(parents=True)
    (tmp_path / "corpora" / "mkqa" / "mkqa.jsonl.gz").symlink_to(mkqa_sample_path())
    passages = ["Gladiator is a 2000 film directed by Ridley Scott.", "Help Me Help You aired on 18 May 2017.",
                "Hafþór Júlíus Björnsson plays the Mountain.", "Paris is the capital of France.",
                "The Nile is a river in Africa."]
    _write_jsonl(tmp_path / "corpora" / "beir_nq" / "corpus.jsonl",
                 [{"_id": f"doc{i}", "title": "", "text": t} for i, t in enumerate(passages)])
    df = run_eval("mkqa", tiny, ["dense", "sparse", "all"], ["de", "ja"], tmp_path / "out", max_length=32)
    assert set(df["metric"]) == {"answer_recall@20", "answer_recall@100"}
    assert (df["value"] == 1.0).all()                 # 5 passages: each answer is within the top 20


def test_missing_corpus_and_bad_inputs_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path))
    model = TableModel(TABLE)
    with pytest.raises(FileNotFoundError, match="MIRACL corpus for 'sw' not found.*miracl-corpus"):
        run_eval("miracl", model, ["dense"], ["sw"], tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="BEIR-NQ corpus not found"):
        run_eval("mkqa", model, ["dense"], ["de"], tmp_path / "o")
    with pytest.raises(ValueError, match="unknown task 'msmarco'"):
        run_eval("msmarco", model, ["dense"])
    with pytest.raises(ValueError, match=r"unknown tydi language\(s\) \['xx'\]"):
        run_eval("tydi", model, ["dense"], ["sw", "xx"])
    with pytest.raises(ValueError, match="unknown mode"):
        run_eval("tydi", model, ["bm25"], ["sw"])
    es = _hand_set()
    with pytest.raises(ValueError, match="empty corpus"):
        evaluate_set(model, limit_queries(EvalSet("h", "xx", es.queries, {}, es.qrels, None, ""), 1), ["dense"],
                     weights=(1, 0, 0), cache_root=tmp_path)
    bad = EvalSet("h", "xx", es.queries, es.corpus, {"q1": {"a": 1}, "q2": {"zz": 1}}, None, "")
    with pytest.raises(ValueError, match=r"not in the corpus.*\('q2', 'zz'\)"):
        evaluate_set(model, bad, ["dense"], weights=(1, 0, 0), cache_root=tmp_path)


def test_check_langs_keeps_each_language_once():
    from bgem3_lib.evaluation.runner import check_langs
    assert check_langs("tydi", ["sw", "en", "sw"]) == ("sw", "en")
    with pytest.raises(ValueError, match="unknown tydi language"):
        check_langs("tydi", ["sw", "xx"])


def test_a_book_build_reuses_an_evaluation_it_already_ran_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BGEM3_BUILD_ID", "build-1")
    model, calls, w = TableModel(TABLE), [], (1.0, 0.3, 1.0)
    real = model.encode_queries
    model.encode_queries = lambda *a, **k: calls.append(1) or real(*a, **k)

    def run(es=None, modes=MODES, weights=w, per_query=None):
        return evaluate_set(model, es or _hand_set(), modes, weights=weights, cache_root=tmp_path,
                            per_query=per_query)

    pq1, pq2 = {}, {}
    first, again = run(per_query=pq1), run(per_query=pq2)
    assert len(calls) == 1 and again == first and pq2 == pq1 and len(pq1) == 5 * len(IR_METRICS)
    changed = _hand_set()
    changed.qrels["q1"] = {"b": 1}
    run(weights=(1.0, 0.3, 0.5)), run(es=changed), run(modes=["dense"])     # each one a new result
    assert len(calls) == 4
    assert run(es=changed) != first and len(calls) == 4
    model._bgem3_fingerprint = "other weights"
    run()
    assert len(calls) == 5
    monkeypatch.delenv("BGEM3_BUILD_ID")                                      # outside a build: never reused
    assert run() == first and len(calls) == 6
    monkeypatch.setenv("BGEM3_BUILD_ID", "build-2")                           # another build: computed again
    run()
    assert len(calls) == 7
