"""Corpus encoding cache: a second run encodes nothing; 2 shard processes merge to the 1-process result."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fixtures import xquad
from tiny_m3 import TableModel, tiny_model_dir

from bgem3_lib.evaluation.corpus_cache import cache_key, check_corpus, corpus_encodings, corpus_fingerprint

ROOT = Path(__file__).resolve().parents[2]


def _corpus(n: int = 6):
    paragraphs = [p["context"] for art in xquad("de")["data"][:4] for p in art["paragraphs"]]
    texts = [p[: 40 + 37 * i] for i, p in enumerate(paragraphs[:n])]
    return [f"d{i}" for i in range(n)], texts


def test_second_run_encodes_nothing(tmp_path):
    docids, texts = _corpus()
    model = TableModel()
    first = corpus_encodings(model, docids, texts, ["dense", "sparse"], batch_size=4, root=tmp_path)
    assert model.corpus_calls == 2                                        # 6 passages, batches of 4
    model.corpus_calls = 0
    again = corpus_encodings(model, docids, texts, ["dense", "sparse"], batch_size=4, root=tmp_path)
    assert model.corpus_calls == 0
    assert np.array_equal(first["dense_vecs"], again["dense_vecs"])
    assert first["lexical_weights"] == again["lexical_weights"] == model.encode(texts, return_sparse=True)[
        "lexical_weights"]
    # a new representation encodes only that one; the cached ones are reused
    both = corpus_encodings(model, docids, texts, ["dense", "colbert"], batch_size=4, root=tmp_path)
    assert model.corpus_calls == 2 and len(both["colbert_vecs"]) == 6
    model.corpus_calls = 0
    corpus_encodings(model, docids, texts, None, batch_size=4, root=tmp_path)
    assert model.corpus_calls == 0
    # another corpus or max_length is another cache entry
    corpus_encodings(model, docids, texts[:-1] + ["changed"], ["dense"], batch_size=4, root=tmp_path)
    corpus_encodings(model, docids, texts, ["dense"], max_length=64, batch_size=4, root=tmp_path)
    assert model.corpus_calls == 4
    assert len(list(tmp_path.iterdir())) == 3


def test_keys_and_bad_corpora():
    a = corpus_fingerprint(["x", "y"], ["ab", "c"])
    assert a != corpus_fingerprint(["x", "y"], ["a", "bc"])
    assert a != corpus_fingerprint(["y", "x"], ["ab", "c"])
    assert cache_key("m", a, 512, "float32") != cache_key("m", a, 256, "float32")
    with pytest.raises(ValueError, match="empty corpus"):
        check_corpus([], [])
    with pytest.raises(ValueError, match="'b' is empty"):
        check_corpus(["a", "b"], ["text", "  "])
    with pytest.raises(ValueError, match="duplicates"):
        check_corpus(["a", "a"], ["x", "y"])


_SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}, {tests!r} + '/evaluation']
    from test_corpus_cache import _corpus
    from bgem3_lib import BGEM3
    from bgem3_lib.evaluation.corpus_cache import corpus_encodings
    rank = int(sys.argv[1])
    docids, texts = _corpus(5)
    out = corpus_encodings(BGEM3({model!r}), docids, texts, max_length=24, batch_size=2, shard=(rank, 2),
                           root={root!r}, timeout=120)
    print("RESULT", rank, out is None)
""")


