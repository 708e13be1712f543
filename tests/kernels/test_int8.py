"""The int8 kernels (``kernels.int8``) against NumPy references of the same quantisation (exact int32 sums:
tight tolerances) and against float32 within the quantisation error; the fused blocks against NumPy
sub-layers; the scalar (non-VNNI) build through the aot ABI; ``BGEM3(..., dtype="int8")`` end to end."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor
from scipy.special import erf
from tiny_m3 import tiny_model_dir

from bgem3_lib.kernels import cpu as ck
from bgem3_lib.kernels import int8 as qk
from bgem3_lib.model.bgem3 import BGEM3, select_backend
from bgem3_lib.model.config import M3Config

pytestmark = pytest.mark.skipif(not qk.available(), reason="int8 CPU kernels not available here")


# ---------------------------------------------------------------- NumPy references
def quantize_rows(x: np.ndarray):
    """The kernel's per-row uint8 quantisation, in float32 as it computes it: (u int64, scale f32, zero int64)."""
    x = np.asarray(x, np.float32)
    lo, hi = np.minimum(x.min(1), 0).astype(np.float32), np.maximum(x.max(1), 0).astype(np.float32)
    u, s, z = np.zeros(x.shape, np.int64), np.zeros(len(x), np.float32), np.zeros(len(x), np.int64)
    for i, span in enumerate(hi - lo):
        if span > 0:
            inv = np.float32(255) / span
            z[i] = np.clip(np.rint(-lo[i] * inv), 0, 255)
            u[i] = np.clip(np.rint(x[i] * inv).astype(np.int64) + z[i], 0, 255)
            s[i] = span / np.float32(255)
    return u, s, z


def qlinear_ref(x, w, b):
    """float64 result of the int8 linear's arithmetic: exact integer sums, then the two scales and the bias."""
    q, sw = qk.quantize_weight(w)
    u, s, z = quantize_rows(x)
    exact = u @ q.T.astype(np.int64) - z[:, None] * q.sum(1, dtype=np.int64)[None]
    return exact * (s[:, None].astype(np.float64) * sw[None]) + b


