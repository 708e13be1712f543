"""The long-document variants (analysis.long_documents) on a tiny model and on the real xquad-longdoc files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_m3 import tiny_model_dir

from bgem3_lib import BGEM3
from bgem3_lib.analysis import long_documents as ld
from bgem3_lib.analysis import paper_numbers as pn
from bgem3_lib.model import loading
from bgem3_lib.model.long_positions import extend_positions


@pytest.fixture(scope="module")
def models():
    tiny = loading.resolve(str(tiny_model_dir()))                        # 64 positions
    return (BGEM3(loaded=tiny), BGEM3(loaded=extend_positions(tiny, 256, "tile")),
            BGEM3(loaded=extend_positions(tiny, 256, "interpolate")))


def _docs():
    para = [" ".join(f"{w}{i}" for i in range(n)) for w, n in (("alpha", 8), ("beta", 30), ("gamma", 25))]
    return ["a short document about cats", para[0] + ld.PARAGRAPH_SEP + para[1] + ld.PARAGRAPH_SEP + para[2],
            para[2] + ld.PARAGRAPH_SEP + "dogs and cats"]


def test_windows_pack_whole_paragraphs():
    assert ld.pack_windows([3, 4, 2, 9], 8) == [[0, 1], [2], [3]]
    assert ld.pack_windows([10], 8) == [[0]] and ld.pack_windows([], 8) == []


def test_variants_agree_where_they_must(models):
    short, tile, interp = models
    docs, queries = _docs(), ["cats", "alpha3 beta7", "gamma1 dogs"]
    s = ld.variant_scores(short, tile, interp, queries, docs, every=32)
    assert set(s) == set(ld.VARIANTS) and all(v.shape == (3, 3) for v in s.values())
    lengths = [len(x) for x in short.tokenizer.encode_ids([short.passage_instruction + d for d in docs], 10**6)]
    assert lengths[0] < 64 < lengths[1] < 256                        # doc 0 fits everywhere, doc 1 only long
    for name in ("Dense (tile)", "Dense (interpolate)"):             # same 64 learned positions: same vectors
        np.testing.assert_allclose(s[name][:, 0], s[ld.BASELINE][:, 0], atol=1e-6)
        assert not np.allclose(s[name][:, 1], s[ld.BASELINE][:, 1])  # doc 1 is cut at 64 in the baseline only
    np.testing.assert_allclose(s["Windows dense"][:, 0], s[ld.BASELINE][:, 0], atol=1e-6)   # one window
    w_ds, w_all = pn.MLDR_WEIGHTS["dense+sparse"], pn.MLDR_WEIGHTS["all"]
    np.testing.assert_allclose(s["Dense+Sparse (tile)"], w_ds[0] * s["Dense (tile)"] + w_ds[1] * s["Sparse (tile)"],
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(s["All (tile)"], w_all[0] * s["Dense (tile)"] + w_all[1] * s["Sparse (tile)"]
                               + w_all[2] * s["Multi-vec (tile)"], rtol=1e-6, atol=1e-9)


def test_a_document_scores_its_best_window(models):
    short, tile, interp = models
    docs = [_docs()[1]]
    s = ld.variant_scores(short, tile, interp, ["beta4"], docs, every=32)
    paras = docs[0].split(ld.PARAGRAPH_SEP)
    counts = [len(x) for x in short.tokenizer.encode_ids(paras, 10**6)]
    windows = [ld.PARAGRAPH_SEP.join(paras[i] for i in w) for w in ld.pack_windows(counts, 64)]
    assert len(windows) > 1
    q = short.encode_queries(["beta4"])["dense_vecs"]
    p = short.encode_corpus(windows, max_length=64)["dense_vecs"]
    np.testing.assert_allclose(s["Windows dense"][0, 0], float((p @ q.T).max()), atol=1e-6)


def test_real_xquad_longdoc_lengths_and_per_query_values(models):
    short, tile, interp = models
    from bgem3_lib.evaluation.offline_sets import load_xquad_longdoc

    es = load_xquad_longdoc("de")
    prof = ld.length_profile(tile, list(es.corpus.values()))
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(str(short.tokenizer_path if hasattr(short, "tokenizer_path") else
                                             loading.asset_path("tokenizer.json")))
    direct = np.array([len(tok.encode(d).ids) for d in es.corpus.values()])  # <s> ... </s> included
    assert prof["documents"] == len(es.corpus) == 48
    assert prof["over_512"] == int((direct > 512).sum()) and prof["max_tokens"] == int(direct.max())
    assert prof["tokens"] == direct.tolist()
    per_query, lengths = ld.evaluate_long_documents(short, tile, interp, ["de"], n_queries=6)
    got = lengths["de"]
    assert {k: v for k, v in got.items() if k not in ("tokens", "gold")} == \
        {k: v for k, v in prof.items() if k != "tokens"}
    assert got["tokens"] == dict(zip(es.corpus, direct.tolist()))
    assert len(got["gold"]) == 6 and all(es.qrels[q] == {d: 1} or d in es.qrels[q] for q, d in got["gold"].items())
    assert {k[2] for k in per_query} == set(ld.VARIANTS) and {k[3] for k in per_query} == set(ld.METRICS)
    for values in per_query.values():
        assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values.values())
    json.dumps({"|".join(k): v for k, v in per_query.items()})       # plain floats, ready for a report
