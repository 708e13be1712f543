"""Tests for bgem3_lib.analysis.distill_report against NumPy references and hand-made logs (fixed seeds, fast)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bgem3_lib.analysis.distill_report import (
    batch_scores,
    collapse_step,
    load_training_log,
    loss_frame,
    pad_lexical,
    pad_multivectors,
    recipe_summary,
    smooth,
    uniform_loss,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _summary(distill=True, steps=3):
    log = []
    for s in range(1, steps + 1):
        e = {"step": s, "batch_size": 10, "loss": 1.0 / s, "dense": 2.0, "lex": 3.0 + s, "mul": 1.5,
             "inter": 1.2, "L": 1.1, "grad_norm": 0.5}
        if distill:
            e.update(distill_dense=0.9, distill_lex=2.0, distill_mul=0.3, L_distill=0.6)
        log.append(e)
    recipe = {"use_self_distill": distill, "steps": steps, "train_layers": 0, "n_negatives": 3,
              "temperature": 0.02, "head_lr": 1e-3, "colbert_lr": 3e-5, "encoder_lr": 1e-5}
    return {"recipe": recipe, "seconds": {"train": 10.0, "total": 20.0, "cache_states": 5.0},
            "examples": {"train": 30}, "log": log}


def test_smooth_matches_loop_reference(rng):
    x = rng.normal(size=37)
    for window in (1, 4, 10, 50):
        ref = np.array([x[max(0, i - window + 1):i + 1].mean() for i in range(len(x))])
        np.testing.assert_allclose(smooth(x, window), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(smooth(x, 1), x, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_smooth_rejects_bad_window(bad):
    with pytest.raises(ValueError, match="window"):
        smooth([1.0, 2.0], bad)


def test_smooth_rejects_nan_and_2d():
    with pytest.raises(ValueError, match="NaN"):
        smooth([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="1-D"):
        smooth(np.ones((2, 2)), 2)


def test_uniform_loss_is_infonce_of_equal_scores():
    from bgem3_lib.training.losses import in_batch_targets, info_nce
    b, g = 3, 4
    ref = float(info_nce(np.zeros((b, b * g)), in_batch_targets(b, g), temperature=0.02))
    assert uniform_loss(b, g) == pytest.approx(ref, abs=1e-6)
    assert uniform_loss(10, 4) == pytest.approx(math.log(40))
    with pytest.raises(ValueError):
        uniform_loss(0, 4)


def test_collapse_step():
    u = math.log(40)
    assert collapse_step([1, 2, 3, 4], [1.0, u, 2.0, u], u) == 4
    assert collapse_step([5, 6, 7], [u, u, u], u) == 5
    assert collapse_step([1, 2], [u, 1.0], u) is None
    assert collapse_step([1, 2, 3], [1.0, 2.0, 3.0], [9.0, 9.0, 3.0]) == 3      # per-step uniform values
    with pytest.raises(ValueError):
        collapse_step([1, 2], [1.0], u)


def test_loss_frame_tidy_and_optional_distill():
    df = loss_frame(_summary(distill=True), "sd")
    assert list(df.columns) == ["step", "run", "part", "value"]
    assert set(df.part) == {"dense", "lex", "mul", "inter", "L", "distill_dense", "distill_lex", "distill_mul",
                            "L_distill", "loss"}
    assert df[(df.part == "lex") & (df.step == 2)].value.item() == 5.0
    df2 = loss_frame(_summary(distill=False), "nosd")
    assert not df2.part.str.startswith("distill").any() and len(df2) == 3 * 6
    with pytest.raises(ValueError, match="log"):
        loss_frame({"log": []}, "x")


def test_load_training_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="training_log.json"):
        load_training_log(tmp_path)
    (tmp_path / "training_log.json").write_text('{"recipe": {}, "log": [')
    with pytest.raises(ValueError, match="JSON"):
        load_training_log(tmp_path)
    (tmp_path / "training_log.json").write_text(json.dumps({"recipe": {}, "log": []}))
    with pytest.raises(ValueError, match="log"):
        load_training_log(tmp_path)
    (tmp_path / "training_log.json").write_text(json.dumps(_summary()))
    assert load_training_log(tmp_path)["recipe"]["steps"] == 3


def test_recipe_summary():
    s = recipe_summary(_summary(), n_layers=12)
    assert s["frozen"] == "embeddings + layers 0-11 (of 12)" and s["trained"] == "sparse + ColBERT heads"
    assert s["encoder lr"] == 0.0 and s["passages per query"] == 4 and s["queries per batch (mean)"] == 10.0
    assert s["total wall time (s)"] == 20.0 and s["self-distillation"] is True
    r = _summary()
    r["recipe"]["train_layers"] = 2
    s = recipe_summary(r, n_layers=12)
    assert s["frozen"] == "embeddings + layers 0-9 (of 12)" and "top 2" in s["trained"] and s["encoder lr"] == 1e-5
    r["recipe"]["train_layers"] = 13
    with pytest.raises(ValueError, match="train_layers"):
        recipe_summary(r, n_layers=12)


def test_pad_lexical_and_errors():
    w, ids = pad_lexical([{"3": 0.5}, {"4": 0.1, "9": 0.7}])
    assert w.shape == ids.shape == (2, 2)
    assert ids.tolist() == [[3, -1], [4, 9]] and w[0, 1] == 0.0
    w, ids = pad_lexical([{}, {}])
    assert w.shape == (2, 1) and (w == 0).all()
    with pytest.raises(ValueError, match="non-negative"):
        pad_lexical([{"3": -0.5}])
    with pytest.raises(ValueError):
        pad_lexical([])
    with pytest.raises(TypeError):
        pad_lexical([[0.5]])


def test_pad_multivectors_and_errors(rng):
    a, b = rng.normal(size=(2, 4)), rng.normal(size=(3, 4))
    out, mask = pad_multivectors([a, b])
    assert out.shape == (2, 3, 4) and mask.tolist() == [[True, True, False], [True, True, True]]
    np.testing.assert_allclose(out[0, :2], a, rtol=1e-6)
    assert (out[0, 2] == 0).all()
    with pytest.raises(ValueError, match="hidden"):
        pad_multivectors([a, rng.normal(size=(2, 5))])
    with pytest.raises(ValueError, match="non-empty"):
        pad_multivectors([np.zeros((0, 4))])


def _encodings(rng, n, vocab=12):
    dense = rng.normal(size=(n, 6))
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    lex = []
    for _ in range(n):
        ids = rng.choice(vocab, size=int(rng.integers(0, 5)), replace=False)
        lex.append({str(t): float(rng.uniform(0, 1)) for t in ids})
    colbert = [rng.normal(size=(int(rng.integers(1, 5)), 6)) for _ in range(n)]
    return {"dense_vecs": dense, "lexical_weights": lex, "colbert_vecs": colbert}


def test_batch_scores_match_numpy(rng):
    q, p = _encodings(rng, 3), _encodings(rng, 7)
    got = batch_scores(q, p)
    np.testing.assert_allclose(got["dense"], q["dense_vecs"] @ p["dense_vecs"].T, rtol=1e-10)
    lex = np.array([[sum(w * dp[t] for t, w in dq.items() if t in dp) for dp in p["lexical_weights"]]
                    for dq in q["lexical_weights"]])
    np.testing.assert_allclose(got["lex"], lex, rtol=1e-6, atol=1e-7)
    mul = np.array([[(a @ b.T).max(axis=1).mean() for b in p["colbert_vecs"]] for a in q["colbert_vecs"]])
    np.testing.assert_allclose(got["mul"], mul, rtol=1e-6, atol=1e-7)
    assert {k: v.shape for k, v in got.items()} == {"dense": (3, 7), "lex": (3, 7), "mul": (3, 7)}


def test_batch_scores_needs_all_representations(rng):
    q, p = _encodings(rng, 2), _encodings(rng, 2)
    p["colbert_vecs"] = None
    with pytest.raises(ValueError, match="colbert_vecs"):
        batch_scores(q, p)
