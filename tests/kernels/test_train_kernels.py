"""The fused training kernels (``kernels/train.py``) against ``encoder.Layer`` on the padded batch: forward, and
``mindspore.value_and_grad`` w.r.t. the input and every parameter of the layer (ragged lengths incl. 1 and
ones not a multiple of 8, several 128-row blocks; head size 16, which takes the AVX-512 tiles where the CPU has
them, and 8, which always takes OpenBLAS; the products with the weights on AMX and on OpenBLAS)."""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import mindspore as ms
import numpy as np
import pytest
from fixtures import on_f32_kernel
from mindspore import Tensor, nn

from bgem3_lib.kernels import cpu
from bgem3_lib.kernels import train as tk
from bgem3_lib.model.config import M3Config
from bgem3_lib.model.encoder import Layer

pytestmark = pytest.mark.skipif(not tk.available(), reason="fused CPU training kernels not available here")

H, HEADS, FFN, EPS = 64, 4, 128, 1e-5
LENGTHS = [37, 1, 130, 8, 203, 13]


def _layer(seed=0, heads=HEADS):
    cfg = M3Config(hidden_size=H, num_hidden_layers=1, num_attention_heads=heads, intermediate_size=FFN,
                   layer_norm_eps=EPS)
    layer = Layer(cfg)
    rng = np.random.default_rng(seed)
    for p in layer.get_parameters():
        base = 1.0 if p.name.endswith("gamma") else 0.0
        p.set_data(Tensor((base + rng.normal(0, 0.2, p.shape)).astype(np.float32)))
    return layer


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    mask = np.zeros((len(LENGTHS), max(LENGTHS)), np.float32)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    x = Tensor(rng.normal(0, 1, (*mask.shape, H)).astype(np.float32))
    weights = Tensor((rng.normal(0, 1, (*mask.shape, H)) * mask[..., None]).astype(np.float32))  # loss weights
    bias = Tensor(((1 - mask) * -3.4028234663852886e38)[:, None, None, :].astype(np.float32))
    return x, mask, weights, bias


def _close(ours: np.ndarray, ref: np.ndarray, scale: float, name: str, rel=1e-4):
    err = np.abs(ours - ref).max() / scale
    assert err <= rel, f"{name}: max error {err:.2e} of the gradient's max abs"


@pytest.fixture(params=[True, False], ids=["amx", "blas"])
def products_on(request):
    """Token-by-weight products on AMX as bfloat16 triples where the CPU has it (else skipped), and on the BLAS."""
    if tk.set_bf16x3(request.param, min_rows=64) != request.param:    # 392 tokens: over the default 64
        pytest.skip("no AMX-BF16 here")
    yield request.param
    tk.set_bf16x3(True, min_rows=64)


@pytest.mark.parametrize("heads", [HEADS, 2 * HEADS])
def test_layer_forward_and_gradients_match_encoder_layer(heads, products_on):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layer = _layer(heads=heads)
    x, mask, weights, bias = _batch()
    keep = mask.astype(bool)
    ref_y = layer(x, bias).asnumpy()
    y = tk.layer_train_padded(x, layer, mask, heads, EPS).asnumpy()
    assert np.abs(y[keep] - ref_y[keep]).max() <= 1e-5
    assert not y[~keep].any()                                            # zeros at the padding

    params = layer.trainable_params()
    assert len(params) in (12, 16)                                        # fused qkv or query / key / value
    ref_loss, (ref_dx, ref_dp) = ms.value_and_grad(lambda t: (layer(t, bias) * weights).sum(), 0, params)(x)
    loss, (dx, dp) = ms.value_and_grad(
        lambda t: (tk.layer_train_padded(t, layer, mask, heads, EPS) * weights).sum(), 0, params)(x)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)) + 1e-4
    _close(dx.asnumpy(), ref_dx.asnumpy(), np.abs(ref_dx.asnumpy()).max(), "x")
    grads = {p.name: (g.asnumpy(), r.asnumpy()) for p, g, r in zip(params, dp, ref_dp)}
    for name, (g, r) in grads.items():
        if name.endswith("key.bias"):
            # softmax ignores a shift of a whole score row, so this gradient is zero up to rounding: compare
            # against the scale of the query bias's gradient instead of its own
            _close(g, r, np.abs(grads[name.replace("key", "query")][1]).max(), name)
        elif name.endswith("qkv.bias"):
            for part, (gs, rs) in enumerate(zip(np.split(g, 3), np.split(r, 3))):
                _close(gs, rs, np.abs(np.split(r, 3)[0]).max(), f"{name}[{part}]")
        else:
            _close(g, r, np.abs(r).max(), name)


