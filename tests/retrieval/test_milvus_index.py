"""MilvusIndex / MilvusRetriever against a real Milvus Lite (embedded database, and the gRPC server started
here on 127.0.0.1): identical rankings to the in-memory retriever in all five modes, kill-and-resume
ingest, and the error cases."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bgem3_lib.retrieval.milvus_index import NO_TOKENS, MilvusIndex, MilvusIndexError, collection_name
from bgem3_lib.retrieval.milvus_retriever import MilvusRetriever
from bgem3_lib.retrieval.milvus_server import start_lite_server, stop_lite_server
from bgem3_lib.retrieval.modes import MODES
from bgem3_lib.retrieval.retriever import HybridRetriever

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 40
MODEL_FP, CORPUS_FP = "ab" * 32, "cd" * 32


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _encodings(n, seed, h=8, tokens=(2, 6)):
    rng = np.random.default_rng(seed)
    lexical = []
    for _ in range(n):
        t = rng.choice(VOCAB, int(rng.integers(*tokens)), replace=False)
        lexical.append({str(i): float(np.float32(w)) for i, w in zip(t, rng.random(len(t)) + 0.01)})
    dense = _unit(rng, n, h)
    dense[7] = dense[3]                                     # duplicate passages tie: broken by row
    lexical[7] = dict(lexical[3])
    lexical[11] = {}                                        # no lexical weights (Milvus needs a placeholder)
    return {"dense_vecs": dense, "lexical_weights": lexical,
            "colbert_vecs": [_unit(rng, int(rng.integers(1, 5)), h) for _ in range(n)]}


def _meta(n, h=8, corpus=CORPUS_FP):
    return {"model": MODEL_FP, "corpus": corpus, "n": n, "dim": h}


def _index(uri, n=240, **kw):
    return MilvusIndex(collection_name(CORPUS_FP, MODEL_FP), _meta(n), uri=uri, **kw)


@pytest.fixture(scope="module")
def corpus():
    queries = _encodings(25, 1, tokens=(1, 4))
    queries["lexical_weights"][2] = {}                       # a query without tokens: sparse hits all score 0
    queries["lexical_weights"][4] = {"39": 1.0}              # a rare token: fewer hits than the depth
    return _encodings(240, 0), queries, [f"doc{i}" for i in range(240)]


def _assert_same_rankings(milvus: MilvusRetriever, memory: HybridRetriever, queries):
    for mode in MODES:
        for kw in ({}, {"all_candidates": "union"}) if mode == "all" else ({},):
            got = milvus.search(queries, mode, k=10, colbert_depth=40, hybrid_depth=60, **kw)
            want = memory.search(queries, mode, k=10, colbert_depth=40, hybrid_depth=60, **kw)
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"{mode} {kw}")
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"{mode} {kw}")


def test_exact_milvus_ranks_as_the_in_memory_retriever_in_every_mode(tmp_path, corpus):
    enc, queries, docids = corpus
    index = _index(str(tmp_path / "m.db"))
    stats = index.ingest(enc, docids, langs=["xx"] * 240, batch_size=64, progress=False)
    assert stats == {"upserted": 240, "skipped": 0} and index.count() == 240
    _assert_same_rankings(MilvusRetriever(index, enc["colbert_vecs"], vocab_size=VOCAB),
                          HybridRetriever(enc, vocab_size=VOCAB), queries)
    again = index.ingest(enc, docids, langs=["xx"] * 240, batch_size=64, progress=False)   # idempotent
    assert again == {"upserted": 0, "skipped": 240} and index.count() == 240


def test_milvus_rankers_are_named_options_and_differ_from_the_paper_sum(tmp_path, corpus):
    enc, queries, docids = corpus
    index = _index(str(tmp_path / "m.db"))
    index.ingest(enc, docids, progress=False)
    r = MilvusRetriever(index, enc["colbert_vecs"], vocab_size=VOCAB)
    paper = r.search(queries, "dense+sparse", k=10, hybrid_depth=60, weights=(1, 0.3, 0))
    for fusion in ("milvus-weighted", "milvus-rrf"):
        ids, scores = r.search(queries, "dense+sparse", k=10, hybrid_depth=60, weights=(1, 0.3, 0), fusion=fusion)
        assert ids.shape == (25, 10) and (ids >= 0).all() and np.isfinite(scores).all()
        assert not np.allclose(scores, paper[1])                 # Milvus' scores are not Eq. 1's raw sum
        for i in (0, 2, 4):                                      # batched = one query at a time (2: no tokens)
            one = {key: v[i:i + 1] for key, v in queries.items()}
            got = r.search(one, "dense+sparse", k=10, hybrid_depth=60, weights=(1, 0.3, 0), fusion=fusion)
            np.testing.assert_array_equal(got[0][0], ids[i])
            np.testing.assert_allclose(got[1][0], scores[i], rtol=1e-6)
    with pytest.raises(ValueError, match="dense and sparse only"):
        r.search(queries, "all", fusion="milvus-rrf")
    with pytest.raises(ValueError, match="fusion must be one of"):
        r.search(queries, "dense+sparse", fusion="sum")


_KILLED_INGEST = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_milvus_index import _encodings, _index
    index = _index({uri!r})
    real, calls = index.client.upsert, []

    def upsert_then_die(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)        # mid-ingest: two batches of 64 stored, the rest not
        return out
    index.client.upsert = upsert_then_die
    index.ingest(_encodings(240, 0), [f"doc{{i}}" for i in range(240)], batch_size=64, progress=False)
""")


