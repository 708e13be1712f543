"""What int8 costs on real weights (issue 16, part 4): M3-small (the real multilingual-e5-small encoder + our
trained heads) encoded by four engines (:data:`~bgem3_lib.analysis.int8_engines.ENGINES`: ``bgem3_lib`` and ONNX
Runtime, each in float32 and int8, each in its own process), every engine compared with its float32.

* :func:`encode_all` (from :mod:`~bgem3_lib.analysis.int8_engines`) - one engine's dense / lexical / ColBERT
  encodings of queries then passages, timed; the same prefixes, max_length and batch size for every engine.
* :func:`agreement` - how far two encodings of the same texts are apart, per text (pure NumPy).
* :func:`retrieval_quality` - xquad-xling per query: exhaustive scores by the library's scorers, trec_eval's nDCG@10
  and Recall@20, MKQA's answer Recall@20, in each of the dense, sparse and ColBERT modes.
* :func:`compare` - per engine: agreement with its float32 (:data:`REFERENCE`), metrics, their difference from the
  float32's with a paired-bootstrap 95% interval (``significance.mode_differences``: macro over languages,
  queries resampled within each), encode seconds and tokens/s. The ORT float32 encodings must first match
  ``bgem3_lib-float32`` (dense max |Δ| <= :data:`ORT_TOL`): else ORT measures another model.

``en`` is not a ``load_xquad_xling`` language (its passages are English): here it is the English questions against
the same 240 paragraphs, a monolingual control (:func:`xling_sets`).

    python -m bgem3_lib.analysis.int8_quality --langs de zh ar hi en --out results.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..progress import tqdm
from .int8_engines import ENGINES, Encodings, encode_all, m3_layout, onnx_models

__all__ = ["ENGINES", "Encodings", "encode_all", "m3_layout", "onnx_models", "agreement", "xling_sets",
           "retrieval_quality", "compare", "table", "acceptance", "machine", "run", "main"]
REFERENCE = {"bgem3_lib-int8": "bgem3_lib-float32", "ort-float32": "bgem3_lib-float32", "ort-int8": "ort-float32"}
MODES, METRICS, TASK = ("dense", "sparse", "colbert"), ("answer_recall@20", "ndcg@10", "recall@20"), "xquad-xling"
SHOWN = {"answer_recall@20": "R@20", "ndcg@10": "nDCG@10"}      # the table's metrics (all three go to the JSON)
ORT_TOL = 1e-4
_KEYS = ("dense_vecs", "lexical_weights", "colbert_vecs")


def _cosines(x, y) -> np.ndarray:
    """Row-wise cosine of x, y [..., H] -> [...] (float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x * y).sum(-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-30)