@pytest.mark.parametrize("k", [1, 40, 1100])
def test_weight_gradients_match_float64_on_both_product_paths(k):
    """par_weight_grads (a^T b over k tokens, one slice per worker, slices added in order) on the AVX-512 kernel
    and on the BLAS: k = 1100 makes two slices of more than one 256-token block each."""
    rng = np.random.default_rng(k)
    m, n = 100, 70                                          # off the kernel's 12-row and 32-column blocks
    a, b = rng.standard_normal((k, m)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    ref = a.T.astype(np.float64) @ b.astype(np.float64)
    bound = 8 * 2.0 ** -24 * (np.abs(a).T.astype(np.float64) @ np.abs(b))
    grad = tk._c_function("m3t_weight_grad", None, [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3)
    try:
        for on in (False, True):
            if tk.set_f32gemm(on) != on:
                pytest.skip("no AVX-512 float32 kernel here")
            got = np.empty((m, n), np.float32)
            # the switched path takes the gradient (the BLAS may sum as the kernel does: the count tells them apart)
            on_f32_kernel(lambda got=got: grad(a.ctypes.data, b.ctypes.data, got.ctypes.data, k, m, n), on,
                          tk.f32gemm_calls)
            assert (np.abs(got - ref) <= bound).all(), f"f32gemm={on}: max error {np.abs(got - ref).max()}"
    finally:
        tk.set_f32gemm(cpu.f32gemm_by_default())


def test_fused_qkv_layout_matches_split_layout():
    """A fused ``qkv`` Dense [3H, H] (the other layout ``attention_block_train`` accepts) gives the same output,
    and its gradients are the split gradients stacked."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layer = _layer()
    att = layer.attention
    if not hasattr(att, "query"):
        pytest.skip("encoder.SelfAttention has a fused qkv here; the first test covers it")
    x, mask, weights, _ = _batch()
    qkv = nn.Dense(H, 3 * H)
    qkv.weight.set_data(Tensor(np.concatenate([getattr(att, n).weight.asnumpy() for n in ("query", "key", "value")])))
    qkv.bias.set_data(Tensor(np.concatenate([getattr(att, n).bias.asnumpy() for n in ("query", "key", "value")])))
    fused = SimpleNamespace(qkv=qkv, out=att.out, norm=att.norm)
    pack = tk.Packing(mask)
    xp, wp = pack.pack(x), pack.pack(weights)

    def loss(attention, params):
        return ms.value_and_grad(lambda t: (tk.attention_block_train(t, attention, pack.offsets, HEADS, EPS)
                                            * wp).sum(), 0, params)(xp)

    split_params = [getattr(att, n).weight for n in ("query", "key", "value")]
    (v1, (dx1, dw1)), (v2, (dx2, dw2)) = loss(att, split_params), loss(fused, [qkv.weight])
    assert abs(float(v1) - float(v2)) <= 1e-6 * abs(float(v1))
    np.testing.assert_allclose(dx2.asnumpy(), dx1.asnumpy(), atol=1e-6 * np.abs(dx1.asnumpy()).max())
    stacked = np.concatenate([g.asnumpy() for g in dw1])
    np.testing.assert_allclose(dw2[0].asnumpy(), stacked, atol=1e-6 * np.abs(stacked).max())


def test_stack_packs_once_and_matches_two_encoder_layers():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layers = [_layer(seed=0), _layer(seed=3)]
    x, mask, weights, bias = _batch()
    params = [p for layer in layers for p in layer.trainable_params()]

    def ref(t):
        for layer in layers:
            t = layer(t, bias)
        return (t * weights).sum()

    ref_loss, (ref_dx, ref_dp) = ms.value_and_grad(ref, 0, params)(x)
    loss, (dx, dp) = ms.value_and_grad(
        lambda t: (tk.layers_train_padded(t, layers, mask, HEADS, EPS) * weights).sum(), 0, params)(x)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)) + 1e-4
    _close(dx.asnumpy(), ref_dx.asnumpy(), np.abs(ref_dx.asnumpy()).max(), "x")
    for p, g, r in zip(params, dp, ref_dp):
        if not p.name.endswith(("key.bias", "qkv.bias")):
            _close(g.asnumpy(), r.asnumpy(), np.abs(r.asnumpy()).max(), p.name)


def test_saved_activations_are_given_back_and_a_released_one_is_an_error():
    """What a forward saves waits in the library for its backward, which gives it back; ``begin_pass`` gives back
    what forwards without a backward left, and a backward whose saved buffer is gone fails instead of reading it."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    layer = _layer()
    x, mask, _, _ = _batch()
    pack = tk.Packing(mask)
    xp = pack.pack(x)
    params = layer.trainable_params()
    tk.begin_pass()
    assert tk.saved_count() == 0
    tk.layer_train(xp, layer, pack.offsets, HEADS, EPS).asnumpy()            # no backward follows
    assert tk.saved_count() == 2                                              # attention and feed-forward
    tk.begin_pass()
    assert tk.saved_count() == 0
    ms.value_and_grad(lambda t: tk.layer_train(t, layer, pack.offsets, HEADS, EPS).sum(), 0, params)(xp)
    assert tk.saved_count() == 0
    tk.layer_train(xp, layer, pack.offsets, HEADS, EPS).asnumpy()
    tk.free_saved()                                                           # everything, spare buffers too
    assert tk.saved_count() == 0
    ms.value_and_grad(lambda t: tk.layer_train(t, layer, pack.offsets, HEADS, EPS).sum(), 0, params)(xp)

    def released(t):
        y = tk.layer_train(t, layer, pack.offsets, HEADS, EPS).sum()
        tk.begin_pass()                                                       # between the forward and its backward
        return y

    with pytest.raises(RuntimeError, match="m3t_(ffn|attention)_bwd"):
        ms.value_and_grad(released, 0, params)(xp)[1][0].asnumpy()


def test_widen_half_is_numpy_cast_on_every_half():
    """All 65,536 float16 bit patterns (zeros, subnormals, normals, infinities, NaNs), odd sizes that leave a
    scalar tail after the vector loop: bit for bit NumPy's cast (NaN as NaN)."""
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    for a in (every, every[3:1000].reshape(997, 1), np.array(2.5, np.float16)):
        got, want = tk.widen_half(a), a.astype(np.float32)
        assert got.dtype == np.float32 and got.shape == a.shape
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    with pytest.raises(ValueError, match="float16"):
        tk.widen_half(np.zeros(3, np.float32))


def test_saved_buffer_calls_log_no_error(capfd, caplog):
    """begin_pass / saved_count / free_saved wait for queued ops without MindSpore's device-only synchronize,
    which logs "[ERROR] CPU device is not supported" on CPU (once per training step before)."""
    capfd.readouterr()
    tk.begin_pass()
    assert tk.saved_count() == 0
    tk.free_saved()
    out, err = capfd.readouterr()
    assert "not supported" not in out + err + caplog.text
