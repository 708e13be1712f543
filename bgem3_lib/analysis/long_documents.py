"""Whole documents against questions, by an encoder that never trained on long text (the paper's "w.o. long").

The MLDR-style set is ``xquad-longdoc``: each XQuAD article (all its paragraphs, joined by blank lines) is one
document, 48 per language, and every question of the article is judged relevant to it. Each variant below
scores every question against every document (48 documents: the paper's candidate depths cover them all, so
exhaustive scoring is its protocol here):

=================================  =========================================================================
``Dense 512``                      ``m3-small``: each document cut at its 512 learned positions
``Dense (tile)``                   ``m3-small-long``: the whole document, positions tiled past 512
``Dense (interpolate)``            ``m3-small-long-interp``: positions interpolated past 512
``Dense MCLS (tile)``              ``m3-small-long`` with MCLS: a CLS every 256 tokens, in the model's pooling
``Sparse (tile)``, ``Multi-vec``   ``m3-small-long``'s lexical and ColBERT scores on the whole document
``Dense+Sparse``, ``All``          their weighted sums with the paper's MLDR weights (§4.3)
``Windows dense``, ``... sparse``  ``m3-small`` on windows of whole paragraphs packed up to 512 tokens; a
                                   document scores its best window (what practitioners do without long models)
=================================  =========================================================================

:func:`evaluate_long_documents` returns per-query nDCG@10 and Recall@10 (trec_eval) keyed like the runner's
``per_query`` (``(task, lang, variant, metric)``), so :func:`~bgem3_lib.evaluation.significance.mode_differences`
gives each difference a stratified bootstrap interval, plus each language's document lengths in tokens.
Every corpus encoding goes through the encoding cache (``cache_dir()/encodings``, MCLS vectors
``cache_dir()/mcls``), keyed by the model's weights and the texts: a long corpus is encoded once, and a later
build reads it back.

>>> pack_windows([3, 4, 2, 9], 8)
[[0, 1], [2], [3]]
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from ..retrieval.index import colbert_rerank, lexical_weights_to_csr
from ..retrieval.metrics import evaluate_run, run_from_scores
from ..retrieval.modes import fuse, paper_weights
from ..retrieval.scoring import dense_score
from .longdoc_eval import pooled_texts

TASK = "xquad-longdoc"
METRICS = ("ndcg@10", "recall@10")
BASELINE = "Dense 512"
VARIANTS = (BASELINE, "Dense (tile)", "Dense (interpolate)", "Dense MCLS (tile)", "Sparse (tile)",
            "Multi-vec (tile)", "Dense+Sparse (tile)", "All (tile)", "Windows dense", "Windows sparse")
LENGTH_EDGES = (512, 2048, 4096)
PARAGRAPH_SEP = "\n\n"


def pack_windows(paragraph_tokens: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive paragraphs packed greedily into windows of at most ``budget`` tokens (a paragraph longer
    than ``budget`` is a window on its own, cut by the model) -> lists of paragraph indices."""
    windows, current, used = [], [], 0
    for i, n in enumerate(paragraph_tokens):
        if current and used + n > budget:
            windows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        windows.append(current)
    return windows


def _scores(q: Mapping, d: Mapping, vocab: int) -> dict[str, np.ndarray]:
    """Exhaustive dense / sparse / ColBERT scores [Nq, Nd] of query encodings ``q`` against documents ``d``
    (each representation both hold)."""
    out = {}
    both = {k for k in ("dense_vecs", "lexical_weights", "colbert_vecs")
            if q.get(k) is not None and d.get(k) is not None}
    if "dense_vecs" in both:
        out["dense"] = dense_score(q["dense_vecs"], d["dense_vecs"])
    if "lexical_weights" in both:
        ql, dl = (lexical_weights_to_csr(x["lexical_weights"], vocab, np.float64) for x in (q, d))
        out["sparse"] = np.asarray((ql @ dl.T).todense())
    if "colbert_vecs" in both:
        every = np.tile(np.arange(len(d["colbert_vecs"])), (len(q["colbert_vecs"]), 1))
        out["colbert"] = colbert_rerank(q["colbert_vecs"], d["colbert_vecs"], every).astype(np.float64)
    return out


def _best_window(window_scores: np.ndarray, owner: np.ndarray, n_docs: int) -> np.ndarray:
    """[Nq, W] window scores -> [Nq, n_docs]: each document's best window."""
    out = np.full((window_scores.shape[0], n_docs), -np.inf)
    for doc in range(n_docs):
        out[:, doc] = window_scores[:, owner == doc].max(axis=1)
    return out


def length_profile(model, docs: Sequence[str]) -> dict:
    """Tokens per document (the model's passage prefix included; ``tokens``, in order) and how many exceed
    each of LENGTH_EDGES."""
    lengths = np.array([len(x) for x in model.tokenizer.encode_ids(
        [model.passage_instruction + d for d in docs], 10**9, warn=False)])
    return {"documents": len(docs), "median_tokens": float(np.median(lengths)), "max_tokens": int(lengths.max()),
            **{f"over_{e}": int((lengths > e).sum()) for e in LENGTH_EDGES}, "tokens": lengths.tolist()}