def agreement(a: Mapping, b: Mapping) -> dict[str, float]:
    """Agreement of two encodings of the same N texts (FlagEmbedding's output dicts: ``dense_vecs`` [N, H],
    ``lexical_weights`` N dicts, ``colbert_vecs`` N arrays [n_i, D]): dense cosine per text (mean, min) and the max
    |a - b| of any component; ``lexical_jaccard``: mean |A ∩ B| / |A ∪ B| of the tokens of weight > 0 (two empty
    sets: 1); ``lexical_weighted``: mean sum_t min(a_t, b_t) / sum_t max(a_t, b_t); ``colbert_cos``: mean cosine of
    the matching token vectors, over all tokens of all texts.

    >>> a = {"dense_vecs": np.array([[1.0, 0.0], [0.0, 1.0]]), "lexical_weights": [{"5": 1.0, "7": 0.5}, {}],
    ...      "colbert_vecs": [np.array([[1.0, 0.0]]), np.array([[0.0, 2.0], [1.0, 0.0]])]}
    >>> b = {"dense_vecs": np.array([[1.0, 0.0], [0.6, 0.8]]), "lexical_weights": [{"5": 0.5, "9": 0.5}, {}],
    ...      "colbert_vecs": [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [0.0, 1.0]])]}
    >>> {k: round(v, 4) for k, v in agreement(a, b).items()}   # Jaccard (1/3 + 1) / 2, weighted (0.5/2 + 1) / 2
    {'dense_cos_mean': 0.9, 'dense_cos_min': 0.8, 'dense_max_abs': 0.6, 'lexical_jaccard': 0.6667,
     'lexical_weighted': 0.625, 'colbert_cos': 0.6667}
    """
    for name, e in (("a", a), ("b", b)):
        if not isinstance(e, Mapping) or not all(k in e for k in _KEYS) or len({len(e[k]) for k in _KEYS}) != 1:
            raise ValueError(f"{name} must be a dict of {_KEYS}, one entry per text in each")
    if len(a["dense_vecs"]) != len(b["dense_vecs"]) or not len(a["dense_vecs"]):
        raise ValueError(f"a has {len(a['dense_vecs'])} texts and b {len(b['dense_vecs'])}: agreement compares "
                         "encodings of the same (non-empty) list of texts")
    da, db = np.asarray(a["dense_vecs"]), np.asarray(b["dense_vecs"])
    if da.shape != db.shape:
        raise ValueError(f"dense shapes differ: {da.shape} vs {db.shape}")
    cos, jac, wov = _cosines(da, db), [], []
    for x, y in zip(a["lexical_weights"], b["lexical_weights"]):
        x, y = ({t: float(w) for t, w in d.items() if w > 0} for d in (x, y))
        union = set(x) | set(y)
        jac.append(len(set(x) & set(y)) / len(union) if union else 1.0)
        top = sum(max(x.get(t, 0.0), y.get(t, 0.0)) for t in union)
        wov.append(sum(min(x.get(t, 0.0), y.get(t, 0.0)) for t in union) / top if union else 1.0)
    col = []
    for i, (x, y) in enumerate(zip(a["colbert_vecs"], b["colbert_vecs"])):
        if np.shape(x) != np.shape(y) or np.ndim(x) != 2:
            raise ValueError(f"text {i}: ColBERT shapes differ or are not [n, D] ({np.shape(x)} vs {np.shape(y)})")
        col.append(_cosines(x, y))
    return {"dense_cos_mean": float(cos.mean()), "dense_cos_min": float(cos.min()),
            "dense_max_abs": float(np.abs(da - db).max()), "lexical_jaccard": float(np.mean(jac)),
            "lexical_weighted": float(np.mean(wov)), "colbert_cos": float(np.concatenate(col).mean())}


def xling_sets(langs, n_queries: int | None = None, seed: int = 0) -> list:
    """xquad-xling of each language (``en``: the English questions against the same paragraphs), with all questions
    or a seeded ``n_queries`` (the same question ids in every language)."""
    from ..evaluation.offline_sets import load_xquad_longdoc, load_xquad_xling
    from ..evaluation.subsets import subset_evalset
    sets = []
    for lang in langs:
        if lang == "en":
            base, en = load_xquad_xling("de"), load_xquad_longdoc("en").queries
            s = replace(base, lang="en", queries={q: en[q] for q in base.queries}, answers_native=base.answers,
                        note="English XQuAD questions against the 240 English paragraphs (monolingual control)")
        else:
            s = load_xquad_xling(lang)
        sets.append(subset_evalset(s, n_queries=n_queries, seed=seed) if n_queries else s)
    return sets


def _scores(mode: str, q: dict, p: dict, sparse_index) -> np.ndarray:
    """Exhaustive [Nq, Np] scores of one mode by the library's scorers."""
    from ..retrieval.index import colbert_rerank
    from ..retrieval.scoring import dense_score
    if mode == "dense":
        return dense_score(q["dense_vecs"], p["dense_vecs"])
    if mode == "sparse":
        return sparse_index.score_matrix(q["lexical_weights"])
    every = np.tile(np.arange(len(p["colbert_vecs"])), (len(q["colbert_vecs"]), 1))
    return colbert_rerank(q["colbert_vecs"], p["colbert_vecs"], every)


