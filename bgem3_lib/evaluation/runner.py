"""The evaluation runner: encode, search in each retrieval mode, score, write a tidy table.

``run_eval(task, model, modes)`` evaluates one task in every requested language and writes
``out_dir/results.csv`` and ``results.json`` with exactly the columns ``task, lang, mode, metric, value``
(plus rows ``lang="avg"``, the mean over the languages evaluated, when there are several).

==================  ===========================================  ========================================
task                queries / corpus                              metrics
==================  ===========================================  ========================================
``miracl``          MIRACL dev topics+qrels / user's corpus       ndcg@10, recall@20, recall@100, mrr@10
``mkqa``            MKQA (user's file) / user's BEIR-NQ corpus    answer_recall@20, answer_recall@100
``tydi``            :func:`~bgem3_lib.evaluation.offline_sets.load_tydi`     ndcg@10, recall@20, recall@100, mrr@10
``xquad-xling``     :func:`~bgem3_lib.evaluation.offline_sets.load_xquad_xling`  the four above + answer_recall@20/100
``xquad-longdoc``   :func:`~bgem3_lib.evaluation.offline_sets.load_xquad_longdoc` ndcg@10, recall@20, recall@100, mrr@10
==================  ===========================================  ========================================

Modes are those of :class:`~bgem3_lib.retrieval.retriever.HybridRetriever`; the hybrid weights default to the
paper's for the benchmark each task mirrors (:data:`WEIGHT_TABLE`, values in
:data:`~bgem3_lib.retrieval.modes.PAPER_WEIGHTS`). A
dense-only model (``model.heads is None``, e.g. ``m3-small-base``) is evaluated in ``dense`` only and
the skipped modes are reported. Queries go through ``model.encode_queries``, passages through
``model.encode_corpus`` via the on-disk cache of :mod:`bgem3_lib.evaluation.corpus_cache` (sharded when asked).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ..model.fingerprint import model_fingerprint
from ..paths import file_lock, publish_set
from ..retrieval.metrics import answer_hits_at_k, answer_tokens, evaluate_run, mean_scores
from ..retrieval.modes import NEEDS, needed_representations, paper_weights, parse_modes
from . import benchmark_data as bd
from .build_results import build_folder, result_key, reuse_in_build
from .corpus_cache import corpus_encodings, model_reps
from .distributed import resolve_shard
from .offline_sets import (
    TYDI_LANGS,
    XQUAD_LANGS,
    XQUAD_XLING_LANGS,
    EvalSet,
    describe,
    load_tydi,
    load_xquad_longdoc,
    load_xquad_xling,
)
from .search_backend import MEMORY, SearchBackend

log = logging.getLogger(__name__)

TASKS = ("miracl", "mkqa", "tydi", "xquad-xling", "xquad-longdoc")
TASK_LANGS = {"miracl": bd.MIRACL_LANGS, "mkqa": bd.MKQA_LANGS, "tydi": TYDI_LANGS,
              "xquad-xling": XQUAD_XLING_LANGS, "xquad-longdoc": XQUAD_LANGS}
WEIGHT_TABLE = {"miracl": "miracl", "tydi": "miracl", "mkqa": "mkqa", "xquad-xling": "mkqa",
                "xquad-longdoc": "mldr"}
IR_METRICS = ("ndcg@10", "recall@20", "recall@100", "mrr@10")
ANSWER_TASKS = ("mkqa", "xquad-xling")          # MKQA's answer-match recall; MIRACL / MLDR do not use it
ANSWER_KS = (20, 100)
COLUMNS = ["task", "lang", "mode", "metric", "value"]


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def check_langs(task: str, langs: Sequence[str] | None) -> tuple[str, ...]:
    """The languages to run (all of the task's when None); ValueError naming unknown ones."""
    known = TASK_LANGS[check_task(task)]
    if langs is None:
        return tuple(known)
    langs = tuple(dict.fromkeys(langs))                  # "de,de" runs German once
    bad = [lang for lang in langs if lang not in known]
    if bad or not langs:
        raise ValueError(f"unknown {task} language(s) {bad or '(none given)'}; known: {', '.join(known)}")
    return langs


def default_weights(task: str, mode: str) -> tuple[float, float, float]:
    """The paper's (w_dense, w_sparse, w_colbert) for ``mode`` on the benchmark ``task`` mirrors."""
    return paper_weights(WEIGHT_TABLE[check_task(task)], mode)


def split_modes(model, modes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(modes the model can run, modes skipped because it lacks sparse / ColBERT heads)."""
    modes = parse_modes(modes)
    can = set(model_reps(model))
    run = [m for m in modes if all(r in can for r in NEEDS[m])]
    return run, [m for m in modes if m not in run]


# ---------------------------------------------------------------- loading a task's evaluation set

def _miracl(lang: str) -> EvalSet:
    topics, qrels = bd.load_miracl_topics(lang), bd.load_miracl_qrels(lang)
    queries = {q: t for q, t in topics.items() if q in qrels}
    corpus = bd.load_miracl_corpus(lang)
    note = (f"MIRACL v1.0 dev ({lang}): {len(queries)} judged topics against the {len(corpus)} passages "
            f"found in {bd.miracl_corpus_dir(lang)} (the full benchmark if that is the whole corpus).")
    return EvalSet("miracl", lang, queries, corpus, {q: qrels[q] for q in queries}, None, note)


def _mkqa(lang: str, nq_corpus: dict[str, str]) -> EvalSet:
    mk = bd.load_mkqa(lang, answerable_only=True)
    note = (f"MKQA ({lang} queries, English answers): {len(mk.queries)} answerable queries against the "
            f"{len(nq_corpus)} BEIR-NQ passages in {bd.beir_nq_corpus_dir()} (2.68M in the full benchmark). "
            "Relevance is answer-match only (MKQA has no passage judgements).")
    return EvalSet("mkqa", lang, mk.queries, nq_corpus, {}, mk.answers, note)


def load_task(task: str, lang: str, _shared: dict | None = None) -> EvalSet:
    """The :class:`EvalSet` of ``task`` in ``lang`` (MIRACL / MKQA need their user-supplied corpora)."""
    check_langs(task, [lang])
    if task == "miracl":
        return _miracl(lang)
    if task == "mkqa":
        shared = {} if _shared is None else _shared
        if "nq" not in shared:
            shared["nq"] = bd.load_beir_nq_corpus()
        return _mkqa(lang, shared["nq"])
    loader = {"tydi": load_tydi, "xquad-xling": load_xquad_xling, "xquad-longdoc": load_xquad_longdoc}[task]
    return loader(lang)


def limit_queries(es: EvalSet, n: int | None) -> EvalSet:
    """The first ``n`` queries of ``es`` (with their qrels and answers); the corpus is unchanged."""
    if n is None:
        return es
    if n < 1:
        raise ValueError(f"limit_queries must be >= 1, got {n}")
    keep = list(es.queries)[:n]

    def sub(d):
        return None if d is None else {q: d[q] for q in keep if q in d}
    return replace(es, queries={q: es.queries[q] for q in keep}, qrels=sub(es.qrels), answers=sub(es.answers),
                   answers_native=sub(es.answers_native))


# ---------------------------------------------------------------- scoring one set

def _rows(task, lang, mode, scores: dict[str, float]) -> list[dict]:
    return [{"task": task, "lang": lang, "mode": mode, "metric": m, "value": float(v)}
            for m, v in scores.items()]


def evaluate_set(model, es: EvalSet, modes: Sequence[str], task: str | None = None,
                 weights: Sequence[float] | None = None, max_length: int | None = None, batch_size: int = 32,
                 shard: tuple[int, int] = (0, 1), cache_root: str | Path | None = None,
                 backend: SearchBackend = MEMORY, per_query: dict | None = None) -> list[dict] | None:
    """Metric rows for one evaluation set (None on shard ranks > 0, which only encode); ``backend``: where
    the corpus is searched (:class:`~bgem3_lib.evaluation.search_backend.SearchBackend`).

    ``per_query``: a dict to fill with each row's per-query values, ``{(task, lang, mode, metric): {qid:
    value}}``, whose means are the rows' values (for paired confidence intervals:
    :mod:`~bgem3_lib.evaluation.significance`)."""
    task = task or es.name
    run_modes, _ = split_modes(model, modes)
    if not run_modes:
        raise ValueError(f"none of the modes {list(modes)} can run with model {model.source!r}")
    if not es.corpus:
        raise ValueError(f"{task} [{es.lang}]: empty corpus, nothing to search")
    if not es.queries:
        raise ValueError(f"{task} [{es.lang}]: no queries to evaluate")
    if weights is None and task not in TASKS:
        raise ValueError(f"pass weights=(w_dense, w_sparse, w_colbert) for the custom set {task!r}")
    if es.qrels:
        bd.validate_qrels(es.qrels, es.corpus)
    if not es.qrels and not es.answers:
        raise ValueError(f"{task} [{es.lang}]: neither qrels nor answers to score against")
    if backend.kind == "memory" and tuple(shard) == (0, 1) and build_folder() is not None:
        parts = {"model": model_fingerprint(model), "set": _set_digest(es), "task": task, "modes": list(run_modes),
                 "weights": None if weights is None else [float(w) for w in weights], "max_length": max_length,
                 "batch_size": batch_size}
        rows, values = reuse_in_build(parts, lambda: _evaluate(model, es, run_modes, task, weights, max_length,
                                                               batch_size, shard, cache_root, backend))
    else:
        out = _evaluate(model, es, run_modes, task, weights, max_length, batch_size, shard, cache_root, backend)
        if out is None:
            return None
        rows, values = out
    if per_query is not None:
        per_query.update(values)
    return rows


def _set_digest(es: EvalSet) -> str:
    """sha256 of everything an evaluation set holds (name, language, queries, corpus, qrels, answers)."""
    return result_key({"name": es.name, "lang": es.lang, "queries": es.queries, "corpus": es.corpus,
                       "qrels": es.qrels, "answers": es.answers})


def _evaluate(model, es: EvalSet, run_modes: Sequence[str], task: str, weights, max_length, batch_size: int,
              shard, cache_root, backend: SearchBackend) -> tuple[list[dict], dict] | None:
    """The work of :func:`evaluate_set` on a checked set: (rows, per-query values), None on shard ranks > 0."""
    per_query: dict = {}
    needed = needed_representations(list(run_modes) + (list(backend.needs()) if model_reps(model) != ("dense",)
                                                       else []))
    docids, texts = list(es.corpus), list(es.corpus.values())
    enc = corpus_encodings(model, docids, texts, needed, max_length=max_length, batch_size=batch_size,
                           shard=shard, root=cache_root)
    if enc is None:
        return None
    qids = list(es.queries)
    max_len = model.resolve_max_length(max_length)
    q_enc = model.encode_queries([es.queries[q] for q in qids], batch_size=batch_size,
                                 max_length=min(512, max_len), return_dense="dense" in needed,
                                 return_sparse="sparse" in needed, return_colbert_vecs="colbert" in needed)
    retriever = backend.retriever(model, docids, texts, enc, es.lang, model.resolve_max_length(max_length))
    k = max(100, *ANSWER_KS)
    use_answers = bool(es.answers) and (task in ANSWER_TASKS or task not in TASKS)
    answered = [] if not use_answers else [i for i, q in enumerate(qids)
                                           if any(answer_tokens(a) for a in es.answers.get(q, []))]
    rows = []
    for mode in run_modes:
        w = tuple(weights) if weights is not None else default_weights(task, mode)
        ids, _ = retriever.search(q_enc, mode, k=k, weights=w)
        if es.qrels:
            run = {}
            for q, row in zip(qids, ids):
                row = row[row >= 0]
                run[q] = {docids[j]: float(len(row) - r) for r, j in enumerate(row)}   # tie-free rank values
            values = evaluate_run(run, es.qrels, IR_METRICS)
            rows += _rows(task, es.lang, mode, mean_scores(values))
            _keep(per_query, task, es.lang, mode, values)
        if answered:
            ranked = [[texts[j] for j in ids[i] if j >= 0] for i in answered]
            alts = [es.answers[qids[i]] for i in answered]
            hits = {f"answer_recall@{k_}": answer_hits_at_k(ranked, alts, k_) for k_ in ANSWER_KS}
            rows += _rows(task, es.lang, mode, {m: float(h.mean()) for m, h in hits.items()})
            _keep(per_query, task, es.lang, mode,
                  {m: {qids[i]: float(v) for i, v in zip(answered, h)} for m, h in hits.items()})
    return rows, per_query


def _keep(per_query: dict | None, task: str, lang: str, mode: str, values: dict[str, dict[str, float]]) -> None:
    if per_query is not None:
        for metric, by_qid in values.items():
            per_query[task, lang, mode, metric] = dict(by_qid)


def _with_averages(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty or df["lang"].nunique() < 2:
        return df
    avg = df.groupby(["task", "mode", "metric"], sort=False, as_index=False)["value"].mean()
    avg.insert(1, "lang", "avg")
    return pd.concat([df, avg[COLUMNS]], ignore_index=True)


def write_results(df: pd.DataFrame, out_dir: str | Path, notes: Sequence[str] = ()) -> Path:
    """``results.csv``, ``results.json`` (records with the same five columns) and ``notes.txt`` in
    ``out_dir``, published as one unit (:func:`~bgem3_lib.paths.publish_set`): a reader, or a run killed
    half-way, sees the previous set or this one, never a new CSV beside an old JSON."""
    out = Path(out_dir)
    publish_set(out, {"results.csv": df[COLUMNS].to_csv(index=False),
                      "results.json": json.dumps(df[COLUMNS].to_dict(orient="records"), indent=1),
                      "notes.txt": "\n\n".join(notes) + "\n"})
    return out / "results.csv"


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Wide view: one row per language, one column per (mode, metric)."""
    return df.pivot_table(index="lang", columns=["mode", "metric"], values="value", sort=False)


