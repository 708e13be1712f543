"""The MindSpore worker of the training-throughput benchmark (:mod:`bgem3_lib.analysis.train_throughput`): the
M3-small recipe's training step, built, checked and timed in its own process.

* :func:`build_trainer` - the recipe's :class:`~bgem3_lib.training.trainer.Trainer` with its sampler fixed
  (``FixedBatchTrainer``: every step takes the whole batch of
  :func:`~bgem3_lib.analysis.train_throughput.make_texts`), the top ``layers`` encoder layers and the two heads
  trainable, random weights or a model directory's;
* :func:`jit_trainable_layers` - the experiment of ``StepSpec.jit``: the trainable layers as one
  ``mindspore.jit`` graph;
* :func:`export_step` - the batch's padded tensors and the trainable parameters, written for the PyTorch worker
  (:mod:`~bgem3_lib.analysis.torch_train_step`);
* :class:`MindSporeStep` - the worker's answers to ``setup`` / ``check`` / ``steps``, the commands the parent's
  :class:`~bgem3_lib.analysis.train_throughput.Worker` sends.

Run as ``python -m bgem3_lib.analysis.train_step_worker SPEC_JSON`` (the parent starts it; the loop is
:func:`~bgem3_lib.analysis.train_throughput.serve`). MindSpore is imported inside the functions only.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .train_throughput import CHECK_NAMES, SPECIAL_IDS, WORKER_MODULES, StepSpec, make_texts, serve, timed_steps


def _fixed_batch_trainer():
    from ..training.trainer import Trainer

    class FixedBatchTrainer(Trainer):
        """The trainer with its sampler fixed: every step takes examples ``0 .. B-1`` (the whole batch)."""

        def next_batch(self) -> list[int]:
            return list(range(len(self.groups)))

    return FixedBatchTrainer


def _random_weights(params, seed: int) -> None:
    """normal(0, 0.02) weights and biases, LayerNorm gains 1 + normal(0, 0.02) (every tensor matters)."""
    import mindspore as ms
    rng = np.random.default_rng([seed, 7])
    for p in params:
        base = 1.0 if p.name.endswith("gamma") else 0.0
        p.set_data(ms.Tensor((base + 0.02 * rng.standard_normal(p.shape)).astype(np.float32)))


def build_trainer(spec: StepSpec, layers: int):
    """The recipe's trainer over the fixed batch with the top ``layers`` layers + heads trainable."""
    import mindspore as ms

    from ..model.config import M3Config
    from ..model.encoder import M3Encoder, load_hf_state
    from ..model.heads import M3Heads
    from ..training.train_model import M3TrainNet, TextStore
    from ..training.trainer import TrainConfig, make_deterministic

    make_deterministic(spec.seed)
    lm = None
    if spec.weights != "random":
        from ..model.loading import load_directory
        lm = load_directory(spec.weights)
        if lm.heads_state is None or lm.config.hidden_size != spec.config["hidden_size"]:
            raise ValueError(f"{spec.weights} has no heads or another hidden size than the spec's")
    cfg = lm.config if lm is not None else M3Config.from_dict(spec.config)
    n = cfg.num_hidden_layers
    if not 0 <= layers < n:      # all n would start from token ids (embeddings), not from the hidden cache
        raise ValueError(f"layers must lie in [0, {n - 1}], got {layers}")
    start = n - layers
    enc = M3Encoder(cfg)
    heads = M3Heads(cfg.hidden_size, None if lm is None else lm.heads_state["colbert_linear.weight"].shape[0])
    if lm is None:
        top = [p for i in range(start, n) for p in enc.layers[i].get_parameters()]
        _random_weights(top + list(heads.get_parameters()), spec.seed)
    else:
        load_hf_state(enc, lm.encoder_state)
        for name, arr in lm.heads_state.items():
            cell, attr = name.split(".")
            getattr(getattr(heads, cell), attr).set_data(ms.Tensor(np.asarray(arr, np.float32)))
    texts = make_texts(spec)
    store = TextStore(texts["ids"], cfg.pad_token_id, hidden=lambda i: texts["hidden"][i])
    net = M3TrainNet(enc, heads, start_layer=start, freeze_layers=start, special_ids=SPECIAL_IDS,
                     temperature=spec.temperature, use_self_distill=spec.use_self_distill)
    longest = max(len(x) for x in texts["ids"])
    tc = TrainConfig(steps=spec.total_steps, lr=spec.lr if layers else 0.0, head_lr=spec.head_lr,
                     colbert_lr=spec.colbert_lr, weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps,
                     clip_norm=spec.clip_norm, temperature=spec.temperature, use_self_distill=spec.use_self_distill,
                     token_budget=spec.batch_size * longest, boundaries=(longest,), seed=spec.seed,
                     length_chunks=spec.length_chunks, start_layer=start, freeze_layers=start)
    trainer = _fixed_batch_trainer()(net, store, texts["groups"], tc)
    if spec.jit and layers:
        jit_trainable_layers(trainer)
    return trainer


