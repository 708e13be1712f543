"""The fused CPU kernels against an independent float64 NumPy transformer, and the packed encoder
path against the plain MindSpore cells (same weights, ragged lengths, several row blocks)."""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor
from scipy.special import erf

from bgem3_lib.kernels import cpu as ck
from bgem3_lib.model.config import M3Config
from bgem3_lib.model.encoder import M3Encoder, pack_offsets, position_ids_for

pytestmark = pytest.mark.skipif(not ck.available(), reason="fast CPU kernels not available here")


def _layer_norm(x, g, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * g + b


def _random_encoder(seed=0, hidden=32, heads=4, layers=2, ffn=64):
    cfg = M3Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                   vocab_size=300, max_position_embeddings=700)
    enc = M3Encoder(cfg)
    rng = np.random.default_rng(seed)
    for p in enc.get_parameters():
        base = 1.0 if p.name.endswith("gamma") else 0.0
        p.set_data(Tensor((base + rng.normal(0, 0.2, p.shape)).astype(np.float32)))
    return enc, cfg


def _batch(lengths, vocab=300, seed=1):
    rng = np.random.default_rng(seed)
    ids = np.ones((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(4, vocab, n)
        ids[i, 0], ids[i, n - 1], mask[i, :n] = 0, 2, 1
    return ids, mask


def _reference(enc, cfg, ids, mask):
    """float64 NumPy forward of each text on its own tokens (no padding at all)."""
    P = {p.name: p.asnumpy().astype(np.float64) for p in enc.get_parameters()}
    pos = position_ids_for(ids, mask, cfg)
    H, A = cfg.hidden_size, cfg.num_attention_heads
    D, out = H // A, []
    for i, n in enumerate(mask.sum(1)):
        x = P["embeddings.word"][ids[i, :n]] + P["embeddings.position"][pos[i, :n]] + P["embeddings.token_type"][0]
        x = _layer_norm(x, P["embeddings.norm.gamma"], P["embeddings.norm.beta"])
        for layer in range(cfg.num_hidden_layers):
            g = lambda k, layer=layer: P[f"layers.{layer}.{k}"]  # noqa: E731
            q, k, v = (x @ g(f"attention.{n}.weight").T + g(f"attention.{n}.bias") for n in ("query", "key", "value"))
            q, k, v = (t.reshape(n, A, D).transpose(1, 0, 2) for t in (q, k, v))
            s = q @ k.transpose(0, 2, 1) / np.sqrt(D)
            s = np.exp(s - s.max(-1, keepdims=True))
            ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, H)
            x = _layer_norm(x + ctx @ g("attention.out.weight").T + g("attention.out.bias"),
                            g("attention.norm.gamma"), g("attention.norm.beta"))
            h = x @ g("ffn.inner.weight").T + g("ffn.inner.bias")
            h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
            x = _layer_norm(x + h @ g("ffn.outer.weight").T + g("ffn.outer.bias"),
                            g("ffn.norm.gamma"), g("ffn.norm.beta"))
        out.append(x)
    return np.concatenate(out)


def test_packed_kernels_match_float64_reference_and_plain_path():
    enc, cfg = _random_encoder()
    enc.set_train(False)
    ids, mask = _batch([37, 2, 600, 129, 5, 300])       # ragged; 600 rows > one 256-row query block
    assert enc.cpu_kernels_ready()
    fast, offsets = enc.forward_packed(ids, mask)
    assert offsets.tolist() == [0, 37, 39, 639, 768, 773, 1073]
    ref = _reference(enc, cfg, ids, mask)
    enc.use_cpu_kernels = False
    plain, _ = enc.forward_packed(ids, mask)
    fast, plain = fast.asnumpy(), plain.asnumpy()
    assert fast.shape == plain.shape == ref.shape == (1073, 32)
    assert np.abs(fast - ref).max() < 2e-5
    assert np.abs(fast - plain).max() < 2e-5


def test_training_mode_and_env_switch_fall_back(monkeypatch):
    enc, _ = _random_encoder(layers=1)
    enc.set_train(True)
    assert not enc.cpu_kernels_ready()                 # no gradients through the aot kernels
    enc.set_train(False)
    monkeypatch.setenv("BGEM3_CPU_KERNELS", "0")
    assert not enc.cpu_kernels_ready()


def test_gelu_and_softmax_accuracy_through_ffn_and_linear():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (300, 16)).astype(np.float32)
    w = rng.normal(0, 2, (64, 16)).astype(np.float32)       # pre-activations over roughly [-30, 30]
    b = rng.normal(0, 1, 64).astype(np.float32)
    y = ck.linear(Tensor(x), Tensor(w), Tensor(b)).asnumpy()
    assert np.abs(y - (x.astype(np.float64) @ w.T + b)).max() < 1e-4
    from bgem3_lib.model.encoder import FeedForward
    cfg = M3Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ffn = FeedForward(cfg)
    ffn.inner.weight.set_data(Tensor(w))
    ffn.inner.bias.set_data(Tensor(b))
    ffn.outer.weight.set_data(Tensor(np.eye(16, 64, dtype=np.float32)))   # picks the first 16 GELU outputs
    ffn.outer.bias.set_data(Tensor(np.zeros(16, np.float32)))
    out = ck.ffn_block(Tensor(x), ffn, ck.scalar(1e-5)).asnumpy()
    h = x.astype(np.float64) @ w.T + b
    gelu = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    assert np.abs(out - _layer_norm(x + gelu[:, :16], 1.0, 0.0)).max() < 1e-5


