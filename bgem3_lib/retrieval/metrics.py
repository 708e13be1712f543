"""Retrieval metrics of the paper's evaluations: nDCG@k, Recall@k, MRR@k and MKQA answer recall.

The IR metrics are computed by ``trec_eval`` itself (through ``pytrec_eval``, package
``pytrec-eval-terrier``), so numbers match the MIRACL / MLDR leaderboards' tooling:

* ``ndcg@k``   -> trec_eval ``ndcg_cut.k``: gain = graded relevance (linear, not ``2^rel - 1``),
  discount ``1 / log2(rank + 1)``, ideal ranking = all judged documents sorted by relevance.
* ``recall@k`` -> trec_eval ``recall.k``: relevant (rel >= 1) in the top k / all relevant.
* ``mrr@k``    -> trec_eval ``recip_rank`` on the run cut to its top k (same as ``trec_eval -M k``).

Ties. trec_eval does not use the run's order: it sorts each query's documents by score
descending and breaks equal scores by **docid descending** (string comparison), e.g. scores
``{"a": 1.0, "b": 1.0}`` are ranked ``b, a``. A run whose scores tie therefore gets a rank order
decided by document names. :func:`run_from_scores` avoids this: it ranks by score with ties
broken by corpus order and stores strictly decreasing rank values (k, k-1, ..., 1), so trec_eval's
tie rule never fires. :func:`trec_order` reproduces trec_eval's sort for inspection.

Queries judged in ``qrels`` but absent from the run score 0 (as ``trec_eval -c``, which the
MIRACL evaluation uses); run queries without judgements are ignored.

MKQA answer recall (:func:`answer_recall_at_k`): a query is a hit when one of its top-k passages
contains one of its answers as a contiguous token sequence. Texts are NFD-normalised,
lower-cased and split into unicode words: runs of ``\\w`` characters *and combining marks*.
Plain ``\\w+`` would cut Hindi/Thai/Khmer words at every vowel sign (category Mc/Mn), so marks are
kept inside words; accents therefore still matter (``"jose"`` does not match ``"José"``), while
composed and decomposed spellings of ``"José"`` match each other. Scripts written without spaces
(zh, ja, th, km) give one token per unbroken run, so an answer matches there only as a whole run:
MKQA's passages are English, which is why its recall uses the English answers.

>>> run = {"q1": {"d1": 2.0, "d2": 1.0}}
>>> qrels = {"q1": {"d2": 1}}
>>> evaluate_run(run, qrels, ("mrr@10", "recall@1"))
{'mrr@10': {'q1': 0.5}, 'recall@1': {'q1': 0.0}}
>>> answer_recall_at_k([["The party was fun"], ["Ridley Scott directed it"]], [["art"], ["ridley scott"]], 1)
0.5
"""
from __future__ import annotations

import functools
import math
import re
import sys
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np

from .index import top_k

DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
_METRIC_RE = re.compile(r"^(ndcg|recall|mrr)@([1-9][0-9]*)$")
_TREC_NAMES = {"ndcg": "ndcg_cut", "recall": "recall"}

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; ValueError for anything else."""
    m = _METRIC_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown metric {name!r}: expected 'ndcg@k', 'recall@k' or 'mrr@k' with k >= 1")
    return m.group(1), int(m.group(2))


def trec_order(doc_scores: Mapping[str, float]) -> list[str]:
    """Docids in the order trec_eval ranks them: score descending, then docid descending.

    >>> trec_order({"a": 1.0, "c": 0.5, "b": 1.0})
    ['b', 'a', 'c']
    """
    return [d for d, _ in sorted(doc_scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def _clean_run(run: Run) -> dict[str, dict[str, float]]:
    if not isinstance(run, Mapping) or not run:
        raise ValueError("run must be a non-empty dict {qid: {docid: score}}")
    out = {}
    for qid, docs in run.items():
        if not isinstance(docs, Mapping):
            raise TypeError(f"run[{qid!r}] must be a dict {{docid: score}}, got {type(docs).__name__}")
        row = {}
        for docid, score in docs.items():
            if not isinstance(score, (int, float, np.integer, np.floating)) or isinstance(score, bool):
                raise TypeError(f"run[{qid!r}][{docid!r}] must be a number, got {type(score).__name__}")
            if not math.isfinite(float(score)):
                raise ValueError(f"run[{qid!r}][{docid!r}] is not finite: {score}")
            row[str(docid)] = float(score)
        out[str(qid)] = row
    return out


def _clean_qrels(qrels: Qrels) -> dict[str, dict[str, int]]:
    if not isinstance(qrels, Mapping) or not qrels:
        raise ValueError("qrels must be a non-empty dict {qid: {docid: relevance}}")
    out = {}
    for qid, docs in qrels.items():
        if not isinstance(docs, Mapping) or not docs:
            raise ValueError(f"qrels[{qid!r}] must be a non-empty dict {{docid: int relevance}}")
        row = {}
        for docid, rel in docs.items():
            if not isinstance(rel, (int, np.integer)) or isinstance(rel, bool):
                raise TypeError(f"qrels[{qid!r}][{docid!r}] must be an int relevance, got {rel!r}")
            row[str(docid)] = int(rel)
        out[str(qid)] = row
    return out


def evaluate_run(run: Run, qrels: Qrels, metrics: Sequence[str] = DEFAULT_METRICS,
                 ) -> dict[str, dict[str, float]]:
    """Per-query metric values, ``{metric: {qid: value}}`` over every judged qid.

    ``run``: ``{qid: {docid: score}}`` (higher = better); ``qrels``: ``{qid: {docid: int}}``.
    Use :func:`mean_scores` for the averages reported in tables.
    """
    import pytrec_eval  # local: only evaluation needs the C extension

    if isinstance(metrics, str):
        metrics = (metrics,)
    parsed = [parse_metric(m) for m in metrics]
    if not parsed:
        raise ValueError("metrics must name at least one metric")
    run, qrels = _clean_run(run), _clean_qrels(qrels)
    out: dict[str, dict[str, float]] = {}

    cut = {f"{_TREC_NAMES[kind]}.{k}" for kind, k in parsed if kind != "mrr"}
    if cut:
        res = pytrec_eval.RelevanceEvaluator(qrels, cut).evaluate(run)
        for (kind, k), name in zip(parsed, metrics):
            if kind != "mrr":
                key = f"{_TREC_NAMES[kind]}_{k}"
                out[name] = {q: float(res[q][key]) if q in res else 0.0 for q in qrels}
    for (kind, k), name in zip(parsed, metrics):
        if kind == "mrr":
            top = {q: {d: docs[d] for d in trec_order(docs)[:k]} for q, docs in run.items()}
            res = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top)
            out[name] = {q: float(res[q]["recip_rank"]) if q in res else 0.0 for q in qrels}
    return {name: out[name] for name in metrics}


def mean_scores(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{metric: {qid: value}}`` -> ``{metric: mean over queries}``."""
    return {m: float(np.mean(list(v.values()))) if v else float("nan") for m, v in per_query.items()}


