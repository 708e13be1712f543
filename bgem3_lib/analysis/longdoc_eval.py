"""Long inputs under a 512-position encoder: plain pooling against MCLS on the MLDR-style ``xquad-longdoc``
set, how much of each gold paragraph the encoder's window sees, and the activation memory of training on
long inputs with and without recomputation / split batches.

MCLS (M3-Embedding, arXiv 2402.03216, Sec. 3.4; :mod:`bgem3_lib.model.mcls`) puts a CLS token every ``every``
tokens and averages their final states. The variants compared, all from
:func:`~bgem3_lib.model.mcls.mcls_dense_embedding` (one packed encoder pass per ``every``):

* ``"CLS"`` / ``"mean"``: plain CLS / mean pooling (``every >= max_length``: no CLS inserted);
* ``"MCLS-256 (CLS)"``: the paper's MCLS, the mean of the CLS states, one CLS every 256 tokens;
* ``"MCLS-256 (mean)"``: the mean of each window's mean state (MCLS in multilingual-e5's own pooling).

Queries are shorter than ``every``, so their MCLS is their plain pooling: a ``CLS``-family variant scores
plain-CLS queries against its documents, a ``mean``-family variant plain-mean queries.

Encodings are cached as ``.npz`` in ``cache_dir()/mcls``, keyed by the encoder's weights (not the heads:
``m3-small-base`` and ``m3-small`` share entries while their encoders are equal), the texts, ``every``
and ``max_length``.

CLI (prints the table, writes JSON)::

    python -m bgem3_lib.analysis.longdoc_eval --model m3-small --out /tmp/mcls.json [--langs en de] [--every 256 128]

>>> variant_name("cls", 256, 512), variant_name("mean", 512, 512)
('MCLS-256 (CLS)', 'mean')
>>> visible_fraction([1, 300, 600], [300, 600, 900], window=511).round(3).tolist()
[1.0, 0.703, 0.0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..model.fingerprint import model_fingerprint
from ..model.mcls import mcls_dense_embedding
from ..paths import cache_dir
from ..retrieval.metrics import evaluate_run, mean_scores, run_from_scores
from ..retrieval.scoring import dense_score
from .batching_stats import layer_activation_bytes

POOLINGS = ("cls", "mean")
METRICS = ("ndcg@10", "recall@1", "recall@10")
CACHE_VERSION = 1


def variant_name(pooling: str, every: int, max_length: int) -> str:
    """Table name of a pooling variant: ``"CLS"``/``"mean"`` when ``every >= max_length``, else MCLS."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    plain = "CLS" if pooling == "cls" else "mean"
    return plain if every >= max_length else f"MCLS-{int(every)} ({plain})"


def visible_fraction(starts, ends, window: int) -> np.ndarray:
    """``[P]`` share of each token span ``[start, end)`` that lies before position ``window``.

    An encoder that keeps ``max_length`` positions with ``</s>`` last reads positions ``< max_length - 1``.
    """
    s, e = np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    if s.ndim != 1 or s.shape != e.shape:
        raise ValueError(f"starts and ends must be 1-D of equal length, got {s.shape} and {e.shape}")
    if np.any(e <= s) or np.any(s < 0):
        raise ValueError("every span needs 0 <= start < end")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return np.clip((window - s) / (e - s), 0.0, 1.0)


def paragraph_spans(tokenizer, paragraphs: Sequence[str], prefix: str = "", sep: str = "\n\n") -> np.ndarray:
    """``[P, 2]`` token spans ``[start, end)`` of the paragraphs in ``prefix + sep.join(paragraphs)`` as
    ``tokenizer.encode_ids`` lays it out (``<s>`` at position 0): end of paragraph ``j`` = tokens of the
    text up to paragraph ``j`` without ``</s>``; start = end of the previous one (after ``<s>`` and prefix).
    """
    if not paragraphs or any(not isinstance(p, str) or not p.strip() for p in paragraphs):
        raise ValueError("paragraphs must be a non-empty list of non-empty strings")
    texts = [prefix + sep.join(paragraphs[:j + 1]) for j in range(len(paragraphs))]
    ends = [len(ids) - 1 for ids in tokenizer.encode_ids(texts, sys.maxsize, warn=False)]
    first = len(tokenizer.encode_ids([prefix], sys.maxsize, warn=False)[0]) - 1 if prefix.strip() else 1
    starts = [first] + ends[:-1]
    return np.stack([np.array(starts, np.int64), np.array(ends, np.int64)], axis=1)