def layer_norm(x, g, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * g + b


def bf16(x):
    """Round float32 to bfloat16 (nearest even), returned as float64."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def attention_ref(x, wqkv, bqkv, wo, bo, g, beta, offsets, heads, linear=qlinear_ref, bfloat16=False):
    """The sub-layer in float64; ``bfloat16``: q / sqrt(d), k, v and the softmax's exp weights rounded to bfloat16
    as the AMX attention rounds them (the sum and 1 / sum unrounded)."""
    H = x.shape[1]
    D, ctx = H // heads, np.zeros(x.shape)
    qkv = linear(x, wqkv, bqkv)
    r = bf16 if bfloat16 else (lambda a: a)
    for s0, s1 in zip(offsets[:-1], offsets[1:]):
        q, k, v = (qkv[s0:s1, j * H:(j + 1) * H].reshape(s1 - s0, heads, D).transpose(1, 0, 2) for j in range(3))
        s = r(q / np.sqrt(D)) @ r(k).transpose(0, 2, 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        ctx[s0:s1] = (r(p) @ r(v) / p.sum(-1, keepdims=True)).transpose(1, 0, 2).reshape(s1 - s0, H)
    return layer_norm(x + linear(ctx.astype(np.float32), wo, bo), g, beta)


def ffn_ref(x, w1, b1, w2, b2, g, beta, linear=qlinear_ref):
    h = linear(x, w1, b1)
    return layer_norm(x + linear((0.5 * h * (1 + erf(h / np.sqrt(2)))).astype(np.float32), w2, b2), g, beta)


def float_linear(x, w, b):
    return x.astype(np.float64) @ w.T.astype(np.float64) + b


def _rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


class Norm:                                         # what the blocks read of a LayerNorm cell
    def __init__(self, g, b):
        self.gamma, self.beta = Tensor(g), Tensor(b)


# ---------------------------------------------------------------- weights
def test_quantize_weight_round_trip_bound_and_packing():
    rng = np.random.default_rng(0)
    w = _rand(rng, 70, 37)
    w[3] = 0.0                                                     # an all-zero channel
    w[5] *= 1e4                                                    # channels scaled apart
    q, s = qk.quantize_weight(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and np.abs(q).max() == 127
    err = np.abs(w.astype(np.float64) - q * s[:, None].astype(np.float64))
    assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()
    assert s[3] == 0 and not q[3].any()
    packed = qk.pack_weight(q)
    assert packed.shape == (2, 10, 256)                             # ceil(70/64) panels, ceil(37/4) k-groups
    col, k = 66, 33                                                 # panel 1, column 2, group 8, lane 1
    assert packed[1, 8, 2 * 4 + 1] == q[col, k]
    assert not packed[1, :, 6 * 4:].any() and not packed[:, 9, 1::4].any()   # padded columns and k
    with pytest.raises(ValueError, match="NaN"):
        qk.quantize_weight(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        qk.quantize_weight(np.ones(3))


def test_quant_linear_holds_a_quarter_of_the_float_bytes():
    rng = np.random.default_rng(1)
    layer = qk.QuantLinear(_rand(rng, 1024, 4096), _rand(rng, 1024))
    assert layer.nbytes() / ((1024 * 4096 + 1024) * 4) < 0.251          # + scale and zero-point sums
    assert {p.name.split(".")[-1] for p in layer.get_parameters()} == {"packed", "scale", "wsum", "bias"}


# ---------------------------------------------------------------- the linear
@pytest.mark.parametrize("t,k,n", [(7, 5, 3), (1, 4, 64), (6, 8, 65), (65, 33, 130), (13, 384, 1536),
                                   (100, 1536, 384), (203, 64, 200)])
def test_int8_linear_matches_reference_exactly_and_float_within_quantisation(t, k, n):
    rng = np.random.default_rng(t * 1000 + k + n)
    x, w, b = _rand(rng, t, k), _rand(rng, n, k, scale=0.2), _rand(rng, n)
    x[0] = np.abs(x[0]) + 1                                       # all positive: zero point 0
    x[-1] = -np.abs(x[-1]) * 50                                   # all negative, large: zero point 255
    if t > 3:
        x[1] = 0.0                                                 # an all-zero row
    layer = qk.QuantLinear(w, b)
    y = layer(Tensor(x)).asnumpy()
    ref = qlinear_ref(x, w, b)
    assert y.shape == (t, n)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # against float32: |x w - x^ w^| <= |x - x^| |w| + |x^| |w - w^|, each factor at most half a step
    u, s, z = quantize_rows(x)
    q, sw = qk.quantize_weight(w)
    x_hat = (u - z[:, None]) * s[:, None].astype(np.float64)
    bound = s[:, None] / 2 * np.abs(w).sum(1)[None] + np.abs(x_hat).sum(1)[:, None] * sw[None] / 2
    assert (np.abs(y - float_linear(x, w, b)) <= bound * (1 + 1e-4) + 1e-5 * np.abs(ref).max()).all()


def test_int8_linear_on_batched_input_and_errors(monkeypatch):
    rng = np.random.default_rng(2)
    w, b = _rand(rng, 9, 11), _rand(rng, 9)
    layer = qk.QuantLinear(w, b)
    x = _rand(rng, 2, 3, 11)
    y = qk.linear(Tensor(x), layer).asnumpy()
    assert y.shape == (2, 3, 9)
    np.testing.assert_allclose(y.reshape(6, 9), qlinear_ref(x.reshape(6, 11), w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \[\.\.\., K\] with K = 11"):
        qk.linear(Tensor(_rand(rng, 3, 10)), layer)
    with pytest.raises(ValueError, match="float32"):
        qk.linear(Tensor(x.astype(np.float64)), layer)
    bad = x.copy()
    bad[1, 2, 4] = np.nan
    with pytest.raises(RuntimeError, match="m3_int8_linear.* is 3"):            # 3: NaN or inf in x
        qk.linear(Tensor(bad), layer).asnumpy()
    monkeypatch.setattr(qk, "_device", lambda: "GPU")
    with pytest.raises(RuntimeError, match="CPU only.*GPU"):
        qk.linear(Tensor(x), layer)
    assert not qk.available()


# ---------------------------------------------------------------- the fused sub-layers
@pytest.mark.parametrize("h,heads,f,lengths", [(32, 4, 64, [37, 1, 300, 5, 2]), (384, 12, 1536, [50, 27])])
def test_fused_blocks_match_numpy(h, heads, f, lengths):
    rng = np.random.default_rng(h)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    x = layer_norm(_rand(rng, int(offsets[-1]), h), 1.0, 0.0).astype(np.float32)
    wqkv, bqkv, wo, bo = _rand(rng, 3 * h, h, scale=h ** -0.5), _rand(rng, 3 * h), _rand(rng, h, h, scale=0.1), \
        _rand(rng, h)
    w1, b1, w2, b2 = _rand(rng, f, h, scale=h ** -0.5), _rand(rng, f), _rand(rng, h, f, scale=f ** -0.5), _rand(rng, h)
    g, beta = 1 + _rand(rng, h, scale=0.1), _rand(rng, h, scale=0.1)
    eps = ck.scalar(1e-5)
    qk.set_bf16_attention(False)                   # attention in float32, as the float32 path (see below for bf16)
    att = qk.attention_block(Tensor(x), qk.QuantLinear(wqkv, bqkv), qk.QuantLinear(wo, bo), Norm(g, beta),
                             Tensor(offsets), Tensor(np.array([heads], np.int32)), eps).asnumpy()
    qk.set_bf16_attention(True)
    ffn = qk.ffn_block(Tensor(x), qk.QuantLinear(w1, b1), qk.QuantLinear(w2, b2), Norm(g, beta), eps).asnumpy()
    ref_att = attention_ref(x, wqkv, bqkv, wo, bo, g, beta, offsets, heads)
    ref_ffn = ffn_ref(x, w1, b1, w2, b2, g, beta)
    # same quantisation; only float32 rounding of the attention / GELU output may move a uint8 step
    assert np.abs(att - ref_att).max() < 2e-3 and np.abs(ffn - ref_ffn).max() < 2e-3
    assert np.median(np.abs(att - ref_att)) < 1e-6 and np.median(np.abs(ffn - ref_ffn)) < 1e-6
    # and the float32 sub-layers within the quantisation error
    for out, exact in ((att, attention_ref(x, wqkv, bqkv, wo, bo, g, beta, offsets, heads, float_linear)),
                       (ffn, ffn_ref(x, w1, b1, w2, b2, g, beta, float_linear))):
        assert np.abs(out - exact).max() < 0.1
        cos = (out * exact).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(exact, axis=1)
        assert cos.min() > 0.999


def test_fused_blocks_reject_wrong_shapes_and_nan():
    rng = np.random.default_rng(4)
    x, eps = _rand(rng, 10, 16), ck.scalar(1e-5)
    norm = Norm(np.ones(16, np.float32), np.zeros(16, np.float32))
    inner, outer = (qk.QuantLinear(_rand(rng, n, k), _rand(rng, n)) for n, k in ((32, 16), (16, 32)))
    qkv, out = (qk.QuantLinear(_rand(rng, n, 16), _rand(rng, n)) for n in (48, 16))
    off, heads = Tensor(np.array([0, 4, 10], np.int32)), Tensor(np.array([2], np.int32))
    with pytest.raises(ValueError, match="outer must be"):
        qk.ffn_block(Tensor(x), inner, inner, norm, eps)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        qk.ffn_block(Tensor(x[None]), inner, outer, norm, eps)
    with pytest.raises(ValueError, match=r"qkv must be \[3H, H\]"):
        qk.attention_block(Tensor(x), out, out, norm, off, heads, eps)
    x[7, 3] = np.inf
    with pytest.raises(RuntimeError, match="m3_int8_ffn_block.* is 3"):
        qk.ffn_block(Tensor(x), inner, outer, norm, eps).asnumpy()
    with pytest.raises(RuntimeError, match="m3_int8_attention_block.* is 3"):
        qk.attention_block(Tensor(x), qkv, out, norm, off, heads, eps).asnumpy()


# ---------------------------------------------------------------- the scalar build, through the aot ABI
def test_scalar_fallback_build_computes_the_same():
    assert qk.uses_vnni() == ("avx512_vnni" in Path("/proc/cpuinfo").read_text())   # -march=native decides
    path = ck.build_library(qk.SOURCE, extra_flags=("-mno-avx512vnni",))
    assert ctypes.CDLL(str(path)).m3_int8_vnni() == 0
    rng = np.random.default_rng(5)
    x, w, b = _rand(rng, 15, 70), _rand(rng, 67, 70), _rand(rng, 67)
    q, s = qk.quantize_weight(w)
    weights, y = [qk.pack_weight(q), s, q.sum(1, dtype=np.int32), b], np.zeros((15, 67), np.float32)
    assert qk.call_kernel("m3_int8_linear", [x, *weights], y, path) == 0
    np.testing.assert_allclose(y, qlinear_ref(x, w, b), rtol=1e-5, atol=1e-5)
    x[3, 3] = np.nan
    assert qk.call_kernel("m3_int8_linear", [x, *weights], y, path) == 3
    assert qk.call_kernel("m3_int8_linear", [x[:, :66].copy(), *weights], y, path) == 2   # K disagrees with packing


# ---------------------------------------------------------------- attention in bfloat16: AMX, AVX512-BF16
def cpu_flags() -> set[str]:
    return set(Path("/proc/cpuinfo").read_text().split())


def test_bf16_attention_is_on_by_default_wherever_it_can_run():
    flags = cpu_flags()
    expected = "amx" if {"amx_bf16", "avx512_bf16"} <= flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert qk.uses_bf16_attention() == expected


@pytest.mark.parametrize("path", ["amx", "avx512_bf16"])
@pytest.mark.parametrize("h,heads,lengths", [(64, 2, [37, 1, 300, 5, 2]), (384, 12, [50, 27, 130]),
                                             (256, 4, [700, 33]), (64, 4, [19, 260, 3]), (64, 1, [4200])])
def test_bf16_attention_matches_a_bfloat16_reference(path, h, heads, lengths):
    """Both bfloat16 kernels against the same rounded float64 reference: (64, 4) is head size 16 (one 16-dim
    column block; AVX512-BF16 only), (64, 1, [4200]) is long enough for the key blocks (K and V past 1 MiB)."""
    if not {"amx_bf16" if path == "amx" else "avx512_bf16", "avx512_bf16"} <= cpu_flags():
        pytest.skip(f"no {path} here")
    if path == "amx" and (h // heads) % 32:
        pytest.skip("AMX attention takes head sizes 32 and 64")
    rng = np.random.default_rng(h + len(lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    x = layer_norm(_rand(rng, int(offsets[-1]), h), 1.0, 0.0).astype(np.float32)
    wqkv, bqkv, wo, bo = _rand(rng, 3 * h, h, scale=h ** -0.5), _rand(rng, 3 * h), _rand(rng, h, h, scale=0.1), \
        _rand(rng, h)
    g, beta = 1 + _rand(rng, h, scale=0.1), _rand(rng, h, scale=0.1)
    qkv, out = qk.QuantLinear(wqkv, bqkv), qk.QuantLinear(wo, bo)

    def run():
        return qk.attention_block(Tensor(x), qkv, out, Norm(g, beta), Tensor(offsets),
                                  Tensor(np.array([heads], np.int32)), ck.scalar(1e-5)).asnumpy()

    try:
        qk.set_amx(path == "amx")                   # on an AMX CPU, set_amx(False) moves attention off the tiles
        assert qk.set_bf16_attention(False) is None
        f32 = run()
        assert qk.set_bf16_attention(True) == path
        b16 = run()
    finally:
        qk.set_bf16_attention(True)
        qk.set_amx(True)
    ref16 = attention_ref(x, wqkv, bqkv, wo, bo, g, beta, offsets, heads, bfloat16=True)
    # the same roundings: only float32 accumulation order (and a uint8 step it may move) differ
    assert np.median(np.abs(b16 - ref16)) < 1e-6 and np.abs(b16 - ref16).max() < 1e-2
    # and what bfloat16 costs against float32 attention: small, not zero
    diff = np.abs(b16 - f32)
    assert 1e-4 < np.median(diff) < 1e-2
    cos = (b16 * f32).sum(1) / np.linalg.norm(b16, axis=1) / np.linalg.norm(f32, axis=1)
    assert cos.min() > 0.999


# ---------------------------------------------------------------- AMX and VNNI: the same integers
def test_amx_and_vnni_micro_kernels_give_identical_outputs():
    has_amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
    assert qk.uses_amx() == (has_amx and qk.uses_vnni())     # -march=native builds it; the OS grants the tiles
    if not qk.uses_amx():
        pytest.skip("no AMX here")
    rng = np.random.default_rng(11)

    def both(run):
        outs = []
        for on in (True, False):
            assert qk.set_amx(on) == on
            outs.append(run())
        return outs

    try:
        qk.set_bf16_attention(False)       # set_amx(False) would also move bfloat16 attention off the tiles
        for t, k, n in [(1, 64, 64), (31, 384, 130), (33, 1024, 200), (97, 128, 1536)]:
            x, w, b = _rand(rng, t, k), _rand(rng, n, k, scale=0.2), _rand(rng, n)
            layer = qk.QuantLinear(w, b)
            amx, vnni = both(lambda layer=layer, x=x: layer(Tensor(x)).asnumpy())
            np.testing.assert_array_equal(amx, vnni)
            np.testing.assert_allclose(amx, qlinear_ref(x, w, b), rtol=1e-5, atol=1e-5 * np.abs(amx).max())
        h, heads, f = 128, 4, 256
        offsets = Tensor(np.array([0, 37, 137, 138], np.int32))
        x = layer_norm(_rand(rng, 138, h), 1.0, 0.0).astype(np.float32)
        qkv, out = qk.QuantLinear(_rand(rng, 3 * h, h, scale=0.1), _rand(rng, 3 * h)), qk.QuantLinear(
            _rand(rng, h, h, scale=0.1), _rand(rng, h))
        inner, outer = qk.QuantLinear(_rand(rng, f, h, scale=0.1), _rand(rng, f)), qk.QuantLinear(
            _rand(rng, h, f, scale=0.1), _rand(rng, h))
        norm, eps, nh = Norm(np.ones(h, np.float32), np.zeros(h, np.float32)), ck.scalar(1e-5), Tensor(
            np.array([heads], np.int32))
        for run in (lambda: qk.attention_block(Tensor(x), qkv, out, norm, offsets, nh, eps).asnumpy(),
                    lambda: qk.ffn_block(Tensor(x), inner, outer, norm, eps).asnumpy()):
            amx, vnni = both(run)
            np.testing.assert_array_equal(amx, vnni)
    finally:
        qk.set_amx(True)
        qk.set_bf16_attention(True)


# ---------------------------------------------------------------- the model
def test_bgem3_int8_encodes_close_to_float32():
    texts = ["BGE M3 is an embedding model", "Wer schrieb Faust?", "x", "東京は日本の首都です。" * 5]
    fp = BGEM3(tiny_model_dir(), dtype="float32")
    q8 = BGEM3(tiny_model_dir(), dtype="int8")
    assert q8.backend == "kernels" and q8.encoder.int8
    names = [p.name for p in q8.encoder.get_parameters() if p.name.startswith("layers.")]
    assert not [n for n in names if n.endswith(".weight")] and "layers.1.ffn.outer.packed" in names
    a = fp.encode(texts, return_sparse=True, return_colbert_vecs=True)
    b = q8.encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert ((a["dense_vecs"] * b["dense_vecs"]).sum(1) > 0.999).all()          # measured >= 0.9996
    for ca, cb in zip(a["colbert_vecs"], b["colbert_vecs"]):
        assert ca.shape == cb.shape and ((ca * cb).sum(1) > 0.995).all()
    for la, lb in zip(a["lexical_weights"], b["lexical_weights"]):
        assert set(la) == set(lb) and all(abs(la[t] - lb[t]) < 0.1 for t in la)
    with pytest.raises(ValueError, match="int8 model holds quantised weights"):
        q8.encoder_state()
    q8.encoder.set_train(True)
    with pytest.raises(RuntimeError, match="only on the int8 CPU kernels"):
        q8.encoder.forward_packed(np.array([[0, 5, 2]]), np.ones((1, 3)))


def test_int8_is_cpu_kernels_only(monkeypatch):
    cfg = M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    assert select_backend(None, "CPU", "int8", cfg) == "kernels"
    with pytest.raises(ValueError, match="device is GPU, not CPU"):
        select_backend(None, "GPU", "int8", cfg)
    with pytest.raises(ValueError, match="device is Ascend"):
        select_backend("kernels", "Ascend", "int8", cfg)
    with pytest.raises(ValueError, match="backend='mindspore' has no int8 path"):
        select_backend("mindspore", "CPU", "int8", cfg)
    with pytest.raises(ValueError, match="tanh"):
        select_backend(None, "CPU", "int8", M3Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=16, hidden_act="gelu_pytorch_tanh"))
    monkeypatch.setenv("BGEM3_CPU_KERNELS", "0")
    with pytest.raises(ValueError, match="unavailable"):
        BGEM3(tiny_model_dir(), dtype="int8")