def run_from_scores(scores: np.ndarray, qids: Sequence[str], docids: Sequence[str], k: int = 100,
                    ) -> dict[str, dict[str, float]]:
    """Score matrix [Nq, Nd] -> trec run of the top k per query with tie-free rank values.

    Stored values are ``k', k'-1, ..., 1`` (k' = min(k, Nd)) so trec_eval keeps exactly our
    order (score desc, ties by corpus order: :func:`~bgem3_lib.retrieval.index.top_k`) instead of
    re-breaking ties by docid.

    >>> run_from_scores(np.array([[0.2, 0.7, 0.7]]), ["q"], ["a", "b", "c"], k=2)
    {'q': {'b': 2.0, 'c': 1.0}}
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape != (len(qids), len(docids)):
        raise ValueError(f"scores shape {scores.shape} != (len(qids), len(docids)) = "
                         f"({len(qids)}, {len(docids)})")
    if len(set(docids)) != len(docids):
        raise ValueError("docids contain duplicates")
    idx, _ = top_k(scores, k)
    n = idx.shape[1]
    return {str(q): {str(docids[j]): float(n - r) for r, j in enumerate(row)} for q, row in zip(qids, idx)}


# ---------------------------------------------------------------- MKQA answer recall

@functools.lru_cache(maxsize=1)
def _word_re() -> re.Pattern:
    """``(?:\\w|mark)+`` where mark = any unicode category M* code point (built once, ~0.5 s)."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        is_mark = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith("M")
        if is_mark and start is None:
            start = cp
        elif not is_mark and start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
            start = None
    return re.compile(r"(?:\w|[" + "".join(ranges) + r"])+")


def answer_tokens(text: str) -> tuple[str, ...]:
    """NFD-normalise, lower-case, split into unicode words (marks kept inside words).

    >>> answer_tokens("The Mountain, 18/05/2017!")
    ('the', 'mountain', '18', '05', '2017')
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return _tokens(text)


@functools.lru_cache(maxsize=1 << 16)
def _tokens(text: str) -> tuple[str, ...]:  # cached: the same top passages recur across queries
    return tuple(_word_re().findall(unicodedata.normalize("NFD", text).lower()))


def contains_tokens(passage: Sequence[str], answer: Sequence[str]) -> bool:
    """True when ``answer`` occurs in ``passage`` as a contiguous token sequence."""
    n = len(answer)
    if n == 0:
        return False
    first = answer[0]
    return any(passage[i] == first and tuple(passage[i:i + n]) == tuple(answer)
               for i in range(len(passage) - n + 1))


def answer_hits_at_k(ranked_passage_texts: Sequence[Sequence[str]], answers: Sequence[Sequence[str]],
                     k: int) -> np.ndarray:
    """[Nq] bool: does any of the first k passages of query i contain any answer of query i?

    ``ranked_passage_texts[i]``: passages of query i, best first (fewer than k is allowed).
    ``answers[i]``: answer strings (with aliases); at least one must contain a word.
    """
    if len(ranked_passage_texts) != len(answers):
        raise ValueError(f"{len(ranked_passage_texts)} passage lists but {len(answers)} answer lists")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    hits = np.zeros(len(answers), dtype=bool)
    for i, (passages, alts) in enumerate(zip(ranked_passage_texts, answers)):
        if isinstance(passages, str) or isinstance(alts, str):
            raise TypeError(f"query {i}: passages and answers must be lists of strings, not a string")
        toks = [t for t in dict.fromkeys(answer_tokens(a) for a in alts) if t]
        if not toks:
            raise ValueError(f"query {i}: no answer with at least one word ({list(alts)!r}); "
                             "drop unanswerable queries before computing answer recall")
        for passage in list(passages)[:k]:
            ptoks = answer_tokens(passage)
            if any(contains_tokens(ptoks, t) for t in toks):
                hits[i] = True
                break
    return hits


def answer_recall_at_k(ranked_passage_texts: Sequence[Sequence[str]], answers: Sequence[Sequence[str]],
                       k: int) -> float:
    """MKQA Recall@k: fraction of queries with an answer string in one of their top-k passages."""
    if not answers:
        raise ValueError("answer recall needs at least one query")
    return float(answer_hits_at_k(ranked_passage_texts, answers, k).mean())