def training_activation_bytes(batch: int, length: int, hidden: int, heads: int, intermediate: int, layers: int,
                              recompute: bool = False, sub_batch: int | None = None, dtype_bytes: int = 4) -> dict:
    """Activation bytes of training an encoder of ``layers`` post-LN layers on ``[batch, length]`` inputs.

    * plain: every layer keeps its activations for backward (``stored``); ``sub_batch`` cannot help, the
      graphs of all sub-batches stay alive until backward;
    * ``recompute``: each layer keeps only its input ``[batch, length, hidden]`` (``stored``) and one
      layer's activations are rebuilt at a time during backward (``working``) — for ``sub_batch``
      examples when the batch is split (split-batch), else for the whole batch.

    Returns ``{"stored", "working", "total"}``. Per-layer counts from
    :func:`~bgem3_lib.analysis.batching_stats.layer_activation_bytes`.

    >>> training_activation_bytes(2, 4, 3, 1, 5, layers=2, recompute=True, sub_batch=1, dtype_bytes=1)
    {'stored': 48, 'working': 132, 'total': 180}
    """
    if int(layers) != layers or layers < 1:
        raise ValueError(f"layers must be a positive integer, got {layers}")
    if sub_batch is not None and not (int(sub_batch) == sub_batch and 1 <= sub_batch <= batch):
        raise ValueError(f"sub_batch must lie in [1, batch={batch}], got {sub_batch}")
    full = layer_activation_bytes(batch, length, hidden, heads, intermediate, dtype_bytes)["total"]
    if not recompute:
        stored, working = layers * full, 0
    else:
        stored = layers * batch * length * hidden * dtype_bytes
        working = layer_activation_bytes(sub_batch or batch, length, hidden, heads, intermediate,
                                         dtype_bytes)["total"]
    return {"stored": int(stored), "working": int(working), "total": int(stored + working)}


def cached_arrays(key: str, compute: Callable[[], Mapping[str, np.ndarray]],
                  root: str | Path | None = None) -> dict[str, np.ndarray]:
    """``compute()`` stored as ``<root>/<key>.npz`` (default root ``cache_dir()/mcls``), loaded when present.
    The file is written to a temporary name and renamed, so a killed run leaves no partial entry."""
    folder = Path(root) if root is not None else cache_dir() / "mcls"
    path = folder / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    out = {k: np.asarray(v) for k, v in compute().items()}
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **out)
    os.replace(tmp, path)
    return out


def pooled_texts(model, texts: Sequence[str], every: int, max_length: int | None = None, batch_size: int = 8,
                 cache: bool = True, show_progress: bool = False) -> dict[str, np.ndarray]:
    """``{"cls": [N, H], "mean": [N, H]}`` from :func:`~bgem3_lib.model.mcls.mcls_dense_embedding`, cached.
    Texts are used as given (add prefixes before)."""
    max_length = model.resolve_max_length(max_length)
    every = min(int(every), max_length)

    def compute():
        return mcls_dense_embedding(model, list(texts), every, max_length, ("cls", "mean"), batch_size,
                                    show_progress)

    if not cache:
        return compute()
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    blob = json.dumps({"v": CACHE_VERSION, "encoder": model_fingerprint(model, heads=False), "texts": h.hexdigest(),
                       "n": len(texts), "every": every, "max_length": max_length}, sort_keys=True)
    return cached_arrays(hashlib.sha256(blob.encode()).hexdigest()[:24], compute)