def test_two_shard_processes_merge_to_the_single_process_result(tmp_path):
    from bgem3_lib import BGEM3
    model_dir = str(tiny_model_dir())
    script = tmp_path / "shard.py"
    script.write_text(_SHARD_SCRIPT.format(tests=str(ROOT / "tests"), model=model_dir,
                                           root=str(tmp_path / "c2")))
    # same thread settings as this process: BLAS results are bit-reproducible only for equal thread counts
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for r in (1, 0)]
    model = BGEM3(model_dir)
    docids, texts = _corpus(5)
    single = corpus_encodings(model, docids, texts, max_length=24, batch_size=2, root=tmp_path / "c1")
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert "RESULT 1 True" in outs[0][0] and "RESULT 0 False" in outs[1][0]    # only rank 0 returns
    (key,) = [d.name for d in (tmp_path / "c2").iterdir()]
    assert not (tmp_path / "c2" / key / "shards").exists()                   # parts removed after merging
    merged = corpus_encodings(model, docids, texts, max_length=24, batch_size=2, root=tmp_path / "c2")
    assert np.array_equal(merged["dense_vecs"], single["dense_vecs"])
    assert [list(d.items()) for d in merged["lexical_weights"]] == [
        list(d.items()) for d in single["lexical_weights"]]
    assert all(np.array_equal(a, b) for a, b in zip(merged["colbert_vecs"], single["colbert_vecs"]))
    # and both are the plain encode_corpus output, in corpus order
    direct = model.encode_corpus(texts, max_length=24, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(merged["dense_vecs"], direct["dense_vecs"], atol=1e-5)
    assert [sorted(d) for d in merged["lexical_weights"]] == [sorted(d) for d in direct["lexical_weights"]]
    assert [len(v) for v in merged["colbert_vecs"]] == [len(v) for v in direct["colbert_vecs"]]


# ---------------------------------------------------------------- kills and concurrent runs

_KILLED_MERGE = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{tests!r}, {tests!r} + '/evaluation']
    from test_corpus_cache import _corpus
    from tiny_m3 import TableModel
    from bgem3_lib.evaluation import encoding_store
    from bgem3_lib.evaluation.corpus_cache import corpus_encodings
    real, written = encoding_store._save_array, []

    def save_then_die(path, array):                  # the merge into the cache folder (not a chunk) dies
        real(path, array)                            # after its first file: SIGKILL, no clean-up runs
        if "chunk" not in str(path.parent.name) and ".tmp" not in str(path.parent):
            written.append(path)
            if len(written) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
    encoding_store._save_array = save_then_die
    model = TableModel()
    model._bgem3_fingerprint = "table-fixed"
    docids, texts = _corpus(9)
    corpus_encodings(model, docids, texts, ["dense", "sparse", "colbert"], batch_size=2, root={root!r},
                     chunk_texts=2)
""")


def _table_model():
    model = TableModel()
    model._bgem3_fingerprint = "table-fixed"
    return model


def test_a_kill_during_the_merge_then_a_rerun_equals_a_clean_run(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(_KILLED_MERGE.format(tests=str(ROOT / "tests"), root=str(tmp_path / "killed")))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert run.returncode == -9, run.stderr[-2000:]                     # killed inside the merge
    (key,) = [d for d in (tmp_path / "killed").iterdir()]
    assert (key / "dense.npy").is_file() and not (key / "meta.json").exists()   # half merged, not committed
    docids, texts = _corpus(9)
    model = _table_model()
    again = corpus_encodings(model, docids, texts, ["dense", "sparse", "colbert"], batch_size=2,
                             root=tmp_path / "killed", chunk_texts=2)
    assert model.corpus_calls == 0                                      # every chunk was already committed
    clean = corpus_encodings(_table_model(), docids, texts, ["dense", "sparse", "colbert"], batch_size=2,
                             root=tmp_path / "clean", chunk_texts=2)
    assert np.array_equal(again["dense_vecs"], clean["dense_vecs"])
    assert again["lexical_weights"] == clean["lexical_weights"]
    assert all(np.array_equal(a, b) for a, b in zip(again["colbert_vecs"], clean["colbert_vecs"]))
    assert sorted(p.name for p in key.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    assert not (key / "shards").exists()                                # parts and temporaries cleaned


_SLOW_MERGE_EVAL = textwrap.dedent("""
    import sys, time
    import bgem3_lib.evaluation.corpus_cache as cc
    from bgem3_lib.cli import main
    real = cc.merge_parts

    def slow_merge(*a, **k):                          # a large corpus's merge, in small: a wide window
        time.sleep(1.5)
        return real(*a, **k)
    cc.merge_parts = slow_merge
    sys.exit(main(sys.argv[1:]))
""")


def test_two_concurrent_evals_on_one_cache_both_succeed_with_identical_results(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "GLOG_v": "3", "BGEM3_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    if "BGEM3_DATA" in os.environ:
        env["BGEM3_DATA"] = os.environ["BGEM3_DATA"]
    script = tmp_path / "slow_merge_eval.py"
    script.write_text(_SLOW_MERGE_EVAL)
    procs = [subprocess.Popen([sys.executable, str(script), "eval", "--task", "xquad-longdoc", "--model",
                               str(tiny_model_dir()), "--modes", "dense,sparse,all", "--langs", "en,de",
                               "--out", str(tmp_path / f"out{i}"), "--cache", str(tmp_path / "cache"),
                               "--limit-queries", "3", "--max-length", "32", "--batch-size", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    a, b = ((tmp_path / f"out{i}" / "results.csv").read_text() for i in (0, 1))
    assert a == b and len(a.splitlines()) > 10
    for key in (tmp_path / "cache").iterdir():                          # one whole cache entry per corpus
        assert not (key / "shards").exists() and (key / "meta.json").is_file()
