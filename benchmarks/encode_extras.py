"""The two side experiments of ``benchmarks/encode.py``: sorted vs unsorted batches (bgem3_lib), and the peak
memory of sparse output (bgem3_lib's whole encode vs FlagEmbedding's sparse-embedding step)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from encode_inputs import Tokens, long_texts, padded_slots
from tqdm import tqdm


def sort_experiment(worker, case: dict, runs: int, padded: bool, lengths: list[int]) -> dict:
    """bgem3_lib on a mixed-length input: length-sorted vs input-order batches, for the packed CPU
    kernels (no padding computed) and, if ``padded``, the plain padded MindSpore path. Each of ``runs`` rounds
    calls every variant once, the order reversed every other round; each variant keeps its per-round seconds
    (``seconds_runs``), so the report's sorted / unsorted ratio is paired by round as the speed table's are."""
    base = {k: case[k] for k in ("texts", "max_length", "batch_size")}
    out = {"input": {k: case[k] for k in ("tokens", "n_texts", "max_length", "batch_size")},
           "padded_slots": {"sorted": padded_slots(lengths, case["batch_size"], True),
                            "unsorted": padded_slots(lengths, case["batch_size"], False)}}
    variants = [(k, s) for k in ((True, False) if padded else (True,)) for s in (True, False)]
    secs = {v: [] for v in variants}
    for r in tqdm(range(runs), desc="sorting", leave=False):
        for kernels, sort in (variants if r % 2 == 0 else variants[::-1]):
            secs[(kernels, sort)].append(worker.ask(op="encode", **base, kernels=kernels, sort=sort)["seconds"])
    for (kernels, sort), s in secs.items():
        out[f"{'packed' if kernels else 'padded'}_{'sorted' if sort else 'unsorted'}"] = {
            "seconds": float(np.median(s)), "tokens_per_s": case["tokens"] / float(np.median(s)), "seconds_runs": s}
    speeds = [f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in out.items() if "tokens_per_s" in v]
    print("  sorting: " + ", ".join(speeds), flush=True)
    return out


def sparse_rss(workers, plan, tokens: Tokens, tmp: Path) -> dict:
    """Peak RSS for sparse output: bgem3_lib's whole encode at B x L tokens (above its RSS after loading
    the model); FlagEmbedding's sparse-embedding step alone at B x 256 (above the RSS before it)."""
    longest = max(L for _, L in plan["sparse"])
    path = tmp / "sparse.json"
    path.write_text(json.dumps(long_texts(max(B for B, _ in plan["sparse"]), longest, tokens)))
    out = {"bgem3_lib": [], "flagembedding_old": [], "flagembedding_new": []}
    if "bgem3_lib" in workers:
        for B, L in tqdm(plan["sparse"], desc="sparse RSS (bgem3_lib)", leave=False):
            r = workers["bgem3_lib"].ask(op="sparse_rss", texts=str(path), batch=B, max_length=L)
            out["bgem3_lib"].append({"batch": B, "length": L, "tokens": B * L, "peak_rss_mb": r["peak_rss_mb"],
                                     "extra_mb": r["peak_rss_mb"] - workers["bgem3_lib"].ready["rss_mb"]})
    if "flagembedding" in workers:
        L = 256
        for p in ("old", "new"):
            for B in plan["flag_sparse"]:
                r = workers["flagembedding"].ask(op="sparse_rss", texts=str(path), batch=B, max_length=L, path=p)
                out[f"flagembedding_{p}"].append({"batch": B, "length": L, "tokens": B * L,
                                                  "peak_rss_mb": r["peak_rss_mb"],
                                                  "extra_mb": r["peak_rss_mb"] - r["base_rss_mb"]})
    return out
