"""bgem3_lib.BGEM3FlagModel as a drop-in for FlagEmbedding 1.4.2's BGEM3FlagModel: the same usage script
(tests/model/flag_usage.py) against both on a random checkpoint in the exact BAAI/bge-m3 layout, each in its
own process; the signatures of the two classes; and how arguments FlagEmbedding accepts are honoured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bgem3_lib.analysis.torch_reference import run_reference
from bgem3_lib.model.flag_model import BGEM3FlagModel, parse_devices
from bgem3_lib.weights.assets import asset_path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SMALL = dict(layers=2, hidden=64, heads=4, ffn=128, max_pos=514)
TOL = 1e-5
METHODS = ("__init__", "encode", "encode_queries", "encode_corpus", "compute_score",
           "compute_lexical_matching_score", "colbert_score", "convert_id_to_token")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("flag") / "bge-m3-random"
    run_reference("write_bge_m3_checkpoint", out_dir=str(out), tokenizer_json=str(asset_path("tokenizer.json")),
                  seed=1, **SMALL)
    return out


def _run(args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _close(a, b, path="") -> list[str]:
    """Paths where two JSON values differ (numbers by more than TOL, dict keys, lengths, types)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys differ {sorted(set(a) ^ set(b))[:6]}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return [] if abs(a - b) <= TOL else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_flagembedding_usage_runs_unchanged_and_agrees(checkpoint, tmp_path):
    outs = {}
    for impl in ("flagembedding", "bgem3_lib"):
        outs[impl] = tmp_path / f"{impl}.json"
        _run([str(HERE / "flag_usage.py"), impl, str(checkpoint), str(outs[impl])])
    ref, ours = (json.loads(outs[i].read_text()) for i in ("flagembedding", "bgem3_lib"))
    assert set(ref["scores"]) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}
    assert all(ref["tokens"]) and np.max(ref["lexical_matrix"]) > 0       # the comparison is not vacuous
    problems = _close(ref, ours)
    assert not problems, "\n".join(problems[:20])


def test_signatures_accept_every_flagembedding_parameter():
    code = ("import inspect, json\nfrom FlagEmbedding import BGEM3FlagModel as M\n"
            f"print(json.dumps({{n: list(inspect.signature(getattr(M, n)).parameters) for n in {METHODS!r}}}))")
    theirs = json.loads(_run(["-c", code], timeout=600).stdout.strip().splitlines()[-1])
    import inspect
    for name in METHODS:
        ours = inspect.signature(getattr(BGEM3FlagModel, name)).parameters
        missing = [p for p in theirs[name] if p not in ours]
        assert not missing, f"{name} lacks {missing}"
        assert list(ours)[:len(theirs[name]) - 1] == theirs[name][:-1] or name not in ("__init__",), name
    defaults = inspect.signature(BGEM3FlagModel.__init__).parameters
    assert (defaults["batch_size"].default, defaults["query_max_length"].default,
            defaults["passage_max_length"].default, defaults["use_fp16"].default) == (256, 512, 512, True)


def test_parse_devices():
    assert parse_devices("cpu") == ("CPU", None) and parse_devices("cuda") == ("GPU", None)
    assert parse_devices(2) == ("GPU", 2) and parse_devices("npu:3") == ("Ascend", 3)
    assert parse_devices(["cuda:0"]) == ("GPU", 0)
    assert parse_devices(["npu:0", "npu:1"], {"RANK_ID": "0", "RANK_SIZE": "2"}) == ("Ascend", 0)
    with pytest.raises(ValueError, match="msrun --worker_num=2"):
        parse_devices(["cuda:0", "cuda:1"], {})
    with pytest.raises(ValueError, match="unknown device 'tpu:0'"):
        parse_devices("tpu:0")
    with pytest.raises(ValueError, match="empty"):
        parse_devices([])


@pytest.fixture(scope="module")
def tiny_dir():
    from tiny_m3 import tiny_model_dir
    return str(tiny_model_dir())


def test_arguments_that_cannot_be_honoured_say_so(tiny_dir):
    with pytest.warns(UserWarning, match="cache_dir"):
        BGEM3FlagModel(tiny_dir, cache_dir="/tmp/hf")
    with pytest.warns(UserWarning, match="trust_remote_code"):
        BGEM3FlagModel(tiny_dir, trust_remote_code=True)
    with pytest.warns(UserWarning, match="ignores the keyword argument.*'max_seq_len'"):
        BGEM3FlagModel(tiny_dir, max_seq_len=3)
    with pytest.raises(ValueError, match="convert_to_numpy=False"):
        BGEM3FlagModel(tiny_dir).encode(["a"], convert_to_numpy=False)
    with pytest.raises(ValueError, match="colbert_dim=7"):
        BGEM3FlagModel(tiny_dir, colbert_dim=7)
    with pytest.raises(ValueError, match="pooling_method"):
        BGEM3FlagModel(tiny_dir, pooling_method="last_token")
    with pytest.raises(ValueError, match="batch_size"):
        BGEM3FlagModel(tiny_dir, batch_size=0)