def retrieval_quality(enc: Encodings, evalsets) -> dict[tuple, dict[str, float]]:
    """Per-query :data:`METRICS` of each mode, ``{(task, lang, mode, metric): {qid: value}}`` (the runner's
    ``per_query``). ``enc`` holds the questions of ``evalsets`` in order, then their shared corpus. nDCG@10 and
    Recall@20 against the source paragraph by trec_eval (``evaluate_run``); answer Recall@20 (an English answer in
    one of the top 20 paragraphs) over the questions that have one."""
    from ..retrieval.index import SparseIndex, top_k
    from ..retrieval.metrics import answer_hits_at_k, answer_tokens, evaluate_run, run_from_scores
    docids, texts = list(evalsets[0].corpus), list(evalsets[0].corpus.values())
    p, q_all = enc.part(passages=True), enc.part(passages=False)
    n_q = sum(len(s.queries) for s in evalsets)
    if len(p["dense_vecs"]) != len(docids) or n_q != enc.n_queries:
        raise ValueError(f"{enc.engine} encoded {enc.n_queries} queries and {len(p['dense_vecs'])} passages; the "
                         f"sets have {n_q} queries and {len(docids)} passages")
    sparse, start, per_query = SparseIndex(p["lexical_weights"]), 0, {}
    for s in evalsets:
        if list(s.corpus) != docids:
            raise ValueError(f"the {s.lang} set has another corpus than {evalsets[0].lang}'s")
        qids = list(s.queries)
        q = {k: v[start:start + len(qids)] for k, v in q_all.items()}
        start += len(qids)
        answered = [i for i, x in enumerate(qids) if any(answer_tokens(a) for a in s.answers.get(x, []))]
        for mode in MODES:
            scores = _scores(mode, q, p, sparse)
            values = evaluate_run(run_from_scores(scores, qids, docids, k=100), s.qrels, ("ndcg@10", "recall@20"))
            ranked = [[texts[j] for j in row] for row in top_k(scores[answered], 20)[0]]
            hits = answer_hits_at_k(ranked, [s.answers[qids[i]] for i in answered], 20)
            values["answer_recall@20"] = {qids[i]: float(h) for i, h in zip(answered, hits)}
            per_query.update({(TASK, s.lang, mode, m): v for m, v in values.items()})
    return per_query


def compare(encodings: dict[str, Encodings], evalsets, n_boot: int = 10_000) -> dict[str, dict]:
    """Per engine: :func:`agreement` with its float32 (``vs``), each mode's metrics (macro mean over languages, and
    per language), ``Δ`` = engine - float32 with its 95% interval, encode seconds and tokens/s."""
    from ..evaluation.significance import mode_differences
    if {"ort-float32", "bgem3_lib-float32"} <= set(encodings):
        gap = agreement(encodings["bgem3_lib-float32"].out, encodings["ort-float32"].out)["dense_max_abs"]
        if not gap <= ORT_TOL:
            raise RuntimeError(f"ORT float32 disagrees with bgem3_lib float32 (dense max |Δ| {gap:.2e} > {ORT_TOL}): "
                               "the export does not hold the same model")
    per_query = {}
    for name, enc in tqdm(encodings.items(), desc="score (exhaustive, 3 modes)"):
        per_query.update({(t, lang, f"{name}:{mode}", m): v
                          for (t, lang, mode, m), v in retrieval_quality(enc, evalsets).items()})
    langs, rows = [s.lang for s in evalsets], {}
    for name, enc in encodings.items():
        ref = REFERENCE.get(name) if REFERENCE.get(name) in encodings else None
        row = {"vs": ref, **(agreement(encodings[ref].out, enc.out) if ref else {}),
               "encode_seconds": enc.seconds, "tokens_per_second": enc.n_tokens / enc.seconds}
        for mode in MODES:
            for m in METRICS:
                by_lang = {lang: float(np.mean(list(per_query[TASK, lang, f"{name}:{mode}", m].values())))
                           for lang in langs}
                row[f"{mode} {m}"], row[f"{mode} {m} by lang"] = float(np.mean(list(by_lang.values()))), by_lang
                if ref:
                    d = mode_differences(per_query, m, [(f"{ref}:{mode}", f"{name}:{mode}")], n_boot=n_boot).iloc[0]
                    row[f"{mode} Δ{m}"] = {k: float(d[k]) for k in ("diff", "low", "high")}
        rows[name] = row
    return rows


