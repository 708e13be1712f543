"""eval through a real Milvus Lite index equals the in-memory run: identical rankings, metrics to 1e-6."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny_m3 import tiny_model_dir

from bgem3_lib.cli import main
from bgem3_lib.evaluation.runner import evaluate_set, limit_queries, load_task, run_eval
from bgem3_lib.evaluation.search_backend import SearchBackend
from bgem3_lib.retrieval.modes import MODES


@pytest.fixture(scope="module")
def tiny():
    from bgem3_lib import BGEM3
    return BGEM3(str(tiny_model_dir()))


@pytest.mark.parametrize(("task", "langs", "limit_docs"), [("tydi", ["sw", "te"], 60), ("xquad-xling", ["de"], None)])
def test_milvus_eval_equals_the_in_memory_eval(tmp_path, tiny, task, langs, limit_docs):
    common = dict(limit=6, limit_docs=limit_docs, max_length=32, batch_size=16, cache_root=tmp_path / "cache")
    memory = run_eval(task, tiny, MODES, langs, tmp_path / "mem", **common)
    milvus = run_eval(task, tiny, MODES, langs, tmp_path / "mil", **common,
                      backend=SearchBackend("milvus", uri=str(tmp_path / "m.db")))
    assert len(memory) > 20 and set(memory["mode"]) == set(MODES)
    pd.testing.assert_frame_equal(memory, milvus, check_exact=False, atol=1e-6, rtol=0)


def test_rankings_are_identical_through_milvus(tmp_path, tiny):
    es = limit_queries(load_task("tydi", "sw"), 8)
    from bgem3_lib.evaluation.corpus_cache import corpus_encodings
    docids, texts = list(es.corpus)[:80], list(es.corpus.values())[:80]
    enc = corpus_encodings(tiny, docids, texts, ["dense", "sparse", "colbert"], max_length=32, root=tmp_path)
    q = tiny.encode_queries(list(es.queries.values()), max_length=32, return_sparse=True, return_colbert_vecs=True)
    mem = SearchBackend().retriever(tiny, docids, texts, enc, "sw", 32)
    mil = SearchBackend("milvus", uri=str(tmp_path / "m.db")).retriever(tiny, docids, texts, enc, "sw", 32)
    for mode in MODES:
        a, b = mem.search(q, mode, k=20), mil.search(q, mode, k=20)
        np.testing.assert_array_equal(a[0], b[0], err_msg=mode)
        np.testing.assert_array_equal(a[1], b[1], err_msg=mode)
    assert evaluate_set is not None


def test_cli_index_options_fail_fast(tmp_path, capsys):
    base = ["eval", "--task", "tydi", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    assert main(base + ["--index", "milvus", "--milvus-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach Milvus at 'http://127.0.0.1:9'" in err and "neither a model directory" not in err, err
    assert main(base + ["--milvus-uri", str(tmp_path / "m.db")]) == 2
    assert "but the index is 'memory'" in capsys.readouterr().err


def test_cli_eval_through_milvus_writes_the_same_results(tmp_path):
    args = ["eval", "--task", "xquad-xling", "--model", str(tiny_model_dir()), "--modes", ",".join(MODES),
            "--langs", "zh", "--limit-queries", "4", "--max-length", "32", "--cache", str(tmp_path / "c")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--index", "milvus", "--milvus-uri", str(tmp_path / "m.db")]) == 0
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in "ab")
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)