def jit_trainable_layers(trainer) -> None:
    """Experiment (``StepSpec.jit``): run the trainable layers as one ``mindspore.jit`` graph (forward and its
    backward compiled), by replacing ``run_layers`` on this trainer's encoder instance.

    Two things it needs that the trainer does not do: the graph is compiled per input shape (``jit(dynamic=1)``
    does not compile ``SelfAttention``'s branch on the length), so it pays only where every step has the same
    shapes, as the benchmark's fixed batch has; and AdamW must write the parameters in place
    (``ops.assign``): after ``Parameter.set_data`` (what :class:`~bgem3_lib.training.optim.AdamW` does) the
    compiled graph reads invalid memory (NaN on the second step). The optimizer's arithmetic is unchanged."""
    import mindspore as ms
    from mindspore import nn, ops

    block, opt = trainer.net.block, trainer.opt
    enc, lo, hi = block.encoder, block.frozen, len(block.encoder.layers)

    class Stack(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)      # the encoder's parameter names stay as they are
            self.encoder = enc

        @ms.jit
        def construct(self, x, bias):
            for i in range(lo, hi):
                x = self.encoder.layers[i](x, bias)
            return x

    stack, plain = Stack(), enc.run_layers
    trainer.net.use_cpu_kernels = False     # the experiment is MindSpore's own layers, compiled: not the fused kernels

    def run_layers(x, bias, start, end):
        return stack(x, bias) if (start, end) == (lo, hi) else plain(x, bias, start, end)

    enc.run_layers = run_layers

    def step_in_place(grads: tuple, lr: float) -> None:          # AdamW.step with ops.assign for set_data
        opt.t += 1
        c1, c2 = 1.0 - opt.b1 ** opt.t, 1.0 - opt.b2 ** opt.t
        for i, (p, g) in enumerate(zip(opt.params, grads)):
            opt.m[i] = opt.m[i] * opt.b1 + g * (1.0 - opt.b1)
            opt.v[i] = opt.v[i] * opt.b2 + (g * g) * (1.0 - opt.b2)
            update = (opt.m[i] / c1) / (ops.sqrt(opt.v[i] / c2) + opt.eps) + p * opt.decay[i]
            ops.assign(p, p - update * (lr * opt.lr_scales[i]))

    opt.m, opt.v = ([ms.Tensor(np.asarray(x.asnumpy() if isinstance(x, ms.Tensor) else x)) for x in xs]
                    for xs in (opt.m, opt.v))
    opt.fused = False                 # clip_and_step then calls the step below, on MindSpore tensors
    opt.step = step_in_place


def export_step(trainer, path: Path) -> dict:
    """Write the batch's padded tensors and the trainable parameters (with their peak learning rates and
    weight decays) to ``path.npz`` / ``path.json`` for the PyTorch worker; returns the JSON part."""
    from ..training.train_model import as_chunks
    inputs = trainer.tensors(trainer.next_batch(), packed=False)
    arrays = {"q_ids": inputs[0], "q_mask": inputs[1], "q_hidden": inputs[3]}
    chunks = [as_chunks(inputs[k]) for k in (4, 5, 7)]
    for c, (ids, mask, hid) in enumerate(zip(*chunks)):
        arrays.update({f"p{c}_ids": ids, f"p{c}_mask": mask, f"p{c}_hidden": hid})
    if inputs[8] is not None:
        arrays["p_order"] = inputs[8]
    arrays = {k: v.asnumpy() for k, v in arrays.items()}
    params = [p.name for p in trainer.params]
    arrays.update({f"param/{p.name}": p.asnumpy() for p in trainer.params})
    np.savez(path.with_suffix(".npz"), **arrays)
    net, cfg = trainer.net, trainer.cfg
    meta = {"config": net.block.cfg.to_dict(), "start_layer": net.block.start, "chunks": len(chunks[0]),
            "params": params, "peaks": list(trainer.opt.lr_scales), "decays": list(trainer.opt.decay),
            "betas": [trainer.opt.b1, trainer.opt.b2], "eps": trainer.opt.eps, "clip_norm": cfg.clip_norm,
            "warmup_steps": cfg.warmup_steps, "total_steps": cfg.steps, "temperature": net.temperature,
            "teacher_weights": list(net.teacher_weights), "lambdas": list(net.lambdas),
            "use_self_distill": net.use_self_distill, "special_ids": list(net.block.special_ids),
            "group_size": len(trainer.groups[0]) - 1}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return meta


class MindSporeStep:
    """The worker's state: one trainer at a time (rebuilt by ``setup``)."""

    def __init__(self, spec: StepSpec):
        self.spec, self.trainer = spec, None

    def setup(self, layers: int, dir: str) -> dict:
        self.trainer = build_trainer(self.spec, layers)
        meta = export_step(self.trainer, Path(dir) / "step")
        real, padded = self.trainer.token_counts(self.trainer.tensors(self.trainer.next_batch()))
        return {"tokens": real, "padded_tokens": padded, "n_params": len(meta["params"]),
                "param_values": int(sum(p.size for p in self.trainer.params))}

    def check(self) -> dict:
        tr = self.trainer
        t0 = time.perf_counter()
        (total, *parts), grads = tr.grad_fn(*tr.tensors(tr.next_batch()))
        values = [float(x.asnumpy()) for x in (total, *parts)]
        seconds = time.perf_counter() - t0                   # the first forward + backward (compiles, under jit)
        norms = {p.name: float(np.linalg.norm(g.asnumpy().astype(np.float64))) for p, g in zip(tr.params, grads)}
        return {"parts": dict(zip(CHECK_NAMES, values)), "grad_norms": norms,
                "global_norm": float(np.sqrt(sum(v * v for v in norms.values()))), "seconds": seconds}

    def steps(self, n: int) -> dict:
        return timed_steps(self.trainer.train_step, n)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {WORKER_MODULES['mindspore']} SPEC_JSON")
    serve(MindSporeStep(StepSpec.from_json(sys.argv[1])))