def table(rows: Mapping[str, dict]) -> pd.DataFrame:
    """:func:`compare`'s rows as the printed table: one column per engine (and what it is compared with), metrics
    in points, Δ [95% CI] in points, encode seconds / tokens per second."""
    from ..evaluation.significance import format_ci
    cols = {}
    for name, r in rows.items():
        ref = r["vs"]
        c = {"dense cosine mean / min": f"{r['dense_cos_mean']:.4f} / {r['dense_cos_min']:.4f}" if ref else "ref",
             "lexical Jaccard / weighted": f"{r['lexical_jaccard']:.3f} / {r['lexical_weighted']:.3f}" if ref
             else "ref",
             "ColBERT token cosine": f"{r['colbert_cos']:.4f}" if ref else "ref"}
        for mode in MODES:
            for m, short in SHOWN.items():
                c[f"{mode} {short}"] = f"{100 * r[f'{mode} {m}']:.1f}"
                c[f"{mode} Δ{short} [95% CI]"] = format_ci(r[f"{mode} Δ{m}"]) if ref else "-"
        c["encode s / tokens/s"] = f"{r['encode_seconds']:.1f} / {r['tokens_per_second']:.0f}"
        cols[f"{name} (vs {ref})" if ref else name] = c
    return pd.DataFrame(cols)


def acceptance(rows: Mapping[str, dict], min_cosine: float = 0.99, max_points: float = 0.5) -> list[str]:
    """Issue 16's bar for each int8 engine: mean dense cosine to its float32 >= ``min_cosine`` and every shown metric
    of every mode within ``max_points`` of the float32's (the point estimate; the interval is in the table).

    >>> row = {"vs": "f", "dense_cos_mean": 0.995, **{f"{m} Δ{k}": {"diff": 0.001} for m in MODES for k in SHOWN}}
    >>> acceptance({"bgem3_lib-int8": row})
    ['bgem3_lib-int8 vs f: dense cosine mean 0.9950 (>= 0.99: yes), largest |Δ| 0.1 points (<= 0.5: yes)']
    """
    out = []
    for name, r in rows.items():
        if name.endswith("int8") and r["vs"]:
            worst = max(abs(100 * r[f"{mode} Δ{m}"]["diff"]) for mode in MODES for m in SHOWN)
            out.append(f"{name} vs {r['vs']}: dense cosine mean {r['dense_cos_mean']:.4f} (>= {min_cosine}: "
                       f"{'yes' if r['dense_cos_mean'] >= min_cosine else 'NO'}), largest |Δ| {worst:.1f} points "
                       f"(<= {max_points}: {'yes' if worst <= max_points else 'NO'})")
    return out


def machine(load_start) -> dict:
    """Where and under what load a run happened: date, CPUs, CPU model, AVX-512 VNNI, AMX (int8 and bf16: the int8
    path then runs its products and its attention on tiles), load average at start and end."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "cpu": cpu,
            "avx512_vnni": "avx512_vnni" in info, "amx": "amx_int8" in info and "amx_bf16" in info,
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()]}


def run(langs=("de", "zh", "ar", "hi", "en"), n_queries: int | None = None, engines=ENGINES, model: str = "m3-small",
        batch_size: int = 64, n_boot: int = 10_000, cache: bool = True) -> dict:
    """Encode the sets' questions and paragraphs with every engine, then :func:`compare`: a JSON-ready result."""
    start, load_start, sets = time.perf_counter(), os.getloadavg(), xling_sets(langs, n_queries)
    queries, passages = [q for s in sets for q in s.queries.values()], list(sets[0].corpus.values())
    encodings = {e: encode_all(e, queries, passages, model, batch_size=batch_size, cache=cache)
                 for e in tqdm(engines, desc="encode (one process per engine)")}
    rows = compare(encodings, sets, n_boot)
    return {"model": model, "langs": list(langs), "queries": len(queries), "passages": len(passages),
            "batch_size": batch_size, "n_boot": n_boot, "rows": rows, "seconds": time.perf_counter() - start,
            "machine": machine(load_start)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bgem3_lib.analysis.int8_quality",
                                 description="int8 vs float32 on M3-small: agreement, xquad-xling quality, speed")
    ap.add_argument("--langs", nargs="+", default=["de", "zh", "ar", "hi", "en"])
    ap.add_argument("--out", type=Path, help="write the result here as JSON")
    ap.add_argument("--quick", action="store_true", help="100 seeded questions per language, 2,000 bootstrap draws")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--model", default="m3-small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-cache", action="store_true", help="re-encode even when cached encodings exist")
    a = ap.parse_args(argv)
    res = run(a.langs, 100 if a.quick else None, a.engines, a.model, a.batch_size, 2000 if a.quick else 10_000,
              not a.no_cache)
    print(table(res["rows"]).to_markdown())
    print("\n".join(acceptance(res["rows"])))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return res


if __name__ == "__main__":
    main()
