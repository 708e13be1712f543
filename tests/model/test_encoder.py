"""The MindSpore encoder against transformers.BertModel (torch, separate process) on the real
multilingual-e5-small weights, and small pure helpers against hand-worked values."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures import multilingual_texts

from bgem3_lib.analysis.torch_reference import run_reference
from bgem3_lib.model.config import M3Config
from bgem3_lib.model.encoder import M3Encoder, encoder_inputs, load_hf_state, position_ids_for
from bgem3_lib.model.tokenization import M3Tokenizer
from bgem3_lib.weights.assets import asset_path
from bgem3_lib.weights.e5_format import read_e5


def test_position_ids_xlmr_and_bert():
    ids = np.array([[0, 9, 9, 2, 1, 1], [0, 9, 2, 1, 1, 1]])
    mask = (ids != 1).astype(int)
    xlmr = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    assert position_ids_for(ids, mask, xlmr).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]
    bert = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                    model_type="bert")
    assert position_ids_for(ids, mask, bert).tolist() == [list(range(6))] * 2


def test_encoder_rejects_bad_shapes_and_lengths():
    cfg = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                   max_position_embeddings=10)
    with pytest.raises(ValueError, match="must both be"):
        encoder_inputs(np.zeros((2, 3), np.int32), np.zeros((2, 4), np.int32), cfg)
    with pytest.raises(ValueError, match="exceeds the model's maximum 8"):
        encoder_inputs(np.zeros((1, 9), np.int32), np.ones((1, 9), np.int32), cfg)


def test_load_rejects_wrong_shape_and_nan():
    cfg = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                   vocab_size=20, max_position_embeddings=10)
    enc = M3Encoder(cfg)
    rng = np.random.default_rng(0)
    from bgem3_lib.model.encoder import hf_to_encoder_names
    state = {hf: rng.normal(size=p.shape).astype(np.float32)
             for p in enc.get_parameters() for ours, hf in hf_to_encoder_names(cfg).items() if ours == p.name}
    for n in ("query", "key", "value"):
        state[f"encoder.layer.0.attention.self.{n}.weight"] = rng.normal(size=(8, 8)).astype(np.float32)
        state[f"encoder.layer.0.attention.self.{n}.bias"] = rng.normal(size=(8,)).astype(np.float32)
    load_hf_state(enc, state)
    bad = dict(state, **{"encoder.layer.0.intermediate.dense.weight": np.zeros((9, 8), np.float32)})
    with pytest.raises(ValueError, match=r"intermediate.dense.weight.*\(9, 8\).*\(8, 8\)"):
        load_hf_state(enc, bad)
    nan = dict(state, **{"embeddings.LayerNorm.bias": np.full((8,), np.nan, np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        load_hf_state(enc, nan)
    with pytest.raises(ValueError, match="missing"):
        load_hf_state(enc, {k: v for k, v in state.items() if "embeddings.word" not in k})


def test_e5_small_matches_transformers_bert(tmp_path):
    e5 = asset_path("e5-small-q4.bin")
    tok = M3Tokenizer.from_file()
    texts = ["query: " + t for t in multilingual_texts()[:30]]
    input_ids, mask = tok.batch(texts, 512)
    np.savez(tmp_path / "ids.npz", input_ids=input_ids, attention_mask=mask)
    run_reference("bert_hidden", e5_path=str(e5), ids_npz=str(tmp_path / "ids.npz"),
                  out_npz=str(tmp_path / "ref.npz"))
    ref = np.load(tmp_path / "ref.npz")["hidden"]
    header, state = read_e5(e5)
    cfg = M3Config.from_e5_header(header)
    enc = M3Encoder(cfg)
    load_hf_state(enc, state)
    ours = enc(*encoder_inputs(input_ids, mask, cfg)).asnumpy()
    m = mask.astype(bool)
    diff = float(np.abs(ours[m] - ref[m]).max())
    print(f"e5-small hidden states: max abs difference vs transformers.BertModel = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("length", [17, 40, 64])
def test_blockwise_attention_equals_the_whole_matrix(monkeypatch, length):
    from tiny_m3 import tiny_model_dir

    import bgem3_lib.model.encoder as encoder_module
    from bgem3_lib import BGEM3

    model = BGEM3(str(tiny_model_dir()), backend="mindspore")            # the plain cells, not the kernels
    rng = np.random.default_rng(length)
    ids = rng.integers(5, 1000, size=(2, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, length // 2:] = 0                                             # a padded second text
    inputs = encoder_inputs(ids, mask, model.config)
    whole = model.encoder(*inputs).asnumpy()
    monkeypatch.setattr(encoder_module, "ATTENTION_BLOCK", 7)             # blocks of 7 query rows
    blocked = model.encoder(*inputs).asnumpy()
    assert whole.shape == (2, length, model.config.hidden_size)
    np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-5)
    assert np.abs(blocked - whole).max() < 1e-5 and not np.isnan(blocked).any()


def test_recomputed_attention_blocks_give_the_same_gradients_and_outputs(monkeypatch):
    """Training's gradient checkpointing of attention blocks changes memory, not numbers."""
    import mindspore as ms

    import bgem3_lib.model.encoder as encoder_module
    from bgem3_lib.model.config import M3Config
    from bgem3_lib.model.encoder import Layer

    monkeypatch.setattr(encoder_module, "ATTENTION_BLOCK", 8)
    cfg = M3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=8)
    layer = Layer(cfg)
    rng = np.random.default_rng(0)
    for p in layer.get_parameters():
        p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    x = ms.Tensor(rng.standard_normal((2, 30, 32), dtype=np.float32))
    bias = np.zeros((2, 1, 1, 30), np.float32)
    bias[1, ..., 20:] = -3.4e38                                           # a padded second text
    bias, w = ms.Tensor(bias), ms.Tensor(rng.standard_normal((2, 30, 32), dtype=np.float32))
    step = ms.value_and_grad(lambda h: (layer(h, bias) * w).sum(), 0, layer.trainable_params())
    results = []
    for on in (False, True):
        layer.attention.recompute_blocks = on
        (loss, (gx, gw)), out = step(x), layer(x, bias).asnumpy()
        results.append((float(loss.asnumpy()), gx.asnumpy(), [g.asnumpy() for g in gw], out))
    (l0, gx0, gw0, o0), (l1, gx1, gw1, o1) = results
    assert abs(l0 - l1) <= 1e-5 and np.abs(gx0).max() > 1e-3
    np.testing.assert_allclose(gx1, gx0, rtol=0, atol=1e-5)
    for a, b in zip(gw0, gw1):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    np.testing.assert_allclose(o1, o0, rtol=0, atol=1e-6)