def test_pack_offsets_and_bad_ids():
    assert pack_offsets(np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])).tolist() == [0, 2, 3, 6]
    enc, _ = _random_encoder(layers=1)
    ids, mask = _batch([4, 3])
    ids[0, 1] = 300                                      # == vocab_size: out of range
    with pytest.raises(ValueError, match="token ids must lie in"):
        enc.forward_packed(ids, mask)


@pytest.mark.parametrize("heads", [0, -1, 3])
def test_attention_kernel_refuses_head_counts_that_do_not_split_the_hidden_size(heads):
    """0, negative or non-dividing head counts are refused with the kernel's error 2 before anything divides by them."""
    from bgem3_lib.model.encoder import SelfAttention
    cfg = M3Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    x = Tensor(np.random.default_rng(5).normal(0, 1, (6, 16)).astype(np.float32))
    offsets = Tensor(np.array([0, 2, 6], np.int32))
    ok = ck.attention_block(x, SelfAttention(cfg), offsets, Tensor(np.array([2], np.int32)), ck.scalar(1e-5))
    assert ok.asnumpy().shape == (6, 16)
    with pytest.raises(RuntimeError, match="m3_attention_block.* is 2"):
        ck.attention_block(x, SelfAttention(cfg), offsets, Tensor(np.array([heads], np.int32)),
                           ck.scalar(1e-5)).asnumpy()


def _attention_block_reference(x, attn, offsets, heads, eps=1e-5):
    """float64 NumPy post-LN self-attention sub-layer, each packed sequence on its own rows."""
    P = {k: getattr(getattr(attn, a), w).asnumpy().astype(np.float64)
         for k, (a, w) in {"wo": ("out", "weight"), "bo": ("out", "bias"), "g": ("norm", "gamma"),
                           "b": ("norm", "beta")}.items()}
    x = x.astype(np.float64)
    t, h = x.shape
    d = h // heads
    qkv = np.concatenate([x @ getattr(attn, n).weight.asnumpy().astype(np.float64).T
                          + getattr(attn, n).bias.asnumpy() for n in ("query", "key", "value")], axis=1)
    ctx = np.zeros((t, h))
    for a, e in zip(offsets[:-1], offsets[1:]):
        q, k, v = (qkv[a:e, i * h:(i + 1) * h].reshape(e - a, heads, d).transpose(1, 0, 2) for i in range(3))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        ctx[a:e] = ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(e - a, h)
    return _layer_norm(x + ctx @ P["wo"].T + P["bo"], P["g"], P["b"], eps)


@pytest.fixture(params=["amx", "avx512"])
def attention_path(request):
    """The attention block's projections on AMX as bfloat16 triples (where the CPU has it, else skipped) and on
    the BLAS."""
    on = request.param == "amx"
    if ck.set_bf16x3(on) != on:
        pytest.skip("no AMX-BF16 here")
    yield request.param
    ck.set_bf16x3(True)


