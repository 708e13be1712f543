"""Seeded sub-sets of an :class:`~bgem3_lib.evaluation.offline_sets.EvalSet`: fewer queries and a smaller corpus that
still holds every chosen query's relevant documents (so no query loses its answer by sub-sampling).

Used where a notebook's quick mode must encode a corpus in seconds. A smaller corpus makes retrieval
easier (fewer distractors), so scores on a subset are only comparable with scores on the *same* subset.

>>> from bgem3_lib.evaluation.offline_sets import EvalSet
>>> es = EvalSet("toy", "en", {"q1": "a", "q2": "b"}, {"d1": "x", "d2": "y", "d3": "z"},
...              {"q1": {"d2": 1}, "q2": {"d3": 1}}, None, "toy set")
>>> sub = subset_evalset(es, n_queries=1, n_docs=2, seed=0)
>>> len(sub.queries), len(sub.corpus), all(d in sub.corpus for r in sub.qrels.values() for d in r)
(1, 2, True)
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .offline_sets import EvalSet


def subset_evalset(es: EvalSet, n_queries: int | None = None, n_docs: int | None = None, seed: int = 0) -> EvalSet:
    """``n_queries`` seeded queries (all when None or larger), their relevant documents, and seeded
    other documents up to ``n_docs`` in total (never fewer than the relevant ones; all when None).
    Queries and documents keep their original order; qrels and answers are restricted to the kept
    queries (and qrels to kept documents). The note says what was kept.
    """
    if not isinstance(es, EvalSet):
        raise TypeError(f"expected an EvalSet, got {type(es).__name__}")
    for name, v in (("n_queries", n_queries), ("n_docs", n_docs)):
        if v is not None and (int(v) != v or v < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {v}")
    if not es.queries or not es.corpus:
        raise ValueError(f"{es.name} [{es.lang}]: empty queries or corpus, nothing to sub-sample")
    rng = np.random.default_rng([int(seed), 11])
    qids = list(es.queries)
    if n_queries is not None and n_queries < len(qids):
        pick = set(rng.choice(len(qids), size=int(n_queries), replace=False).tolist())
        qids = [q for i, q in enumerate(qids) if i in pick]
    docids = list(es.corpus)
    gold = {d for q in qids for d in (es.qrels or {}).get(q, {}) if d in es.corpus}
    keep = set(docids)
    if n_docs is not None and n_docs < len(docids):
        others = [d for d in docids if d not in gold]
        extra = max(0, int(n_docs) - len(gold))
        chosen = rng.choice(len(others), size=min(extra, len(others)), replace=False).tolist()
        keep = gold | {others[i] for i in chosen}
    corpus = {d: es.corpus[d] for d in docids if d in keep}

    def restrict(table):
        return None if table is None else {q: table[q] for q in qids if q in table}

    qrels = {q: {d: r for d, r in es.qrels[q].items() if d in corpus} for q in qids if q in (es.qrels or {})}
    note = (f"Subset (seed {seed}): {len(qids)} of {len(es.queries)} queries, {len(corpus)} of {len(es.corpus)} "
            f"documents (all relevant documents of the kept queries included).\n{es.note}")
    return replace(es, queries={q: es.queries[q] for q in qids}, corpus=corpus, qrels=qrels,
                   answers=restrict(es.answers), answers_native=restrict(es.answers_native), note=note)
