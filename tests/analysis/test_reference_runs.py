"""bgem3_lib.analysis.reference_runs: the comparison of two runs (pure NumPy) and its input checks.

The subprocess runs themselves are exercised by notebooks/09_three_implementations.md and, for
bgem3_lib vs FlagEmbedding, by tests/model/test_equivalence.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from bgem3_lib.analysis.reference_runs import RunResult, max_differences, run_implementation


def _run(name, dense, lexical, colbert, seconds=2.0, n_tokens=10):
    return RunResult(name, np.asarray(dense, np.float32), lexical,
                     [np.asarray(c, np.float32) for c in colbert], seconds, 1.0, n_tokens)


def test_max_differences_hand_worked():
    a = _run("a", [[1.0, 0.0], [0.0, 1.0]], [{"5": 0.5, "9": 0.1}, {"7": 0.3}],
             [[[1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    b = _run("b", [[0.8, 0.6], [0.0, 1.0]], [{"5": 0.25}, {"7": 0.3, "8": 0.05}],
             [[[1.0, 0.0]], [[0.0, 1.0], [0.6, 0.8]]])
    d = max_differences(a, b)
    assert d["dense"] == pytest.approx(0.6)
    # token "5": |0.5 - 0.25|; "9" only in a: 0.1; "8" only in b: 0.05 -> 0.25
    assert d["sparse"] == pytest.approx(0.25)
    assert d["colbert"] == pytest.approx(0.8)
    # a's score matrix is the identity; b's off-diagonal score is 0.6, diagonal 1
    assert d["dense_scores"] == pytest.approx(0.6, abs=1e-6)
    assert max_differences(a, a) == {"dense": 0.0, "sparse": 0.0, "colbert": 0.0, "dense_scores": 0.0}


def test_missing_token_counts_as_zero_weight():
    a = _run("a", [[1.0]], [{"3": 2.0}], [[[1.0]]])
    b = _run("b", [[1.0]], [{}], [[[1.0]]])
    assert max_differences(a, b)["sparse"] == 2.0


def test_tokens_per_second():
    assert _run("a", [[1.0]], [{}], [[[1.0]]], seconds=4.0, n_tokens=100).tokens_per_second == 25.0


def test_mismatched_runs_are_rejected():
    a = _run("a", [[1.0, 0.0]], [{}], [[[1.0, 0.0]]])
    with pytest.raises(ValueError, match="different inputs"):
        max_differences(a, _run("b", [[1.0, 0.0], [0.0, 1.0]], [{}, {}], [[[1.0, 0.0]]] * 2))
    with pytest.raises(ValueError, match="ColBERT shapes differ"):
        max_differences(a, _run("b", [[1.0, 0.0]], [{}], [[[1.0, 0.0], [0.0, 1.0]]]))


def test_run_implementation_checks_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown implementation"):
        run_implementation("onnx", tmp_path, ["a"], tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        run_implementation("bgem3_lib", tmp_path, ["a", ""], tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_implementation("bgem3_lib", tmp_path, ["a"], tmp_path)


def test_random_checkpoint_is_reused_only_at_its_shape(tmp_path):
    from bgem3_lib.analysis.reference_runs import write_random_checkpoint
    out = write_random_checkpoint(tmp_path / "ckpt", layers=1, hidden=32, heads=2, ffn=64, max_pos=40)
    first = (out / "pytorch_model.bin").stat().st_mtime_ns
    assert write_random_checkpoint(out, layers=1, hidden=32, heads=2, ffn=64, max_pos=40) == out
    assert (out / "pytorch_model.bin").stat().st_mtime_ns == first                 # same shape: reused
    write_random_checkpoint(out, layers=1, hidden=32, heads=2, ffn=64, max_pos=70)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 70   # rewritten


def test_mindnlp_imports_beside_onnxruntime():
    # diffusers (imported by MindNLP) breaks when it sees onnxruntime installed; import_mindnlp hides it
    import subprocess
    import sys
    pytest.importorskip("onnxruntime")
    code = "from bgem3_lib.analysis.reference_runs import import_mindnlp; import_mindnlp(); import transformers"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