def variant_scores(short, long_tile, long_interp, queries: Sequence[str], docs: Sequence[str],
                   every: int = 256, batch_size: int = 4) -> dict[str, np.ndarray]:
    """``{variant: scores [Nq, Nd]}`` for :data:`VARIANTS`: ``short`` is ``m3-small`` (512 positions),
    ``long_tile`` / ``long_interp`` the two position extensions (same heads, same 512 learned rows)."""
    if short.config.max_length >= long_tile.config.max_length:
        raise ValueError("short must have fewer positions than the long models")
    vocab = short.tokenizer.vocab_size
    with warnings.catch_warnings():            # cutting at 512 is what the Dense 512 and window variants do
        warnings.filterwarnings("ignore", message=".*longer than max_length.*")
        return _variant_scores(short, long_tile, long_interp, queries, docs, every, batch_size, vocab)


def _corpus(model, texts: Sequence[str], reps: tuple[str, ...], max_length: int | None, batch_size: int) -> dict:
    """``encode_corpus`` of ``texts`` through the encoding cache (:mod:`bgem3_lib.evaluation.corpus_cache`):
    encoded once per model weights and texts, read back in every later build."""
    from ..evaluation.corpus_cache import corpus_encodings
    return corpus_encodings(model, [str(i) for i in range(len(texts))], list(texts), reps=reps,
                            max_length=max_length, batch_size=batch_size)


def _variant_scores(short, long_tile, long_interp, queries, docs, every, batch_size, vocab) -> dict:
    kw = dict(batch_size=batch_size, return_sparse=True, return_colbert_vecs=True, show_progress=False)
    q = short.encode_queries(list(queries), max_length=short.config.max_length, **{**kw, "batch_size": 64})
    out = {BASELINE: dense_score(q["dense_vecs"], _corpus(short, docs, ("dense",), short.config.max_length,
                                                          batch_size)["dense_vecs"])}
    long = _scores(q, _corpus(long_tile, docs, ("dense", "sparse", "colbert"), None, batch_size), vocab)
    out["Dense (tile)"], out["Sparse (tile)"], out["Multi-vec (tile)"] = long["dense"], long["sparse"], long["colbert"]
    out["Dense (interpolate)"] = dense_score(q["dense_vecs"],
                                             _corpus(long_interp, docs, ("dense",), None, batch_size)["dense_vecs"])
    mcls = pooled_texts(long_tile, [long_tile.passage_instruction + d for d in docs], every,
                        long_tile.config.max_length, batch_size)[long_tile.config.pooling]
    out["Dense MCLS (tile)"] = dense_score(q["dense_vecs"], mcls)
    for mode, name in (("dense+sparse", "Dense+Sparse (tile)"), ("all", "All (tile)")):
        out[name] = fuse(mode, paper_weights("mldr", mode), dense=long["dense"], sparse=long["sparse"],
                         colbert=long["colbert"])
    paragraphs = [d.split(PARAGRAPH_SEP) for d in docs]
    texts, owner = [], []
    for j, paras in enumerate(paragraphs):
        counts = [len(x) for x in short.tokenizer.encode_ids(paras, 10**9, warn=False)]
        for w in pack_windows(counts, short.config.max_length):
            texts.append(PARAGRAPH_SEP.join(paras[i] for i in w))
            owner.append(j)
    win = _scores(q, _corpus(short, texts, ("dense", "sparse"), short.config.max_length, batch_size), vocab)
    owner = np.array(owner)
    out["Windows dense"] = _best_window(win["dense"], owner, len(docs))
    out["Windows sparse"] = _best_window(win["sparse"], owner, len(docs))
    assert set(out) == set(VARIANTS) and all(s.shape == (len(queries), len(docs)) for s in out.values())
    return out


def evaluate_long_documents(short, long_tile, long_interp, langs: Sequence[str], n_queries: int | None = None,
                            seed: int = 0, every: int = 256) -> tuple[dict, dict]:
    """``(per_query {(TASK, lang, variant, metric): {qid: value}}, lengths {lang: length_profile})`` on
    ``xquad-longdoc`` (each profile's ``tokens`` keyed by document id, ``gold`` {qid: its document id});
    ``n_queries``: a seeded sample per language (None: all 1,190)."""
    from ..evaluation.offline_sets import load_xquad_longdoc
    from ..evaluation.subsets import subset_evalset

    per_query, lengths = {}, {}
    for lang in langs:
        es = subset_evalset(load_xquad_longdoc(lang), n_queries, None, seed=seed)
        qids, docids = list(es.queries), list(es.corpus)
        docs = [es.corpus[d] for d in docids]
        lengths[lang] = length_profile(long_tile, docs)
        lengths[lang]["tokens"] = dict(zip(docids, lengths[lang]["tokens"]))     # {docid: tokens}
        lengths[lang]["gold"] = {q: next(iter(es.qrels[q])) for q in qids}        # {qid: its article}
        for name, scores in variant_scores(short, long_tile, long_interp, [es.queries[q] for q in qids], docs,
                                           every).items():
            run = run_from_scores(scores, qids, docids, k=len(docids))
            for metric, values in evaluate_run(run, es.qrels, METRICS).items():
                per_query[TASK, lang, name, metric] = values
    return per_query, lengths