def run_eval(task: str, model, modes: Sequence[str] = ("dense",), langs: Sequence[str] | None = None,
             out_dir: str | Path = "eval_results", weights: Sequence[float] | None = None,
             max_length: int | None = None, batch_size: int = 32, shard=None, limit: int | None = None,
             cache_root: str | Path | None = None, device: str | None = None, limit_docs: int | None = None,
             seed: int = 0, backend: SearchBackend = MEMORY, per_query: dict | None = None) -> pd.DataFrame:
    """Evaluate ``model`` (a ``BGEM3`` or a name/path) on ``task``; write and return the results table.

    ``limit``: the first ``limit`` queries per language. ``limit_docs``: a seeded sub-corpus of that many
    documents per language that keeps every kept query's relevant documents
    (:func:`~bgem3_lib.evaluation.subsets.subset_evalset`; with it, ``limit`` queries are drawn with ``seed``
    too). A smaller corpus has fewer distractors: scores on it compare only with the same subset.

    ``shard``: ``"i/n"``, ``(i, n)`` or None (then taken from ``msrun``'s environment, else 1 process).
    Ranks > 0 only encode their corpus shards and return an empty table; rank 0 writes the files.
    ``per_query``: a dict filled with the per-query values behind every row (see :func:`evaluate_set`).
    """
    check_task(task)
    langs = check_langs(task, langs)
    rank, world = resolve_shard(shard)
    if isinstance(model, (str, Path)):
        from ..model.bgem3 import BGEM3
        model = BGEM3(model, device=device)
    run_modes, skipped = split_modes(model, modes)
    if skipped:
        msg = (f"skipping modes {', '.join(skipped)}: model {model.source!r} is dense-only (no sparse / "
               f"ColBERT heads); evaluating {', '.join(run_modes) or 'nothing'}")
        log.warning(msg)
        print(f"[eval] {msg}")
    if not run_modes:
        raise ValueError(f"none of the modes {list(modes)} can run with model {model.source!r}")
    if rank != 0:
        return _run_langs(task, model, run_modes, langs, weights, max_length, batch_size, (rank, world), limit,
                          cache_root, limit_docs, seed, backend, per_query)[0]
    with out_dir_lock(out_dir):
        df, notes = _run_langs(task, model, run_modes, langs, weights, max_length, batch_size, (rank, world),
                               limit, cache_root, limit_docs, seed, backend, per_query)
        df = _with_averages(df)
        write_results(df, out_dir, notes)
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.precision", 4):
        print(summary_table(df))
    print(f"[eval] wrote {Path(out_dir) / 'results.csv'}")
    return df


