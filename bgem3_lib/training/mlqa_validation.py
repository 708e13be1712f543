"""Held-out MLQA retrieval check used by the training recipe to choose settings (never XQuAD / TyDi).

Each held-out query is ranked against every held-out passage of its context language, in the five
modes of the paper; the score is MRR@10 and Recall@1 of the query's own paragraph. Everything runs in
NumPy on final hidden states (``final(i) -> [len_i, H]``) and the heads' weights, so it needs no extra
encoder pass when the final states are cached.

Weights of the combined modes: dense+sparse ``(1, 0.3)``, all ``(1, 0.3, 1)`` (the MIRACL/MKQA setting
of :data:`bgem3_lib.retrieval.modes.PAPER_WEIGHTS`).

>>> rank_metrics(np.array([[0.1, 0.9, 0.5]]), [0])            # gold ranked 3rd
{'mrr@10': 0.3333333333333333, 'recall@1': 0.0}
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..model.heads import colbert_embedding, dense_embedding, sparse_embedding
from ..retrieval.modes import HYBRID_MODES, MODES, fuse, paper_weights
from ..retrieval.scoring import lexical_matching_score


def rank_metrics(scores: np.ndarray, gold: list[int]) -> dict[str, float]:
    """scores ``[Q, P]``, ``gold[q]`` the relevant column -> mean MRR@10 and Recall@1."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(gold):
        raise ValueError(f"scores {scores.shape} do not match {len(gold)} gold columns")
    gold_s = scores[np.arange(len(gold)), gold]
    ties = (scores == gold_s[:, None]).sum(1) - 1           # other candidates with the very same score
    rank = 1 + (scores > gold_s[:, None]).sum(1) + ties / 2   # expected rank under random tie-breaking
    return {"mrr@10": float(np.mean(np.where(rank <= 10, 1.0 / rank, 0.0))),
            "recall@1": float(np.mean(rank == 1))}       # a tie for first place is not a hit


def encode_from_states(final, ids: list, idx: list[int], heads: dict, pooling: str,
                       special_ids=(0, 1, 2, 3)) -> dict:
    """Dense [n, H], lexical dicts and ColBERT [len-1, D] arrays of texts ``idx`` from final states.

    ``heads``: NumPy ``colbert_linear.weight/bias`` and ``sparse_linear.weight/bias``.
    """
    dense, lex, col = [], [], []
    for i in idx:
        h = np.asarray(final(i), dtype=np.float32)
        t = np.asarray(ids[i])
        one = np.array([0, len(h)])                          # a single text: offsets [0, n]
        dense.append(dense_embedding(h, one, pooling)[0])
        w = np.maximum(h @ heads["sparse_linear.weight"][0] + heads["sparse_linear.bias"][0], 0.0)
        lex.append(sparse_embedding(w.astype(np.float32), t, one, special_ids)[0])
        c = h @ heads["colbert_linear.weight"].T + heads["colbert_linear.bias"]
        col.append(colbert_embedding(c, one)[0])
    return {"dense": np.stack(dense), "lexical": lex, "colbert": col}


def _colbert_matrix(q_vecs: list, p_vecs: list) -> np.ndarray:
    flat = np.concatenate(p_vecs)
    starts = np.cumsum([0] + [len(p) for p in p_vecs[:-1]])
    out = np.zeros((len(q_vecs), len(p_vecs)))
    for a, q in enumerate(q_vecs):
        out[a] = np.maximum.reduceat(q @ flat.T, starts, axis=1).mean(0)
    return out


def mode_scores(q: dict, p: dict) -> dict[str, np.ndarray]:
    """``[Q, P]`` score matrices for the five modes."""
    s = {"dense": q["dense"] @ p["dense"].T,
         "sparse": np.array([[lexical_matching_score(a, b) for b in p["lexical"]] for a in q["lexical"]]),
         "colbert": _colbert_matrix(q["colbert"], p["colbert"])}
    for mode in HYBRID_MODES:
        s[mode] = fuse(mode, paper_weights("miracl", mode), dense=s["dense"], sparse=s["sparse"], colbert=s["colbert"])
    return s


def validate(final, ids: list, queries: list[tuple], heads: dict, pooling: str,
             special_ids=(0, 1, 2, 3)) -> dict:
    """``queries``: (query text idx, positive text idx, context lang, query lang). Candidates of a query
    are the positives of all held-out queries with the same context language. Returns
    ``{"overall" | "mono" | "xling": {mode: {"mrr@10", "recall@1"}}}`` (means over those queries)."""
    if not queries:
        raise ValueError("no held-out queries to validate on")
    by_lang = defaultdict(list)
    for q, p, c_lang, q_lang in queries:
        by_lang[c_lang].append((q, p, "mono" if c_lang == q_lang else "xling"))
    sums = {g: {m: defaultdict(float) for m in MODES} for g in ("overall", "mono", "xling")}
    for rows in by_lang.values():
        pool = sorted({p for _, p, _ in rows})
        col = {p: j for j, p in enumerate(pool)}
        qe = encode_from_states(final, ids, [q for q, _, _ in rows], heads, pooling, special_ids)
        pe = encode_from_states(final, ids, pool, heads, pooling, special_ids)
        scores = mode_scores(qe, pe)
        for r, (_, p, kind) in enumerate(rows):
            for mode, s in scores.items():
                for k, v in rank_metrics(s[r:r + 1], [col[p]]).items():
                    sums["overall"][mode][k] += v
                    sums[kind][mode][k] += v
    counts = {"overall": len(queries), **{k: sum(1 for *_, c, q in queries if (c == q) == (k == "mono"))
                                           for k in ("mono", "xling")}}
    return {g: {m: {k: v / counts[g] for k, v in sums[g][m].items()} for m in MODES}
            for g in sums if counts[g]}


__all__ = ["rank_metrics", "encode_from_states", "mode_scores", "validate"]
