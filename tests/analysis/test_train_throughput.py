"""bgem3_lib.analysis.train_throughput, train_step_worker and torch_train_step: the trainer's step (MindSpore)
and its PyTorch reference, each in its own worker process, compute the same loss, gradients and updates on a
tiny model (2 layers, hidden 32), with the top layer trainable and with the heads alone."""
from __future__ import annotations

import numpy as np
import pytest

from bgem3_lib.analysis import torch_train_step as tts
from bgem3_lib.analysis.train_throughput import StepSpec, Worker, compare_checks, make_texts

TINY = StepSpec(config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=80, type_vocab_size=2, layer_norm_eps=1e-12,
                            model_type="bert", hidden_act="gelu", pooling="mean"),
                batch_size=3, group_size=2, query_len=(4, 10), passage_len=(6, 30), length_chunks=2)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    started = {}
    try:
        for name, spec, kind in (("mindspore", TINY, "mindspore"), ("torch", TINY, "torch"),
                                 ("mindspore-jit", StepSpec(**{**TINY.__dict__, "jit": True}), "mindspore")):
            started[name] = Worker(kind, spec, logs / f"{name}.log")
        yield started
    finally:
        for w in started.values():
            w.close()


@pytest.mark.parametrize("layers", [1, 0])
def test_mindspore_step_equals_pytorch_step(workers, layers, tmp_path):
    ms, th = workers["mindspore"], workers["torch"]
    info = ms.ask("setup", layers=layers, dir=str(tmp_path))
    assert th.ask("setup", layers=layers, dir=str(tmp_path)) == info
    assert info["tokens"] < info["padded_tokens"] and info["n_params"] == 16 * layers + 4
    a, b = ms.ask("check"), th.ask("check")
    cmp = compare_checks(a, b)
    assert cmp["ok"], cmp
    assert set(a["parts"]) == set(b["parts"]) and len(a["grad_norms"]) == info["n_params"]
    assert all(v > 0 for v in b["grad_norms"].values())          # every trainable tensor gets a gradient
    sa, sb = ms.ask("steps", n=3), th.ask("steps", n=3)
    np.testing.assert_allclose(sa["loss"][0], a["parts"]["total"], rtol=1e-6)   # step 1 is the checked batch
    np.testing.assert_allclose(sa["loss"], sb["loss"], rtol=1e-4)               # the updates agree too
    np.testing.assert_allclose(sa["grad_norm"], sb["grad_norm"], rtol=1e-4)
    assert len(set(sa["loss"])) == 3                                            # and they change the loss


def test_jit_layers_experiment_computes_the_same_step(workers, tmp_path):
    for w in workers.values():
        w.ask("setup", layers=1, dir=str(tmp_path))
    # "mindspore" runs the layer on the fused CPU training kernels, the jit experiment MindSpore's own cells:
    # the same step up to float32 rounding
    plain, jitted = workers["mindspore"].ask("check"), workers["mindspore-jit"].ask("check")
    assert compare_checks(jitted, plain, rtol=1e-5, param_rtol=1e-4)["ok"]
    np.testing.assert_allclose(workers["mindspore-jit"].ask("steps", n=2)["loss"],
                               workers["mindspore"].ask("steps", n=2)["loss"], rtol=1e-5)


def test_lr_schedule_is_the_trainers():
    from bgem3_lib.training.optim import lr_at
    for warmup, total in ((0, 5), (3, 10), (20, 10**6)):
        steps = range(min(8, total + 1))
        assert [tts.lr_at(s, warmup, total) for s in steps] == [lr_at(s, 1.0, warmup, total) for s in steps]


def test_batch_is_the_recipes_shape():
    t = make_texts(StepSpec())
    assert len(t["groups"]) == 10 and all(len(g) == 5 for g in t["groups"])       # query + positive + 3 negatives
    assert sorted(i for g in t["groups"] for i in g) == list(range(50))
    lengths = [len(x) for x in t["ids"]]
    assert 12 <= min(lengths[:10]) and max(lengths[:10]) <= 40 and 90 <= min(lengths[10:]) <= max(lengths[10:]) <= 160
    assert 4800 < sum(lengths) < 5800                                            # ~ the recipe's logged steps
    assert all(x[0] == 0 and x[-1] == 2 and h.shape == (len(x), 384) and h.dtype == np.float16
               for x, h in zip(t["ids"], t["hidden"]))


def test_a_worker_error_is_raised_in_the_parent(workers, tmp_path):
    with pytest.raises(RuntimeError, match="layers must lie in"):
        workers["mindspore"].ask("setup", layers=2, dir=str(tmp_path))