def test_a_killed_ingest_resumes_to_exactly_the_corpus(tmp_path, corpus):
    enc, _, docids = corpus
    uri = str(tmp_path / "m.db")
    script = tmp_path / "die.py"
    script.write_text(_KILLED_INGEST.format(tests=str(ROOT / "tests" / "retrieval"), uri=uri))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    index = _index(uri)
    assert index.count() == 128                              # what was stored before the kill is kept
    stats = index.ingest(enc, docids, batch_size=64, progress=False)
    assert stats == {"upserted": 112, "skipped": 128} and index.count() == 240
    rows = index.client.query(index.name, filter="id >= 0", output_fields=["id", "docid", "dense", "sparse"],
                              limit=1000)
    assert sorted(r["id"] for r in rows) == list(range(240))                 # no duplicate, none missing
    for r in rows:
        i = r["id"]
        assert r["docid"] == docids[i]
        assert np.array_equal(np.asarray(r["dense"], np.float32), enc["dense_vecs"][i])
        assert {str(t): w for t, w in r["sparse"].items() if t != NO_TOKENS} == enc["lexical_weights"][i]


def test_bad_input_and_faults_are_named(tmp_path, corpus):
    enc, queries, docids = corpus
    uri = str(tmp_path / "m.db")
    index = _index(uri)
    index.ingest(enc, docids, progress=False)
    with pytest.raises(MilvusIndexError, match="another model"):
        MilvusIndex(index.name, {**_meta(240), "model": "ef" * 32}, uri=uri)
    with pytest.raises(MilvusIndexError, match="another dense dimension"):
        MilvusIndex(index.name, _meta(240, h=16), uri=uri)
    assert index.count() == 240                                              # refused, nothing lost
    with pytest.raises(ValueError, match="empty corpus"):
        MilvusIndex("bgem3_empty", _meta(0), uri=uri)
    with pytest.raises(ValueError, match="dense dimension 4"):
        other = MilvusIndex("bgem3_other", _meta(240), uri=uri)
        other.ingest({**enc, "dense_vecs": enc["dense_vecs"][:, :4]}, docids, progress=False)
    with pytest.raises(ValueError, match="holds 240 rows: got 239"):
        index.ingest({**enc, "dense_vecs": enc["dense_vecs"][:-1]}, docids, progress=False)
    with pytest.raises(ValueError, match=r"query dense vectors must be \[Nq, 8\]"):
        index.dense_top(np.zeros((2, 3), np.float32), 5)
    with pytest.raises(ValueError, match="5 ColBERT vector sets for an index of 240 rows"):
        MilvusRetriever(index, enc["colbert_vecs"][:5])
    start = time.monotonic()
    with pytest.raises(MilvusIndexError, match="cannot reach Milvus at 'http://127.0.0.1:9'"):
        MilvusIndex("bgem3_x", _meta(3), uri="http://127.0.0.1:9")
    assert time.monotonic() - start < 60


@pytest.fixture
def lite_server(tmp_path):
    """``python -m milvus_lite server`` on 127.0.0.1, stopped after the test."""
    proc, uri, _ = start_lite_server(tmp_path / "srv", tmp_path / "server.log")
    try:
        yield uri
    finally:
        stop_lite_server(proc)


def test_server_mode_over_localhost_ranks_the_same(lite_server, corpus):
    enc, queries, docids = corpus
    index = _index(lite_server)
    index.ingest(enc, docids, batch_size=100, progress=False)
    _assert_same_rankings(MilvusRetriever(index, enc["colbert_vecs"], vocab_size=VOCAB),
                          HybridRetriever(enc, vocab_size=VOCAB), queries)


def test_hnsw_is_an_option_close_to_exact_and_kept_apart(tmp_path, corpus):
    enc, queries, docids = corpus
    uri = str(tmp_path / "m.db")
    hnsw = MilvusIndex("bgem3_hnsw", _meta(240), uri=uri, dense_kind="hnsw", hnsw_m=8, ef_search=64)
    hnsw.ingest(enc, docids, progress=False)
    exact = HybridRetriever(enc, vocab_size=VOCAB).search(queries, "dense", k=10)[0]
    approx = MilvusRetriever(hnsw, vocab_size=VOCAB).search(queries, "dense", k=10)[0]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert overlap >= 0.9, overlap
    with pytest.raises(MilvusIndexError, match="another dense index kind"):
        MilvusIndex("bgem3_hnsw", _meta(240), uri=uri)                  # built as HNSW, asked as FLAT
    with pytest.raises(ValueError, match="dense_kind must be one of"):
        MilvusIndex("bgem3_ivf", _meta(240), uri=uri, dense_kind="ivf")


def test_mindspore_still_imports_after_a_milvus_index(tmp_path):
    """MindSpore's protobuf modules need protobuf's pure-Python runtime, fixed at protobuf's first import:
    a process that opens a Milvus index first must still be able to load the model."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests" / "retrieval")!r})
        from test_milvus_index import _index
        _index({str(tmp_path / "m.db")!r}).count()
        import mindspore
        print("ok", mindspore.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(env, PYTHONPATH=str(ROOT), GLOG_v="3"), timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
