"""Benchmark: inverted-index lexical search (SparseIndex) vs scoring every (query, passage) pair.

Synthetic lexical weights shaped like BGE-M3 output: token ids drawn from a Zipf law over the
250,002-token XLM-R vocabulary (a few very common ids, a long tail), weights in (0, 0.35].
Both searches rank by (score desc, index asc); the script asserts they return the same top-10
and writes timings and the measured speedup to ``benchmarks/results/sparse_index.json``.

    .venv/bin/python benchmarks/sparse_index.py [--passages 20000] [--queries 50] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bgem3_lib.retrieval.index import VOCAB_SIZE, SparseIndex  # noqa: E402
from bgem3_lib.retrieval.scoring import lexical_matching_score  # noqa: E402


def zipf_lexical_weights(rng: np.random.Generator, count: int, nnz: int, vocab: int = VOCAB_SIZE,
                         exponent: float = 1.0) -> list[dict[str, float]]:
    """``count`` dicts of about ``nnz`` distinct Zipf-distributed token ids -> float32-valued weights."""
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -exponent)
    cdf /= cdf[-1]
    token_of_rank = rng.permutation(vocab)                  # frequent ids are scattered, as in a real vocab
    draws = int(nnz * 1.6)                                  # head tokens repeat; draw extra, keep distinct
    samples = token_of_rank[np.minimum(np.searchsorted(cdf, rng.random((count, draws))), vocab - 1)]
    out = []
    for row in samples:
        ids = rng.permutation(np.unique(row))[:nnz]
        weights = rng.uniform(0.01, 0.35, size=len(ids)).astype(np.float32)
        out.append({str(t): float(w) for t, w in zip(ids.tolist(), weights)})
    return out


def loop_top_k(queries, corpus, k: int, score_fn, desc: str):
    """Reference: score every pair with ``score_fn``; order by (score desc, index asc)."""
    ids, scores = [], []
    for qw in tqdm(queries, desc=desc, unit="query"):
        row = [score_fn(qw, d) for d in corpus]
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        ids.append(order)
        scores.append([row[j] for j in order])
    return np.array(ids, np.int64), np.array(scores, np.float64)


def bare_dict_score(qw, pw):
    """The usual unvalidated dict loop (what one writes without an index)."""
    s = 0.0
    for t, w in qw.items():
        if t in pw:
            s += w * pw[t]
    return s


def compare(ids, scores, ref_ids, ref_scores, rtol=1e-5):
    """Same ids in the same order; a swap is tolerated only between float32-level ties."""
    swaps = 0
    for row, (a, b) in enumerate(zip(ids, ref_ids)):
        np.testing.assert_allclose(scores[row], ref_scores[row], rtol=rtol, atol=1e-7)
        if a.tolist() != b.tolist():
            ref_row = dict(zip(b.tolist(), ref_scores[row]))
            for x, y in zip(a.tolist(), b.tolist()):
                if x != y:
                    assert x in ref_row and abs(ref_row[x] - ref_row[y]) <= rtol * abs(ref_row[y]), \
                        f"query {row}: top-10 differs beyond a float tie: {a.tolist()} vs {b.tolist()}"
            swaps += 1
    return swaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--passage-nnz", type=int, default=100)
    ap.add_argument("--query-nnz", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparse_index.json")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    corpus = zipf_lexical_weights(rng, args.passages, args.passage_nnz)
    queries = zipf_lexical_weights(rng, args.queries, args.query_nnz)
    print(f"generated {len(corpus)} passages (mean {np.mean([len(d) for d in corpus]):.1f} nonzeros), "
          f"{len(queries)} queries in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    index = SparseIndex(corpus)
    build_s = time.perf_counter() - t0
    index.search(queries[:2], args.k)                     # warm-up (allocations, imports)
    repeats = 5
    t0 = time.perf_counter()
    for _ in range(repeats):
        ids, scores = index.search(queries, args.k)
    index_s = (time.perf_counter() - t0) / repeats
    print(f"SparseIndex: build {build_s:.2f}s, search {index_s * 1e3:.1f} ms for {len(queries)} queries")

    t0 = time.perf_counter()
    ref_ids, ref_scores = loop_top_k(queries, corpus, args.k, lexical_matching_score,
                                     "lexical_matching_score loop")
    loop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bare_ids, _ = loop_top_k(queries, corpus, args.k, bare_dict_score, "bare dict loop")
    bare_s = time.perf_counter() - t0

    swaps = compare(ids, scores, ref_ids, ref_scores)
    assert bare_ids.tolist() == ref_ids.tolist(), "the two reference loops disagree"
    speedup, speedup_bare = loop_s / index_s, bare_s / index_s
    print(f"identical top-{args.k}: yes ({swaps} rows with float32 tie swaps)")
    print(f"lexical_matching_score loop {loop_s:.2f}s, bare dict loop {bare_s:.2f}s")
    print(f"speedup of SparseIndex.search: {speedup:.0f}x vs lexical_matching_score loop, "
          f"{speedup_bare:.0f}x vs bare dict loop (this run)")

    result = {
        "passages": args.passages, "queries": args.queries, "vocab_size": VOCAB_SIZE,
        "passage_nnz_mean": float(np.mean([len(d) for d in corpus])),
        "query_nnz_mean": float(np.mean([len(d) for d in queries])),
        "k": args.k, "seed": args.seed, "zipf_exponent": 1.0,
        "index_build_seconds": round(build_s, 4),
        "index_search_seconds": round(index_s, 5), "index_search_repeats": repeats,
        "loop_lexical_matching_score_seconds": round(loop_s, 3),
        "loop_bare_dict_seconds": round(bare_s, 3),
        "speedup_vs_lexical_matching_score_loop": round(speedup, 1),
        "speedup_vs_bare_dict_loop": round(speedup_bare, 1),
        "identical_top_k": True, "rows_with_float_tie_swaps": swaps,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                    "processor": platform.machine(), "system": platform.system()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
