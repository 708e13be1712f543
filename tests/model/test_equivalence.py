"""bgem3_lib vs the official FlagEmbedding 1.4.2 BGEM3FlagModel (torch CPU, separate process)
on a random checkpoint written in the exact BAAI/bge-m3 file layout, up to the paper's 8192 tokens."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from fixtures import long_text, multilingual_texts

from bgem3_lib.analysis.torch_reference import run_reference
from bgem3_lib.weights.assets import asset_path

TOL = 1e-5
SMALL = dict(layers=2, hidden=64, heads=4, ffn=128, max_pos=514)
FULL = dict(layers=24, hidden=1024, heads=16, ffn=4096, max_pos=8194)
LONG = dict(layers=2, hidden=64, heads=4, ffn=128, max_pos=8194)
LONG_MAX = 8192


def _texts() -> list[str]:
    texts = multilingual_texts()
    texts += [long_text("en"), long_text("de"), long_text("zh")]     # over max_length
    return texts


def _long_texts() -> list[str]:
    """The short multilingual texts and real documents of exactly 8192 and 3000 tokens, plus one of 10,000 tokens
    that is cut to 8192: long ones share padded batches with each other and with short ones."""
    from bgem3_lib.analysis.long_cost import texts_of_length
    from bgem3_lib.model.tokenization import M3Tokenizer
    tok = M3Tokenizer.from_file(asset_path("tokenizer.json"))
    lengths = (LONG_MAX, 3000, 10000)
    long = [texts_of_length(tok, n, 1, seed=i)[0] for i, n in enumerate(lengths)]
    assert [len(ids) for ids in tok.encode_ids(long, 10 ** 6, warn=False)] == list(lengths)
    return multilingual_texts() + long


def _pairs(texts):
    queries = [t for t in texts if len(t) < 120]
    passages = [t for t in texts if len(t) >= 120]
    return [[queries[i % len(queries)], passages[(3 * i) % len(passages)]] for i in range(24)] + \
           [[texts[-1], "x"], ["  \u3000 x", texts[-2]]]


def _compare(tmp_path, size: dict, max_length: int, batch_size: int, timeout: int = 1800,
             texts: list[str] | None = None, pairs: list[list[str]] | None = None):
    from bgem3_lib import BGEM3
    ckpt, ref = tmp_path / "ckpt", tmp_path / "ref"
    ref.mkdir()
    run_reference("write_bge_m3_checkpoint", out_dir=str(ckpt), tokenizer_json=str(asset_path("tokenizer.json")),
                  seed=0, timeout=timeout, **size)
    texts = _texts() if texts is None else texts
    pairs = _pairs(texts) if pairs is None else pairs
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    weights = [0.4, 0.2, 0.4]
    run_reference("flagembedding_outputs", model_dir=str(ckpt), texts_json=str(tmp_path / "texts.json"),
                  pairs_json=str(tmp_path / "pairs.json"), out_dir=str(ref), max_length=max_length,
                  max_query_length=32, max_passage_length=max_length, batch_size=batch_size, weights=weights,
                  timeout=timeout)

    return {backend: _compare_backend(BGEM3(str(ckpt), backend=backend), ref, texts, pairs, weights, max_length,
                                      batch_size) for backend in ("kernels", "mindspore")}


def _compare_backend(model, ref, texts, pairs, weights, max_length: int, batch_size: int) -> dict:
    """One backend's outputs against FlagEmbedding's (already written to ``ref``)."""
    assert model.encoder.cpu_kernels_ready() == (model.backend == "kernels")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = model.encode(texts, batch_size=batch_size, max_length=max_length, return_dense=True,
                            return_sparse=True, return_colbert_vecs=True)
    assert any("truncated" in str(w.message) for w in caught), "over-length texts must warn"

    diffs = {}
    ref_dense = np.load(ref / "dense.npy")
    assert ref_dense.shape == ours["dense_vecs"].shape
    diffs["dense"] = float(np.abs(ref_dense - ours["dense_vecs"]).max())

    ref_lex = json.loads((ref / "lexical.json").read_text())
    d = 0.0
    for i, (a, b) in enumerate(zip(ref_lex, ours["lexical_weights"])):
        assert set(a) == set(b), f"text {i}: sparse key sets differ: {set(a) ^ set(b)}"
        d = max([d] + [abs(a[k] - b[k]) for k in a])
    diffs["sparse"] = d

    ref_col = np.load(ref / "colbert.npz")
    d = 0.0
    for i, v in enumerate(ours["colbert_vecs"]):
        r = ref_col[f"arr_{i}"]
        assert r.shape == v.shape, f"text {i}: colbert shapes {r.shape} vs {v.shape}"
        d = max(d, float(np.abs(r - v).max()))
    diffs["colbert"] = d

    ref_scores = json.loads((ref / "scores.json").read_text())
    our_scores = model.compute_score(pairs, batch_size=batch_size, max_query_length=32,
                                     max_passage_length=max_length, weights_for_different_modes=weights)
    assert set(ref_scores) <= set(our_scores)      # FlagEmbedding's keys, plus the library's mode names
    for mode in ref_scores:
        diffs[f"score:{mode}"] = float(np.abs(np.array(ref_scores[mode]) - np.array(our_scores[mode])).max())
    print(f"max abs differences vs FlagEmbedding ({model.backend} backend):", json.dumps(diffs))
    assert len(texts) >= 50
    for k, v in diffs.items():
        assert v <= TOL, f"{k}: max abs difference {v:.3g} > {TOL}"
    return diffs


def test_equivalence_small_config(tmp_path):
    _compare(tmp_path, SMALL, max_length=128, batch_size=8)


def test_equivalence_at_8192_tokens(tmp_path):
    # 8192 positions; both backends attend in blocks of query rows (kernels 256, MindSpore cells 1024)
    texts = _long_texts()
    pairs = _pairs(multilingual_texts()) + [[texts[0], texts[-1]]]      # one passage of 10,000 tokens, cut
    diffs = _compare(tmp_path, LONG, max_length=LONG_MAX, batch_size=2, texts=texts, pairs=pairs)
    assert set(diffs) == {"kernels", "mindspore"}


@pytest.mark.slow
def test_equivalence_full_size(tmp_path):
    # the full-size FlagEmbedding reference alone takes ~30 min on a busy 2-core machine
    _compare(tmp_path, FULL, max_length=1024, batch_size=8, timeout=3 * 3600)