@pytest.fixture(params=["amx", "registers"])
def attention_core(request):
    """Attention's two products on AMX as bfloat16 triples with an online softmax (where the CPU has AMX-BF16, else
    skipped; head sizes 32 and 64 here) and in the AVX-512 tile kernel / OpenBLAS."""
    on = request.param == "amx"
    if ck.set_bf16x3_attention(on) != on:
        pytest.skip("no AMX-BF16 here")
    yield request.param
    ck.set_bf16x3_attention(True)


def _random_attention(hidden, heads, scale, seed):
    from bgem3_lib.model.encoder import SelfAttention
    cfg = M3Config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads, intermediate_size=4 * hidden)
    attn = SelfAttention(cfg)
    rng = np.random.default_rng(seed)
    for p in attn.get_parameters():
        base = 1.0 if p.name.endswith("gamma") else 0.0
        spread = scale if p.name.split(".")[0] in ("query", "key", "value") else 0.2
        p.set_data(Tensor((base + rng.normal(0, spread, p.shape)).astype(np.float32)))
    return attn, rng


@pytest.mark.parametrize("hidden, heads, scale", [
    (32, 2, 0.2),     # d = 16: AVX-512 tile kernel, one 16-wide column pass
    (96, 3, 0.2),     # d = 32 (M3-small)
    (96, 2, 0.2),     # d = 48: a 32-wide and a 16-wide column pass
    (128, 2, 0.2),    # d = 64 (XLM-R large)
    (48, 4, 0.2),     # d = 12: OpenBLAS path
    (96, 3, 3.0),     # scores of several hundred: most softmax weights underflow
])
def test_attention_block_matches_float64_on_ragged_sequences(attention_path, attention_core, hidden, heads, scale):
    """Lengths that are not multiples of the 8-row tile, the 32-row group, the 32-key panel, AMX's 64-row group or
    its 128-key block, longer than the 256-row query block, a single token, and (d = 48, 64) a sequence long
    enough for key blocks; every attention path (AMX, tile kernel, OpenBLAS), with the projections on AMX and on
    the BLAS, against float64."""
    attn, rng = _random_attention(hidden, heads, scale, hidden + heads)
    # + one sequence whose K and V outgrow 1 MiB, where the tile kernel walks the keys in blocks (32- and
    # 16-wide column passes)
    lengths = [1, 7, 33, 300, 41] + {64: [2100], 48: [2800]}.get(hidden // heads, [])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    x = rng.normal(0, 1, (offsets[-1], hidden)).astype(np.float32)
    out = ck.attention_block(Tensor(x), attn, Tensor(offsets), Tensor(np.array([heads], np.int32)),
                             ck.scalar(1e-5)).asnumpy()
    ref = _attention_block_reference(x, attn, offsets, heads)
    assert out.shape == ref.shape and np.isfinite(out).all()
    # scores of several hundred carry float32 rounding of ~1e-4 into the weights, on either path
    assert np.abs(out - ref).max() < (2e-5 if scale < 1 else 1e-3)


@pytest.mark.parametrize("hidden, length", [(32, 700), (64, 1000)])
def test_amx_attention_splits_the_query_rows_of_few_heads(hidden, length):
    """One sequence of one head: on AMX its query rows are shared out in 64-row multiples (four tasks per worker),
    each task packing the same keys; the rows must meet again exactly (d = 32 and 64, against float64)."""
    if not ck.set_bf16x3_attention(True):
        pytest.skip("no AMX-BF16 here")
    attn, rng = _random_attention(hidden, 1, 0.2, length)
    offsets = np.array([0, length], np.int32)
    x = rng.normal(0, 1, (length, hidden)).astype(np.float32)
    out = ck.attention_block(Tensor(x), attn, Tensor(offsets), Tensor(np.array([1], np.int32)),
                             ck.scalar(1e-5)).asnumpy()
    assert np.abs(out - _attention_block_reference(x, attn, offsets, 1)).max() < 2e-5


def test_blas_choice_defaults_to_openblas_and_names_a_missing_mkl(monkeypatch):
    monkeypatch.delenv("BGEM3_BLAS", raising=False)
    blas = ck.find_blas()
    assert blas is not None and "openblas" in blas["lib"] and blas["sgemm"].startswith(("cblas_sgemm", "scipy_"))
    monkeypatch.setenv("BGEM3_BLAS", "/nonexistent/libmkl_rt.so.3")
    with pytest.raises(RuntimeError, match="BGEM3_BLAS=/nonexistent/libmkl_rt.so.3: no loadable libmkl_rt"):
        ck.find_blas()
