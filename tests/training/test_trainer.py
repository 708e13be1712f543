"""Tests for bgem3_lib.training.trainer / train_model / optim on a tiny random model (hidden 32, 2 layers).

The resume test runs this file as a script in subprocesses: one uninterrupted run, one run that the
test kills with SIGKILL right after its checkpoint of step ``KILL_AFTER``, and a run resuming from that
checkpoint; final parameters must match the uninterrupted run bit for bit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOTAL_STEPS, KILL_AFTER = 5, 2


def build(seed: int = 0, sub_batch: int = 0, use_self_distill: bool = True, steps: int = TOTAL_STEPS,
          freeze_layers: int = 0, lr: float = 1e-3, out_dir=None, length_chunks: int = 4, recompute=None):
    """Tiny XLM-R-style model, random texts, a Trainer over them (all from ``seed``)."""
    import mindspore as ms

    from bgem3_lib.model.config import M3Config
    from bgem3_lib.model.encoder import M3Encoder
    from bgem3_lib.model.heads import M3Heads
    from bgem3_lib.training.train_model import M3TrainNet
    from bgem3_lib.training.trainer import TextStore, TrainConfig, Trainer, make_deterministic

    make_deterministic(seed)
    cfg = M3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=100, max_position_embeddings=80)
    enc, heads = M3Encoder(cfg), M3Heads(32)
    rng = np.random.default_rng(seed)
    for p in list(enc.get_parameters()) + list(heads.get_parameters()):
        if not p.name.endswith("gamma"):
            p.set_data(ms.Tensor(rng.normal(0, 0.1, p.shape).astype(np.float32)))
    texts = [np.r_[0, rng.integers(4, 100, rng.integers(3, 40)), 2] for _ in range(60)]
    groups = [(i, 20 + i, 40 + i) for i in range(20)]
    net = M3TrainNet(enc, heads, sub_batch=sub_batch, freeze_layers=freeze_layers, freeze_embeddings=True,
                     use_self_distill=use_self_distill, recompute=recompute)
    tc = TrainConfig(steps=steps, lr=lr, head_lr=1e-2, token_budget=200, boundaries=(16, 32, 64),
                     warmup_steps=2, checkpoint_every=1, seed=seed, use_self_distill=use_self_distill,
                     sub_batch=sub_batch, freeze_layers=freeze_layers, length_chunks=length_chunks,
                     recompute=recompute)
    return Trainer(net, TextStore(texts), groups, tc, out_dir=out_dir)


def _params(trainer) -> dict:
    return {p.name: p.asnumpy() for p in trainer.params}


def _child(out_dir: str, result: str) -> None:
    """Script mode: train (resuming from out_dir if a checkpoint is there), print each step, save params."""
    tr = build(out_dir=out_dir)
    from bgem3_lib.training.trainer import CHECKPOINT
    start = 0
    if (Path(out_dir) / CHECKPOINT).is_file():
        tr.load_checkpoint(Path(out_dir) / CHECKPOINT)
        start = tr.step
    print(f"START {start}", flush=True)
    tr.train(callback=lambda t: print(f"STEP {t.step}", flush=True))
    np.savez(result, **_params(tr))


def _start(tmp: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, str(tmp / f"{name}_ckpt"), str(tmp / f"{name}.npz")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOG_v": "3"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _finish(proc: subprocess.Popen, kill_after: int | None = None):
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if kill_after is not None and line.strip() == f"STEP {kill_after}":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=180)
    return proc.returncode, lines


def test_sigkill_resume_is_bit_identical(tmp_path):
    straight, killed = _start(tmp_path, "straight"), _start(tmp_path, "killed")   # run side by side
    rc, lines = _finish(killed, kill_after=KILL_AFTER)
    assert rc == -signal.SIGKILL and f"STEP {TOTAL_STEPS}" not in lines
    assert _finish(straight)[0] == 0
    os.replace(tmp_path / "killed_ckpt", tmp_path / "resumed_ckpt")
    rc, lines = _finish(_start(tmp_path, "resumed"))
    assert rc == 0
    start = int(lines[0].split()[1])
    assert KILL_AFTER <= start < TOTAL_STEPS            # it really resumed mid-training
    assert not list((tmp_path / "resumed_ckpt").glob(".*.tmp"))
    a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 4
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k         # bit for bit


def test_training_reduces_loss_and_respects_frozen_parts():
    tr = build(steps=5, freeze_layers=1)
    frozen = {p.name: p.asnumpy() for p in tr.net.block.encoder.get_parameters()
              if p.name.startswith(("layers.0.", "embeddings."))}
    before = _params(tr)
    log = tr.train()
    assert [r["step"] for r in log] == list(range(1, 6))
    assert np.mean([r["loss"] for r in log[-2:]]) < log[0]["loss"]
    assert all(k.startswith(("layers.1.", "colbert_linear", "sparse_linear")) for k in before)
    for p in tr.net.block.encoder.get_parameters():
        if p.name in frozen:
            assert np.array_equal(p.asnumpy(), frozen[p.name]), p.name
    assert any(not np.array_equal(before[k], v) for k, v in _params(tr).items())
    assert {"distill_dense", "L_distill", "grad_norm", "lr_factor"} <= set(log[0])


@pytest.mark.parametrize("sub_batch, recompute", [(2, None), (2, False), (1, True), (0, True)],
                         ids=["split2+recompute", "split2", "split1+recompute", "layer-recompute"])
def test_split_batch_and_recompute_match_full_batch(sub_batch, recompute):
    """Loss and every gradient of one batch equal the plain batch's to 1e-5 (float32), however it is split
    and whatever is recomputed."""
    import mindspore as ms

    full, other = build(sub_batch=0), build(sub_batch=sub_batch, recompute=recompute)
    assert other.net.recompute == (recompute if recompute is not None else sub_batch > 0)
    batch = full.next_batch()
    while len(batch) < 3:
        batch = full.next_batch()
    inputs = full.tensors(batch)
    (lf, *_), gf = full.grad_fn(*inputs)
    (ls, *_), gs = other.grad_fn(*inputs)
    assert abs(float(lf.asnumpy()) - float(ls.asnumpy())) <= 1e-5
    assert len(gf) == len(gs) > 4
    for a, b in zip(gf, gs):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=0, atol=1e-5)
    assert isinstance(lf, ms.Tensor)


def test_train_net_rejects_bad_sub_batch_and_disagreeing_config():
    from bgem3_lib.training.train_model import M3TrainNet
    tr = build()
    with pytest.raises(ValueError, match="sub_batch must be an integer >= 0"):
        M3TrainNet(tr.net.block.encoder, tr.net.block.heads, sub_batch=-1)
    with pytest.raises(ValueError, match="recompute"):
        build(sub_batch=0, recompute=True).__class__(tr.net, tr.store, tr.groups,
                                                     tr.cfg.__class__(**{**tr.cfg.__dict__, "recompute": True}))


def test_length_chunks_match_one_padded_matrix():
    whole, chunked = build(length_chunks=1), build(length_chunks=3)
    batch = whole.next_batch()
    while len(batch) < 3:
        batch = whole.next_batch()
    a, b = whole.tensors(batch), chunked.tensors(batch)
    assert not isinstance(a[4], tuple) and isinstance(b[4], tuple) and len(b[4]) > 1
    real_a, padded_a = whole.token_counts(a)
    real_b, padded_b = chunked.token_counts(b)
    assert real_a == real_b and padded_b < padded_a
    (la, *pa), ga = whole.grad_fn(*a)
    (lb, *pb), gb = chunked.grad_fn(*b)
    assert abs(float(la.asnumpy()) - float(lb.asnumpy())) < 1e-5
    for x, y in zip(pa, pb):
        assert abs(float(x.asnumpy()) - float(y.asnumpy())) < 1e-5
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x.asnumpy(), y.asnumpy(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="p_order"):
        whole.net(*b[:8], b[8][:-1])


def test_no_self_distill_loss_is_L():
    tr = build(use_self_distill=False)
    rec = tr.train_step()
    assert abs(rec["loss"] - rec["L"]) < 1e-6 and "distill_dense" not in rec


def test_step_record_splits_off_batch_assembly(monkeypatch):
    """``batch_seconds``: the part of the step spent building the batch (benchmarks/train_step.py's same-work
    ratio subtracts it): a slow ``tensors`` shows up there, a slow forward + backward does not."""
    import time as _time

    tr = build()
    slow = tr.tensors

    def tensors(examples):
        _time.sleep(0.05)
        return slow(examples)

    grad = tr.grad_fn

    def grad_fn(*inputs):
        _time.sleep(0.3)
        return grad(*inputs)

    monkeypatch.setattr(tr, "tensors", tensors)
    monkeypatch.setattr(tr, "grad_fn", grad_fn)
    rec = tr.train_step()
    assert 0.05 <= rec["batch_seconds"] < 0.3 and rec["seconds"] >= 0.35


def test_adamw_matches_numpy_reference():
    import mindspore as ms

    from bgem3_lib.training.optim import AdamW, clip_by_global_norm, lr_at

    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(3, 2)).astype(np.float32)
    p = ms.Parameter(ms.Tensor(w0), name="layer.weight")
    opt = AdamW([p], [0.5], weight_decay=0.1)
    m = v = np.zeros_like(w0, np.float64)
    w = w0.astype(np.float64)
    for t in range(1, 4):
        g = rng.normal(size=w0.shape).astype(np.float32)
        opt.step((ms.Tensor(g),), lr=0.01)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        w = w - 0.005 * ((m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8) + 0.1 * w)
    np.testing.assert_allclose(p.asnumpy(), w, rtol=1e-5, atol=1e-6)
    g = [ms.Tensor(np.array([3.0, 4.0], np.float32))]
    (clipped,), norm = clip_by_global_norm(g, 1.0)
    assert abs(norm - 5.0) < 1e-6 and np.allclose(clipped.asnumpy(), [0.6, 0.8], atol=1e-6)
    assert [lr_at(s, 1.0, 0, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError):
        lr_at(5, 1.0, 0, 4)


def test_text_store_widens_a_float16_cache_exactly():
    """Padded in the cache's float16 and widened once (kernels.train.widen_half): the values of padding each
    state into float32 one by one, zeros at padding."""
    from bgem3_lib.training.trainer import TextStore

    rng = np.random.default_rng(0)
    ids = [np.arange(n, dtype=np.int32) for n in (3, 7, 5)]
    states = [rng.standard_normal((len(x), 8)).astype(np.float16) for x in ids]
    _, mask, hid = TextStore(ids, hidden=lambda i: states[i]).batch([2, 0, 1])
    assert hid.dtype == np.float32 and hid.shape == (3, 7, 8)
    for r, i in enumerate([2, 0, 1]):
        n = len(ids[i])
        assert np.array_equal(hid[r, :n], states[i].astype(np.float32)) and not hid[r, n:].any()
        assert mask[r].sum() == n


def build_cached(start: int, seed: int = 0):
    """The tiny trainer over a float16 hidden cache at the input of layer ``start`` (2: heads only)."""
    from bgem3_lib.training.train_model import M3TrainNet
    from bgem3_lib.training.trainer import TextStore, TrainConfig, Trainer

    base = build(seed)
    rng = np.random.default_rng([seed, 1])
    states = [rng.standard_normal((len(x), 32)).astype(np.float16) for x in base.store.ids]
    block = base.net.block
    net = M3TrainNet(block.encoder, block.heads, start_layer=start, freeze_layers=start)
    tc = TrainConfig(**{**base.cfg.__dict__, "start_layer": start, "freeze_layers": start})
    return Trainer(net, TextStore(base.store.ids, hidden=lambda i: states[i]), base.groups, tc)


@pytest.mark.parametrize("start", [2, 1], ids=["heads-only", "one-layer-kernels"])
def test_packed_states_give_the_loss_and_gradients_of_padded_states(start):
    """Where the net takes them (heads only; the fused kernels' layers), the trainer hands the cached states over
    packed (no padded [R, L, H] matrices): the loss parts and every gradient equal those from padded states."""
    tr = build_cached(start)
    if not tr.net.takes_packed_states():
        pytest.skip("fused CPU training kernels not available here")
    batch = tr.next_batch()
    while len(batch) < 3:
        batch = tr.next_batch()
    packed, padded = tr.tensors(batch), tr.tensors(batch, packed=False)
    real, _ = tr.token_counts(padded)
    assert packed[3] is None and padded[3] is not None and tuple(packed[9].shape) == (real, 32)
    (lp, *pp), gp = tr.grad_fn(*packed)
    (ld, *pd), gd = tr.grad_fn(*padded)
    np.testing.assert_allclose([float(x.asnumpy()) for x in (lp, *pp)], [float(x.asnumpy()) for x in (ld, *pd)],
                               rtol=1e-6, atol=1e-7)
    assert len(gp) == len(gd) == len(tr.params) and len(gp) >= 4
    for a, b in zip(gp, gd):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-7)
    # the net's forward, not grad_fn: an exception inside value_and_grad leaves MindSpore's PyNative grad state half
    # built (a later test's backward then failed in LayerNormGrad)
    with pytest.raises(ValueError, match="packed_states must be float32"):
        tr.net(*packed[:9], packed[9][1:])
    with pytest.raises(ValueError, match="not both"):
        tr.net(*padded[:9], packed[9])


def test_bad_inputs_raise():
    from bgem3_lib.training.trainer import TextStore

    with pytest.raises(ValueError, match="at least one text"):
        TextStore([])
    tr = build()
    with pytest.raises(FileNotFoundError):
        tr.load_checkpoint("/nonexistent/checkpoint.safetensors")
    with pytest.raises(ValueError, match="groups"):
        type(tr)(tr.net, tr.store, [(0, 1), (0, 1, 2)], tr.cfg)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
