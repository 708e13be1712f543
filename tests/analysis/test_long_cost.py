"""bgem3_lib.analysis.long_cost: texts cut to exact token counts, and bgem3_lib (CPU kernels and plain MindSpore
cells) beside FlagEmbedding on identical texts of a tiny random BAAI-layout checkpoint, one length past the
1,024-row attention block."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bgem3_lib.analysis.long_cost import agreement, cost_table, measure_long_cost, model_tokenizer, texts_of_length
from bgem3_lib.analysis.reference_runs import RunResult, run_implementation, write_random_checkpoint
from bgem3_lib.model.tokenization import M3Tokenizer

LENGTHS = (64, 1500)
ENGINES = ("bgem3_lib", "bgem3_lib/mindspore", "flagembedding")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("long-cost") / "ckpt", layers=2, hidden=64, heads=4,
                                   ffn=128, max_pos=2050)


@pytest.fixture(scope="module")
def measured(checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("long-cost-runs")
    rows = measure_long_cost(checkpoint, lengths=LENGTHS, implementations=ENGINES, workdir=work,
                             docs_per_length=2, batch_size=2, label="tiny")
    return rows, work


def test_texts_tokenize_to_exactly_the_length():
    tok = M3Tokenizer.from_file()
    for n in (5, 300, 2100):
        texts = texts_of_length(tok, n, count=3, seed=n)
        assert [len(ids) for ids in tok.encode_ids(texts, 10 ** 6, warn=False)] == [n, n, n]
        assert len(set(texts)) == 3                                  # three different documents
    assert texts_of_length(tok, 300, 2, seed=4) == texts_of_length(tok, 300, 2, seed=4)


def test_bad_text_requests_are_refused():
    tok = M3Tokenizer.from_file()
    with pytest.raises(ValueError, match="n_tokens must be an integer > 2"):
        texts_of_length(tok, 2)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        texts_of_length(tok, 50, count=0)
    with pytest.raises(ValueError, match="langs must be"):
        texts_of_length(tok, 50, langs=("xx",))
    with pytest.raises(ValueError, match="holds only .* fewer than 1000000"):
        texts_of_length(tok, 10 ** 6, langs=("en",))


def test_rows_time_and_memory_per_length(measured):
    rows, _ = measured
    assert [(r["length"], r["implementation"]) for r in rows] == [(n, e) for n in LENGTHS for e in ENGINES]
    for r in rows:
        assert r["model"] == "tiny" and r["docs"] == 2
        assert r["seconds_per_doc"] > 0 and r["cpu_seconds_per_doc"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["seconds_per_doc"])
        assert 0 < r["rss_after_load_mib"] <= r["max_rss_mib"] and r["peak_growth_mib"] >= 0
        assert r["rss_before_encode_mib"] + r["peak_growth_mib"] <= r["max_rss_mib"] + 1     # sampled <= true peak


def test_engines_read_identical_texts_and_agree(measured, checkpoint):
    rows, work = measured
    tok, max_length = model_tokenizer(checkpoint)
    assert max_length == 2048
    for n in LENGTHS:
        texts = [json.loads((work / str(n) / e.replace("/", "-") / e.split("/")[0] / "texts.json").read_text())
                 for e in ENGINES]                       # <workdir>/<length>/<engine>/<implementation>/
        assert texts[0] == texts[1] == texts[2]
        assert [len(ids) for ids in tok.encode_ids(texts[0], 10 ** 6, warn=False)] == [n, n]
    for r in rows:
        if r["implementation"] == "flagembedding":
            assert r["reference"] is None and np.isnan(r["max_diff_dense"])
        else:
            assert r["reference"] == "flagembedding"
            assert max(r["max_diff_dense"], r["max_diff_colbert"], r["max_diff_sparse"]) <= 1e-5, r


def test_disagreeing_engines_are_refused():
    def run(name, dense, colbert):
        return RunResult(name, np.array([dense], np.float32), [{"5": 0.5}], [np.array([colbert], np.float32)],
                         1.0, 1.0, 3)
    ref = run("flagembedding", [0.6, 0.8], [1.0, 0.0])
    close, far_colbert = run("bgem3_lib", [0.6, 0.80005], [1.0, 0.0]), run("x", [0.6, 0.8], [1.0, 0.001])
    diffs = agreement({"flagembedding": ref, "bgem3_lib": close}, "flagembedding", tol=1e-4)
    assert list(diffs) == ["bgem3_lib"] and diffs["bgem3_lib"]["dense"] == pytest.approx(5e-5, abs=1e-6)
    with pytest.raises(RuntimeError, match=r"bgem3_lib and flagembedding disagree at 8 tokens: dense 5e-05"):
        agreement({"flagembedding": ref, "bgem3_lib": close}, "flagembedding", tol=1e-5, what=" at 8 tokens")
    with pytest.raises(RuntimeError, match="ColBERT 0.001"):
        agreement({"flagembedding": ref, "x": far_colbert}, "flagembedding")


def test_cost_table(measured):
    rows, _ = measured
    table = cost_table(rows)
    assert table.index.tolist() == list(LENGTHS)
    assert [c[1] for c in table.columns] == list(ENGINES) + ["FlagEmbedding / ours"]
    ratio = table[("tiny", "flagembedding")] / table[("tiny", "bgem3_lib")]
    np.testing.assert_allclose(table[("tiny", "FlagEmbedding / ours")], ratio)
    memory = cost_table(rows, "peak_growth_mib", ratio=False)
    assert [c[1] for c in memory.columns] == list(ENGINES) and memory.index.tolist() == list(LENGTHS)
    with pytest.raises(ValueError, match="carry 'watts'"):
        cost_table(rows, "watts")


def test_bad_measurements_are_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="implementations must be distinct names"):
        measure_long_cost(checkpoint, (64,), ("onnx",), tmp_path)
    with pytest.raises(ValueError, match="implementations must be distinct names"):
        measure_long_cost(checkpoint, (64,), ("bgem3_lib", "bgem3_lib"), tmp_path)
    with pytest.raises(ValueError, match="lengths must be a non-empty"):
        measure_long_cost(checkpoint, (), workdir=tmp_path)
    with pytest.raises(ValueError, match=r"lengths must lie in \(2, 2048\]"):
        measure_long_cost(checkpoint, (64, 4096), workdir=tmp_path)
    with pytest.raises(ValueError, match="docs_per_length and batch_size"):
        measure_long_cost(checkpoint, (64,), docs_per_length=0, workdir=tmp_path)
    with pytest.raises(ValueError, match="applies to bgem3_lib only"):
        run_implementation("flagembedding", checkpoint, ["a"], tmp_path, backend="mindspore")
    with pytest.raises(ValueError, match="warmup must be"):
        run_implementation("bgem3_lib", checkpoint, ["a"], tmp_path, warmup=[])
