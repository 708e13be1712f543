"""BGEM3 user API: real weights on real text (XQuAD), and bad input handling."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from fixtures import xquad

from bgem3_lib import BGEM3


@pytest.fixture(scope="module")
def base():
    return BGEM3("m3-small-base")


def _xquad_questions(lang: str):
    """(questions, index of their source paragraph among the 240)."""
    qs, gold, p = [], [], 0
    for art in xquad(lang)["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                qs.append(qa["question"])
                gold.append(p)
            p += 1
    return qs, np.array(gold)


def test_xquad_dense_retrieval_r_at_1(base):
    paragraphs = [para["context"] for art in xquad("en")["data"] for para in art["paragraphs"]]
    assert len(paragraphs) == 240
    P = base.encode_corpus(paragraphs, batch_size=32, max_length=512)["dense_vecs"]
    r1 = {}
    for lang in ("en", "de"):
        qs, gold = _xquad_questions(lang)
        assert len(qs) == 1190
        Q = base.encode_queries(qs, batch_size=128, max_length=512)["dense_vecs"]
        r1[lang] = float(np.mean(np.argmax(Q @ P.T, axis=1) == gold))
    print(f"XQuAD R@1 with m3-small-base: en->en {r1['en']:.4f}, de->en {r1['de']:.4f}")
    assert r1["en"] >= 0.85
    assert r1["de"] >= 0.70


def test_encode_outputs_in_input_order_and_normalised(base):
    texts = ["query: a much longer sentence about the weather in Paris today", "query: hi",
             "query: medium length text here"]
    out = base.encode(texts, batch_size=2)
    single = [base.encode(t)["dense_vecs"] for t in texts]
    np.testing.assert_allclose(out["dense_vecs"], np.stack(single), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["dense_vecs"], axis=1), 1.0, atol=1e-5)


def test_encode_runs_with_the_spinning_runtime_threads_idle(base, monkeypatch):
    """BGEM3.encode runs its batches inside ``runtime.spinning_threads_idle``: MindSpore's ActorThread pool is at
    SCHED_IDLE while a batch runs, at the normal policy after the call."""
    import os

    from bgem3_lib.model import runtime
    if not runtime.can_restore_policy():
        pytest.skip("this user may not move a thread back from SCHED_IDLE")
    base.encode("query: warm")                      # the runtime pool exists, and has its name, after a first call
    seen, forward = [], base._forward

    def spy(*args):
        pool = runtime.named_threads(runtime.SPINNING_THREADS)
        seen.append((len(pool), {os.sched_getscheduler(t) for t in pool}))
        return forward(*args)

    monkeypatch.setattr(base, "_forward", spy)
    base.encode(["query: one", "query: two", "query: three"], batch_size=2)
    assert seen == [(seen[0][0], {os.SCHED_IDLE})] * 2 and seen[0][0] >= 1
    assert {os.sched_getscheduler(t) for t in runtime.named_threads(runtime.SPINNING_THREADS)} == {os.SCHED_OTHER}


@pytest.mark.parametrize("bad, exc, msg", [
    ([], ValueError, "empty list"),
    ("", ValueError, r"texts\[0\] is blank"),
    (["ok", ""], ValueError, r"texts\[1\] is blank"),
    (["ok", "ok", "   "], ValueError, r"texts\[2\] is blank"),
    (["\u3000\n"], ValueError, r"texts\[0\] is blank"),
    (["ok", "\u200b\ufeff"], ValueError, r"texts\[1\] is blank \(empty, whitespace or zero-width"),
    (["ok", 3], TypeError, r"texts\[1\] is int"),
    (None, TypeError, "got None"),
    ([None], TypeError, r"texts\[0\] is NoneType"),
    (42, TypeError, "got int"),
])
def test_bad_texts_are_named(base, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        base.encode(bad)


def test_over_length_warns_and_is_truncated(base):
    with pytest.warns(UserWarning, match="longer than max_length=16 tokens were truncated"):
        out = base.encode(["word " * 100], max_length=16)
    assert out["dense_vecs"].shape == (1, 384)
    long = "word " * 600                                     # > 512 tokens
    with pytest.warns(UserWarning, match="max_length=10000 exceeds the model's position table: texts are cut at 512"):
        cut = base.encode([long], max_length=10_000)["dense_vecs"]
    with pytest.warns(UserWarning, match="truncated"):
        at_512 = base.encode([long], max_length=512)["dense_vecs"]
    np.testing.assert_array_equal(cut, at_512)


def test_dense_only_model_refuses_sparse_with_reason(base):
    with pytest.raises(ValueError, match="no sparse/ColBERT heads"):
        base.encode(["hello"], return_sparse=True)


def test_missing_model_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        BGEM3("no-such-model")
    (tmp_path / "config.json").write_text('{"model_type": "xlm-roberta", "hidden_size": 8, '
                                          '"num_hidden_layers": 1, "num_attention_heads": 2, '
                                          '"intermediate_size": 8}')
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
        BGEM3(str(tmp_path))


def _tiny_model_dir(tmp_path, seed=0):
    """A tiny random model saved with save_pretrained (safetensors + heads)."""
    from bgem3_lib.model.config import M3Config
    from bgem3_lib.model.encoder import M3Encoder, hf_to_encoder_names
    from bgem3_lib.model.loading import LoadedModel
    from bgem3_lib.weights.assets import asset_path
    cfg = M3Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=66)
    rng = np.random.default_rng(seed)
    enc = M3Encoder(cfg)
    shapes = {p.name: p.shape for p in enc.get_parameters()}
    state = {hf: rng.normal(0, 0.05, size=shapes[ours]).astype(np.float32)
             for ours, hf in hf_to_encoder_names(cfg).items()}
    for n in ("query", "key", "value"):
        state[f"encoder.layer.0.attention.self.{n}.weight"] = rng.normal(0, 0.05, (16, 16)).astype(np.float32)
        state[f"encoder.layer.0.attention.self.{n}.bias"] = np.zeros(16, np.float32)
    heads = {"colbert_linear.weight": rng.normal(0, 0.1, (16, 16)).astype(np.float32),
             "colbert_linear.bias": np.zeros(16, np.float32),
             "sparse_linear.weight": rng.normal(0, 0.1, (1, 16)).astype(np.float32),
             "sparse_linear.bias": np.full(1, 0.05, np.float32)}
    m = BGEM3(loaded=LoadedModel(cfg, state, heads, asset_path("tokenizer.json"), "tiny"))
    return m, m.save_pretrained(tmp_path / "tiny")


def test_save_pretrained_roundtrip(tmp_path):
    m, path = _tiny_model_dir(tmp_path)
    again = BGEM3(str(path))
    texts = ["hello world", "a second text", "東京"]
    a = m.encode(texts, return_sparse=True, return_colbert_vecs=True)
    b = again.encode(texts, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_array_equal(a["dense_vecs"], b["dense_vecs"])
    assert a["lexical_weights"] == b["lexical_weights"]
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
        np.testing.assert_array_equal(x, y)


def test_malicious_pytorch_bin_is_refused_and_nothing_runs(tmp_path):
    import os
    import pickle
    import zipfile
    _, path = _tiny_model_dir(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / "model.safetensors").unlink()
    with zipfile.ZipFile(path / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(ValueError, match="refused global"):
        BGEM3(str(path))
    assert not marker.exists()


def test_truncated_safetensors_is_named(tmp_path):
    _, path = _tiny_model_dir(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="(?i)truncated|corrupt"):
        BGEM3(str(path))


def test_wrong_head_shape_is_named(tmp_path):
    from bgem3_lib.weights.checkpoint_io import load_state_dict, save_state_dict
    _, path = _tiny_model_dir(tmp_path)
    heads = load_state_dict(path / "heads.safetensors")
    heads["sparse_linear.weight"] = np.zeros((1, 8), np.float32)
    save_state_dict(heads, path / "heads.safetensors")
    with pytest.raises(ValueError, match=r"sparse_linear.weight.*\(1, 8\).*\(1, 16\)"):
        BGEM3(str(path))


def test_compute_score_modes_and_weights(tmp_path):
    from bgem3_lib.retrieval.scoring import colbert_score, lexical_matching_score
    m, _ = _tiny_model_dir(tmp_path)
    pairs = [("what is a cat", "a cat is a small animal"), ("hello", "hello there my friend")]
    s = m.compute_score(pairs, weights_for_different_modes=[0.5, 0.2, 0.3], batch_size=1)
    q = m.encode([p[0] for p in pairs], return_sparse=True, return_colbert_vecs=True)
    p = m.encode([p[1] for p in pairs], return_sparse=True, return_colbert_vecs=True)
    for i in range(2):
        d = float(q["dense_vecs"][i] @ p["dense_vecs"][i])
        sp = lexical_matching_score(q["lexical_weights"][i], p["lexical_weights"][i])
        c = colbert_score(q["colbert_vecs"][i], p["colbert_vecs"][i])
        assert s["dense"][i] == pytest.approx(d, abs=1e-6)
        assert s["sparse"][i] == pytest.approx(sp, abs=1e-6)
        assert s["colbert"][i] == pytest.approx(c, abs=1e-6)
        assert s["sparse+dense"][i] == pytest.approx((0.2 * sp + 0.5 * d) / 0.7, abs=1e-6)
        assert s["colbert+sparse+dense"][i] == pytest.approx(0.5 * d + 0.2 * sp + 0.3 * c, abs=1e-6)
    with pytest.raises(ValueError, match="weights_for_different_modes"):
        m.compute_score(pairs, weights_for_different_modes=[1, 1])
    with pytest.raises(ValueError, match="not a \\(query, passage\\) pair"):
        m.compute_score([("only one",)])


def test_half_precision_runs_close_to_fp32(tmp_path):
    _, path = _tiny_model_dir(tmp_path)
    ref = BGEM3(str(path)).encode(["hello world", "bonjour"])["dense_vecs"]
    half = BGEM3(str(path), dtype="float16")
    assert half.encoder.layers[0].attention.value.weight.dtype == ms.float16       # really cast, not float32
    assert not half.encoder.cpu_kernels_ready()          # the fused kernels are float32 only
    out = half.encode(["hello world", "bonjour"])["dense_vecs"]
    assert np.abs(out - ref).max() < 3e-2 and not np.allclose(out, ref, atol=1e-7)


def test_bfloat16_on_cpu_is_a_clear_error(tmp_path):
    _, path = _tiny_model_dir(tmp_path)
    with pytest.raises(ValueError, match="bfloat16.*Ascend"):
        BGEM3(str(path), dtype="bfloat16")


def test_device_default_is_bgem3_device_then_cpu(tmp_path, monkeypatch):
    """``device=None`` reads ``$BGEM3_DEVICE`` (any case); an unknown value there is named in the error."""
    _, path = _tiny_model_dir(tmp_path)
    monkeypatch.setenv("BGEM3_DEVICE", "cpu")
    assert BGEM3(str(path)).device == "CPU"
    monkeypatch.setenv("BGEM3_DEVICE", "tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        BGEM3(str(path))
    assert BGEM3(str(path), device="CPU").device == "CPU"          # an explicit device wins over the variable
    monkeypatch.delenv("BGEM3_DEVICE")
    assert BGEM3(str(path)).device == "CPU"


def test_max_length_is_resolved_by_the_facade(tmp_path):
    m = BGEM3(str(_tiny_model_dir(tmp_path)[1]))
    assert m.resolve_max_length(None) == m.config.max_length and m.resolve_max_length(16) == 16
    for bad in (1, 0, 2.5, True, None.__class__):
        with pytest.raises(ValueError, match="max_length"):
            m.resolve_max_length(bad)
    with pytest.warns(UserWarning, match="position table"):
        assert m.resolve_max_length(m.config.max_length + 1) == m.config.max_length


def test_backend_is_chosen_at_load_and_both_agree(tmp_path, monkeypatch):
    _, path = _tiny_model_dir(tmp_path)
    texts = ["hello world", "bonjour le monde, ça va ?"]
    auto, plain = BGEM3(str(path)), BGEM3(str(path), backend="mindspore")
    assert auto.backend == "kernels" and auto.encoder.cpu_kernels_ready()
    assert plain.backend == "mindspore" and not plain.encoder.cpu_kernels_ready()
    a = auto.encode(texts, return_sparse=True, return_colbert_vecs=True)
    b = plain.encode(texts, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], atol=1e-5)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
        np.testing.assert_allclose(x, y, atol=1e-5)
    assert BGEM3(str(path), dtype="float16").backend == "mindspore"           # kernels are float32 only
    with pytest.raises(ValueError, match="backend='kernels' cannot run: dtype 'float16'"):
        BGEM3(str(path), dtype="float16", backend="kernels")
    with pytest.raises(ValueError, match="unknown backend 'onnx'"):
        BGEM3(str(path), backend="onnx")


def test_config_that_disagrees_with_the_weights_is_an_error_naming_tensors(tmp_path):
    """A checkpoint with more layers than config.json says used to load silently (extra layers ignored)."""
    import json

    from bgem3_lib.weights.checkpoint_io import load_state_dict, save_state_dict
    _, path = _tiny_model_dir(tmp_path)
    state = load_state_dict(path / "model.safetensors")
    state.update({k.replace("encoder.layer.0.", "encoder.layer.1."): v for k, v in state.items()
                  if k.startswith("encoder.layer.0.")})                      # a second layer in the weights
    state["pooler.dense.bias"] = np.zeros(16, np.float32)                  # HF extras stay accepted
    save_state_dict(state, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor\(s\) config.json does not describe.*encoder.layer.1.*1 layers"):
        BGEM3(str(path))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=2)))
    assert len(BGEM3(str(path)).encoder.layers) == 2                      # consistent again: loads


@pytest.mark.parametrize("edit, message", [
    ({"hidden_size": 32, "intermediate_size": 32}, r"tensor 'embeddings.word_embeddings.weight' has shape "
                                                   r"\(250002, 16\), the model expects \(250002, 32\)"),
    ({"vocab_size": 1000}, r"'embeddings.word_embeddings.weight' has shape \(250002, 16\).*\(1000, 16\)"),
    ({"max_position_embeddings": 130}, r"'embeddings.position_embeddings.weight' has shape \(66, 16\)"),
    ({"intermediate_size": 64}, r"'encoder.layer.0.intermediate.dense.weight' has shape \(32, 16\)"),
    ({"num_attention_heads": 3}, "hidden_size 16 is not divisible by num_attention_heads 3"),
    ({"num_hidden_layers": 2}, r"missing \d+ encoder tensor\(s\) that config.json describes \(2 layers\).*"
                               r"encoder.layer.1"),
])
def test_every_config_checkpoint_mismatch_names_the_tensor(tmp_path, edit, message):
    import json
    _, path = _tiny_model_dir(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, **edit)))
    with pytest.raises(ValueError, match=message):
        BGEM3(str(path))


@pytest.mark.parametrize("weights", [[float("nan"), 0.2, 0.4], [-1, 0.2, 0.4], [0, 0, 0], [1, float("inf"), 1]])
def test_compute_score_refuses_weights_eval_refuses(tmp_path, weights):
    """One validator (retrieval.modes.check_weights) for the API and ``eval --weights``."""
    import argparse

    from bgem3_lib.cli import _weights
    m, _ = _tiny_model_dir(tmp_path)
    with pytest.raises(ValueError, match="weights_for_different_modes"):
        m.compute_score([("a cat", "a cat sat")], weights_for_different_modes=weights)
    with pytest.raises(argparse.ArgumentTypeError, match="--weights"):
        _weights(",".join(str(w) for w in weights))


def test_config_types_surrogates_batch_size_and_missing_tokenizer_are_named(tmp_path):
    import json
    import warnings

    from bgem3_lib.model.config import M3Config
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        M3Config.from_dict([])
    with pytest.raises(ValueError, match="config key 'hidden_size' must be an int, got str '384'"):
        M3Config.from_dict({"hidden_size": "384"})
    m, path = _tiny_model_dir(tmp_path)
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate at character 2"):
        m.encode(["fine", "ab\ud800c"])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 2.5"):
        m.encode(["fine"], batch_size=2.5)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        m.encode(["fine"], max_length=0)
    assert not (path / "tokenizer.json").exists()
    with pytest.warns(UserWarning, match="has no tokenizer.json: using the bundled XLM-R tokenizer"):
        BGEM3(str(path))
    (path / "config.json").write_text(json.dumps([]))
    with pytest.raises(ValueError, match="JSON object"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BGEM3(str(path))