def out_dir_lock(out_dir: str | Path):
    """The lock one eval holds on its output folder for the whole run: a second eval writing the same
    ``out_dir`` fails at once with :class:`~bgem3_lib.paths.LockedError` naming the holder."""
    return file_lock(Path(out_dir) / ".eval.lock", f"--out {out_dir}", wait=False)


def _run_langs(task, model, run_modes, langs, weights, max_length, batch_size, shard, limit, cache_root,
               limit_docs, seed, backend, per_query=None) -> tuple[pd.DataFrame, list[str]]:
    rank, world = shard
    rows, shared, notes = [], {}, []
    for lang in langs:
        es = load_task(task, lang, shared)
        if limit_docs is not None:
            from .subsets import subset_evalset
            es = subset_evalset(es, n_queries=limit, n_docs=limit_docs, seed=seed)
        else:
            es = limit_queries(es, limit)
        note = describe(es)
        notes.append(note)
        print(f"[eval] {note}")
        got = evaluate_set(model, es, run_modes, task, weights, max_length, batch_size, (rank, world),
                           cache_root, backend, per_query)
        if got is not None:
            rows += got
    if rank != 0:
        print(f"[eval] shard {rank}/{world} done; rank 0 writes the results")
    return pd.DataFrame(rows, columns=COLUMNS), notes
