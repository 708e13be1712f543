"""bgem3_lib.analysis.onnx_reference: a tiny random BAAI-layout checkpoint exported to ONNX from the PyTorch
reference and run by ONNX Runtime, checked against FlagEmbedding 1.4.2 (its own process) on texts of
different lengths in shared padded batches, one of them cut by max_length; then its dynamic int8 quantization."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures import long_text

from bgem3_lib.analysis.onnx_reference import (
    OnnxEncoder,
    export_onnx,
    exported_onnx,
    lexical_weights,
    pad_batch,
    quantize_onnx,
)
from bgem3_lib.analysis.reference_runs import run_implementation, write_random_checkpoint

TOL = 1e-4
MAX_LENGTH, BATCH = 48, 3


def _texts() -> list[str]:
    """Seven texts of 3 to 48 tokens, one (two XQuAD paragraphs) cut by MAX_LENGTH."""
    return ["hello", "Wer schrieb den Faust und wann wurde er uraufgeführt?", long_text("en", 2),
            "東京は日本の首都です。", "x", "BGE M3 is an embedding model supporting dense, lexical and multi-vector "
            "retrieval in more than one hundred languages.", "Привет, мир"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("onnx") / "ckpt", layers=2, hidden=64, heads=4, ffn=128)


@pytest.fixture(scope="module")
def models(checkpoint):
    return exported_onnx(checkpoint), exported_onnx(checkpoint, int8=True)     # into checkpoint/onnx/


@pytest.fixture(scope="module")
def flag(checkpoint, tmp_path_factory):
    return run_implementation("flagembedding", checkpoint, _texts(), tmp_path_factory.mktemp("onnx-flag"),
                              max_length=MAX_LENGTH, batch_size=BATCH)


def _encode(path, checkpoint, **kw):
    return OnnxEncoder(path, checkpoint / "tokenizer.json", threads=2).encode(_texts(), max_length=MAX_LENGTH,
                                                                                batch_size=BATCH, **kw)


def test_fp32_matches_flagembedding(models, checkpoint, flag):
    ours = _encode(models[0], checkpoint)
    lengths = [len(c) + 1 for c in ours["colbert_vecs"]]
    assert max(lengths) == MAX_LENGTH and len(set(lengths)) >= 5      # one text cut; batches of mixed lengths
    assert ours["dense_vecs"].dtype == np.float32 and ours["dense_vecs"].shape == flag.dense.shape
    diffs = {"dense": float(np.abs(ours["dense_vecs"] - flag.dense).max()), "sparse": 0.0, "colbert": 0.0}
    for i, (a, b) in enumerate(zip(flag.lexical, ours["lexical_weights"])):
        assert list(a) == list(b), f"text {i}: lexical keys differ: {set(a) ^ set(b)}"
        diffs["sparse"] = max([diffs["sparse"]] + [abs(a[k] - b[k]) for k in a])
    for i, (a, b) in enumerate(zip(flag.colbert, ours["colbert_vecs"])):
        assert a.shape == b.shape, f"text {i}: colbert shapes {a.shape} vs {b.shape}"
        diffs["colbert"] = max(diffs["colbert"], float(np.abs(a - b).max()))
    print("max abs differences, ONNX Runtime fp32 vs FlagEmbedding:", diffs)
    assert all(v <= TOL for v in diffs.values()), diffs
    unsorted = _encode(models[0], checkpoint, sort=False)        # other batches, other padding: same vectors
    assert np.abs(unsorted["dense_vecs"] - ours["dense_vecs"]).max() <= 1e-5


def test_int8_close_to_fp32(models, checkpoint):
    import onnx
    ops = {n.op_type for n in onnx.load(str(models[1])).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops
    fp32, int8 = _encode(models[0], checkpoint), _encode(models[1], checkpoint)
    cos = (fp32["dense_vecs"] * int8["dense_vecs"]).sum(1)      # both unit vectors
    assert [c.shape for c in int8["colbert_vecs"]] == [c.shape for c in fp32["colbert_vecs"]]
    colbert_cos = min(float((a * b).sum(1).min()) for a, b in zip(fp32["colbert_vecs"], int8["colbert_vecs"]))
    changed = float(np.abs(fp32["dense_vecs"] - int8["dense_vecs"]).max())
    print(f"int8 vs fp32: dense cosine min {cos.min():.7f} (max abs diff {changed:.2g}), colbert cosine min "
          f"{colbert_cos:.5f}")
    # sanity bounds only: this random model's outputs are dominated by its (float32) embeddings, so int8 moves
    # them little; they say nothing about int8 accuracy on trained weights
    assert cos.min() > 0.9 and colbert_cos > 0.9, (cos, colbert_cos)
    assert changed > 1e-6, "the int8 graph computes exactly what the fp32 one does: nothing was quantized?"


def test_export_is_reused_while_newer_than_the_weights(models, checkpoint):
    assert [p.name for p in models] == ["model.onnx", "model_int8.onnx"]
    mtimes = [p.stat().st_mtime for p in models]
    assert [exported_onnx(checkpoint), exported_onnx(checkpoint, int8=True)] == list(models)
    assert [p.stat().st_mtime for p in models] == mtimes
    assert sorted(p.name for p in models[0].parent.iterdir()) == [".export.lock", "model.onnx", "model_int8.onnx"]


def test_bad_inputs(models, checkpoint, tmp_path):
    enc = OnnxEncoder(models[0], checkpoint / "tokenizer.json", threads=1)
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        enc.encode(["ok", 3])
    with pytest.raises(ValueError, match=r"texts\[0\] is blank"):
        enc.encode([" \u200b"])
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        enc.encode(["ok"], max_length=513)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        enc.encode(["ok"], batch_size=0)
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        OnnxEncoder(tmp_path / "none.onnx", checkpoint / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        OnnxEncoder(models[0], tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="missing .*sparse_linear.pt.*pytorch_model.bin"):
        export_onnx(tmp_path, tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        quantize_onnx(tmp_path / "none.onnx", tmp_path / "q.onnx")


def test_helpers():
    assert lexical_weights(np.array([0.5, 0.2, 0.0, 0.7, 0.1], np.float32), [0, 7, 8, 7, 2]) == {"7": np.float32(0.7)}
    ids, mask = pad_batch([[0, 5, 2], [0, 2]])
    assert ids.dtype == mask.dtype == np.int64 and ids.tolist() == [[0, 5, 2], [0, 2, 1]] and mask[1].sum() == 2