def test_fp16_on_cpu_computes_float32_on_rounded_weights_as_flagembedding(tiny_dir):
    exact = BGEM3FlagModel(tiny_dir, use_fp16=False).model
    w = exact.encoder.layers[0].attention.query.weight.asnumpy()
    for flag, rounded in (({"use_fp16": True}, w.astype(np.float16).astype(np.float32)),
                          ({"use_bf16": True}, None)):
        m = BGEM3FlagModel(tiny_dir, **flag).model
        assert m.dtype == "float32" and m.backend == "kernels"
        got = m.encoder.layers[0].attention.query.weight.asnumpy()
        assert got.dtype == np.float32 and not np.array_equal(got, w)
        if rounded is not None:
            np.testing.assert_array_equal(got, rounded)
        else:                                   # bfloat16 keeps 8 mantissa bits: the low 16 bits are zero
            assert not (got.view(np.uint32) & 0xFFFF).any()


def test_instructions_truncate_dim_and_defaults(tiny_dir):
    m = BGEM3FlagModel(tiny_dir, query_instruction_for_retrieval="Q", query_instruction_format="{}: {}",
                       passage_instruction_for_retrieval="P", return_sparse=True)
    plain = m.model
    q = m.encode_queries(["hello world"])
    np.testing.assert_allclose(q["dense_vecs"], plain.encode(["Q: hello world"], max_length=512)["dense_vecs"],
                               atol=1e-6)
    assert q["lexical_weights"] is not None                 # return_sparse=True from the constructor
    c = m.encode_corpus(["bonjour"])
    np.testing.assert_allclose(c["dense_vecs"], plain.encode(["Pbonjour"])["dense_vecs"], atol=1e-6)
    cut = BGEM3FlagModel(tiny_dir, truncate_dim=8).encode(["hello world"], return_colbert_vecs=True)
    full = plain.encode(["hello world"], return_colbert_vecs=True)
    ref = full["dense_vecs"][:, :8] / np.linalg.norm(full["dense_vecs"][:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut["dense_vecs"], ref, atol=1e-6)
    assert cut["colbert_vecs"][0].shape[1] == 8
    np.testing.assert_allclose(np.linalg.norm(cut["colbert_vecs"][0], axis=1), 1, atol=1e-5)
    assert m.compute_score([]) == []
    one = m.compute_score(("hello", "hello world"))
    assert set(one) == {"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}
    assert all(isinstance(v, float) for v in one.values())


def test_max_length_beyond_the_positions_is_cut_with_a_warning(tiny_dir):
    m = BGEM3FlagModel(tiny_dir)
    long = "word " * 200
    limit = m.model.config.max_length
    with pytest.warns(UserWarning, match=f"max_length=8192 exceeds the model.s position table: .* at {limit}"):
        cut = m.encode([long], max_length=8192)["dense_vecs"]
    with pytest.warns(UserWarning, match="truncated"):
        ref = m.encode([long], max_length=limit)["dense_vecs"]
    np.testing.assert_array_equal(cut, ref)


def test_lexical_helpers_follow_flagembedding(tiny_dir):
    m = BGEM3FlagModel(tiny_dir)
    a, b = {"10": 0.5, "7": 0.2}, {"10": 0.4, "99": 1.0}
    assert m.compute_lexical_matching_score(a, b) == pytest.approx(0.2)
    np.testing.assert_allclose(m.compute_lexical_matching_score([a, b], [b]), [[0.2], [1.16]])
    with pytest.raises(ValueError, match="two dicts"):
        m.compute_lexical_matching_score(a, [b])
    one = m.convert_id_to_token({"6": 0.5})
    assert isinstance(one, dict) and list(one.values()) == [0.5]
    both = m.convert_id_to_token([{"6": 0.5}, {"7": 0.1}])
    assert isinstance(both, list) and len(both) == 2
    q, p = np.eye(2, dtype=np.float32), np.array([[0.8, 0.6]], np.float32)
    assert m.colbert_score(q, p) == pytest.approx(0.7)
