"""Tests for bgem3_lib.evaluation.subsets on a hand-made set and on real TyDi GoldP (bn)."""
from __future__ import annotations

import pytest

from bgem3_lib.evaluation.offline_sets import EvalSet, load_tydi
from bgem3_lib.evaluation.subsets import subset_evalset


def _toy():
    queries = {f"q{i}": f"question {i}" for i in range(6)}
    corpus = {f"d{i}": f"doc {i}" for i in range(10)}
    qrels = {f"q{i}": {f"d{2 * i % 10}": 1} for i in range(6)}
    answers = {f"q{i}": [f"a{i}"] for i in range(6)}
    return EvalSet("toy", "en", queries, corpus, qrels, answers, "toy", answers_native=dict(answers))


def test_keeps_gold_documents_order_and_sizes():
    es = _toy()
    sub = subset_evalset(es, n_queries=3, n_docs=5, seed=1)
    assert len(sub.queries) == 3 and len(sub.corpus) == 5
    assert list(sub.queries) == [q for q in es.queries if q in sub.queries]      # original order
    assert list(sub.corpus) == [d for d in es.corpus if d in sub.corpus]
    for q in sub.queries:
        assert set(sub.qrels[q]) == set(es.qrels[q]) and set(sub.qrels[q]) <= set(sub.corpus)
        assert sub.answers[q] == es.answers[q] and sub.answers_native[q] == es.answers_native[q]
    assert set(sub.answers) == set(sub.queries) and "Subset" in sub.note


def test_deterministic_and_seed_dependent():
    es = _toy()
    a, b = subset_evalset(es, 3, 5, seed=0), subset_evalset(es, 3, 5, seed=0)
    assert (a.queries, a.corpus) == (b.queries, b.corpus)
    others = {tuple(subset_evalset(es, 3, 5, seed=s).queries) for s in range(8)}
    assert len(others) > 1


def test_n_docs_below_gold_keeps_all_gold_and_none_means_all():
    es = _toy()
    sub = subset_evalset(es, n_queries=4, n_docs=1)
    gold = {d for q in sub.queries for d in es.qrels[q]}
    assert len(sub.queries) == 4 and set(sub.corpus) == gold     # the distinct gold documents, nothing else
    full = subset_evalset(es)
    assert full.queries == es.queries and full.corpus == es.corpus and full.qrels == es.qrels


def test_bad_input():
    es = _toy()
    with pytest.raises(ValueError, match="n_queries"):
        subset_evalset(es, n_queries=0)
    with pytest.raises(ValueError, match="n_docs"):
        subset_evalset(es, n_docs=2.5)
    with pytest.raises(TypeError):
        subset_evalset({"queries": {}})


def test_real_tydi_subset():
    es = load_tydi("bn")
    sub = subset_evalset(es, n_queries=20, n_docs=40, seed=0)
    assert len(sub.queries) == 20 and len(sub.corpus) == 40
    assert all(next(iter(sub.qrels[q])) in sub.corpus for q in sub.queries)