def longdoc_variants(model, queries: Sequence[str], docs: Sequence[str], everies: Sequence[int] = (256,),
                     max_length: int | None = None, batch_size: int = 8, cache: bool = True,
                     show_progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{variant name: (query vectors [Nq, H], document vectors [Nd, H])}`` for plain CLS, plain mean and
    MCLS (CLS and mean) at each ``every < max_length``; the model's query / passage prefixes are added."""
    max_length = model.resolve_max_length(max_length)
    q_texts = [model.query_instruction + q for q in queries]
    d_texts = [model.passage_instruction + d for d in docs]
    q = pooled_texts(model, q_texts, max_length, max_length, 8 * batch_size, cache, show_progress)
    out = {}
    for every in dict.fromkeys([max_length, *(int(e) for e in everies)]):
        d = pooled_texts(model, d_texts, every, max_length, batch_size, cache, show_progress)
        for p in POOLINGS:
            out[variant_name(p, every, max_length)] = (q[p], d[p])
    return out


def evaluate_variants(variants: Mapping[str, tuple[np.ndarray, np.ndarray]], qids: Sequence[str],
                      docids: Sequence[str], qrels: Mapping[str, Mapping[str, int]],
                      metrics: Sequence[str] = METRICS, k: int = 100) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant, trec_eval metrics per query ``{variant: {metric: {qid: value}}}`` of the dense scores
    ``q @ d.T`` (``q`` rows in ``qids`` order, ``d`` rows in ``docids`` order)."""
    out = {}
    for name, (q, d) in variants.items():
        if len(q) != len(qids) or len(d) != len(docids):
            raise ValueError(f"{name}: {len(q)} query / {len(d)} document vectors for "
                             f"{len(qids)} qids / {len(docids)} docids")
        run = run_from_scores(dense_score(q, d), list(qids), list(docids), k=k)
        out[name] = evaluate_run(run, {qid: qrels[qid] for qid in qids}, metrics)
    return out


def evaluate_longdoc(model, langs: Sequence[str], everies: Sequence[int] = (256, 128), max_length: int | None = None,
                     metrics: Sequence[str] = METRICS, batch_size: int = 8, max_queries: int | None = None,
                     seed: int = 0, cache: bool = True, show_progress: bool = True) -> dict:
    """MCLS vs plain pooling on ``xquad-longdoc`` per language: mean metrics per variant, their mean over
    languages, and how many documents exceed the window. ``max_queries``: seeded subset per language."""
    from ..evaluation.offline_sets import load_xquad_longdoc

    max_length = model.resolve_max_length(max_length)
    start, per_lang, info = time.perf_counter(), {}, {}
    for lang in langs:
        es = load_xquad_longdoc(lang)
        qids, docids = list(es.queries), list(es.corpus)
        if max_queries is not None and max_queries < len(qids):
            pick = np.sort(np.random.default_rng(seed).choice(len(qids), max_queries, replace=False))
            qids = [qids[i] for i in pick]
        docs = [es.corpus[d] for d in docids]
        variants = longdoc_variants(model, [es.queries[q] for q in qids], docs, everies, max_length, batch_size,
                                    cache, show_progress)
        per_lang[lang] = {v: mean_scores(s) for v, s in
                          evaluate_variants(variants, qids, docids, es.qrels, metrics).items()}
        lengths = [len(x) for x in model.tokenizer.encode_ids([model.passage_instruction + d for d in docs],
                                                             sys.maxsize, warn=False)]
        info[lang] = {"queries": len(qids), "documents": len(docids), "median_doc_tokens": float(np.median(lengths)),
                      "docs_over_window": float(np.mean(np.array(lengths) > max_length))}
    names = list(next(iter(per_lang.values())))
    mean = {v: {m: float(np.mean([per_lang[lang][v][m] for lang in langs])) for m in metrics} for v in names}
    return {"model": str(getattr(model, "source", "")), "max_length": max_length, "everies": [int(e) for e in everies],
            "metrics": list(metrics), "langs": list(langs), "per_lang": per_lang, "mean": mean, "sets": info,
            "seconds": time.perf_counter() - start}


def format_table(result: dict) -> str:
    """Plain-text table of :func:`evaluate_longdoc`'s means (rows: variants, columns: metrics)."""
    metrics, rows = result["metrics"], result["mean"]
    width = max(len(v) for v in rows) + 2
    lines = [f"{'variant':<{width}}" + "".join(f"{m:>11}" for m in metrics)]
    lines += [f"{v:<{width}}" + "".join(f"{vals[m]:11.4f}" for m in metrics) for v, vals in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..evaluation.offline_sets import XQUAD_LANGS

    ap = argparse.ArgumentParser(description="MCLS vs plain CLS / mean pooling on xquad-longdoc (dense retrieval)")
    ap.add_argument("--model", default="m3-small", help="model name or directory")
    ap.add_argument("--langs", nargs="+", default=list(XQUAD_LANGS), choices=XQUAD_LANGS)
    ap.add_argument("--every", nargs="+", type=int, default=[256, 128], help="MCLS intervals (tokens)")
    ap.add_argument("--max-length", type=int, default=None, help="token window (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-queries", type=int, default=None, help="seeded subset of queries per language")
    ap.add_argument("--device", default="CPU")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write cache_dir()/mcls")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    if min(a.every) < 2 or a.batch_size < 1:
        ap.error("--every must be >= 2 and --batch-size >= 1")
    from ..model.bgem3 import BGEM3

    model = BGEM3(a.model, device=a.device, dtype=a.dtype)
    result = evaluate_longdoc(model, a.langs, a.every, a.max_length, METRICS, a.batch_size, a.max_queries,
                              cache=not a.no_cache)
    result["model"] = a.model
    print(f"xquad-longdoc, {a.model}, window {result['max_length']} tokens, mean over {len(a.langs)} language(s) "
          f"({sum(s['queries'] for s in result['sets'].values())} queries):")
    print(format_table(result))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
