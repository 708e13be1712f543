"""Training throughput of the M3-small recipe's step beside the same step in PyTorch (issue 16, item 5).

The step measured is the trainer's own: :meth:`~bgem3_lib.training.trainer.Trainer.train_step` of an
:class:`~bgem3_lib.training.train_model.M3TrainNet` whose top ``layers`` encoder layers and the two heads are
trainable, fed from the hidden states cached at the input of the first trainable layer (as the recipe's
:mod:`~bgem3_lib.training.hidden_cache` feeds it): batch assembly from the cache, length chunks, forward,
the unified loss with self-distillation, ``value_and_grad``, global-norm clipping and AdamW with the
recipe's per-part learning rates. Only the sampler is fixed (:class:`FixedBatchTrainer` returns the same
examples every step), so every timed step computes the same thing.

The PyTorch side (:mod:`bgem3_lib.analysis.torch_train_step`) runs the same layers, heads and loss on the same
padded tensors with the same weights, in its own process: this module's worker writes both to an ``.npz``
the PyTorch worker reads.

Workers (one process per framework, JSON commands on stdin, one ``@@ {json}`` answer line on stdout)::

    python -m bgem3_lib.analysis.train_throughput      SPEC_JSON     # MindSpore (this module)
    python -m bgem3_lib.analysis.torch_train_step      SPEC_JSON     # PyTorch

Commands: ``{"op": "setup", "layers": N, "dir": D}`` (MindSpore writes ``D/step.npz`` + ``D/step.json``,
PyTorch reads them), ``{"op": "check"}`` (loss parts and per-parameter gradient norms of the batch, no
update; its ``seconds``: the first forward + backward), ``{"op": "steps", "n": k}`` (``k`` optimizer steps:
seconds, loss, gradient norm of each), ``{"op": "quit"}``. :class:`Worker` drives one from the parent;
:func:`compare_checks` is the agreement test run before any timing counts.

Nothing at module level imports MindSpore or PyTorch: the benchmark's parent process imports only this file.

>>> fit_line({0: 1.0, 1: 1.5, 2: 2.0})
(1.0, 0.5)
>>> layers_within(1.0, 0.5, budget=2.2, most=12)
2
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# M3-small's encoder: multilingual-e5-small (BERT conventions, mean pooling), 12 x 384, 12 heads, FFN 1536
M3_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
                vocab_size=250037, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                model_type="bert", hidden_act="gelu", pooling="mean")
SPECIAL_IDS = (0, 2, 1, 3)          # (bos, eos, pad, unk): the recipe's special_ids
CHECK_NAMES = ("total", "dense", "lex", "mul", "inter", "L", "distill_dense", "distill_lex", "distill_mul",
               "L_distill")


@dataclass
class StepSpec:
    """What both workers build: the model shape, the batch and the recipe's optimizer settings.

    The batch is the recipe's (:class:`~bgem3_lib.training.recipe.M3SmallRecipe`): ``batch_size`` = token
    budget 1600 // bucket 160 examples, each a query and ``group_size`` passages (its positive and 3 hard
    negatives); lengths (with ``<s>``/``</s>``)
    drawn uniformly from ``query_len`` / ``passage_len`` (inclusive), which gives ~5.3k real tokens per
    step like the recipe's logged steps. Hidden states are random (float16, like the cache), token ids
    Zipf-distributed (so lexical matches occur). ``weights``: ``"random"`` (normal(0, 0.02) from ``seed``)
    or a model directory (its top layers and heads, e.g. the trained ``m3-small``)."""
    config: dict = field(default_factory=lambda: dict(M3_SMALL))
    batch_size: int = 10
    group_size: int = 4
    query_len: tuple = (12, 40)
    passage_len: tuple = (90, 160)
    seed: int = 0
    weights: str = "random"
    length_chunks: int = 4
    lr: float = 1e-5              # the recipe's encoder_lr, head_lr, colbert_lr, warm-up, decay, clip, tau
    head_lr: float = 1e-3
    colbert_lr: float = 3e-5
    warmup_steps: int = 20
    total_steps: int = 10**6      # the schedule's length: long enough never to reach lr 0 while timing
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    temperature: float = 0.02
    use_self_distill: bool = True
    jit: bool = False             # MindSpore only: an experiment, see jit_trainable_layers
    torch_attention: str = "sdpa"  # PyTorch only: "sdpa" (transformers' default) or "eager"

    @classmethod
    def from_json(cls, text: str) -> "StepSpec":
        d = json.loads(text)
        for k in ("query_len", "passage_len"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def make_texts(spec: StepSpec) -> dict:
    """The batch's texts: ``ids`` (list of int32 arrays; queries first, then each query's group of
    passages), ``hidden`` (list of float16 ``[len, H]``), ``groups`` (per example: text indices)."""
    rng = np.random.default_rng([spec.seed, 16, 5])
    b, g = spec.batch_size, spec.group_size
    if b < 1 or g < 1:
        raise ValueError(f"need batch_size >= 1 and group_size >= 1, got {b}, {g}")
    vocab, H = spec.config["vocab_size"], spec.config["hidden_size"]
    lengths = [int(rng.integers(spec.query_len[0], spec.query_len[1] + 1)) for _ in range(b)]
    lengths += [int(rng.integers(spec.passage_len[0], spec.passage_len[1] + 1)) for _ in range(b * g)]
    ids, hidden = [], []
    for n in lengths:
        body = 4 + (rng.zipf(1.3, n - 2) - 1) % (vocab - 4)
        ids.append(np.r_[0, body, 2].astype(np.int32))
        hidden.append(rng.standard_normal((n, H)).astype(np.float16))
    groups = [(q, *range(b + q * g, b + (q + 1) * g)) for q in range(b)]
    return {"ids": ids, "hidden": hidden, "groups": groups}


# ---------------------------------------------------------------------------------------------- MindSpore side
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

    opt.step = step_in_place


def export_step(trainer, path: Path) -> dict:
    """Write the batch's padded tensors and the trainable parameters (with their peak learning rates and
    weight decays) to ``path.npz`` / ``path.json`` for the PyTorch worker; returns the JSON part."""
    from ..training.train_model import as_chunks
    inputs = trainer.tensors(trainer.next_batch())
    arrays = {"q_ids": inputs[0], "q_mask": inputs[1], "q_hidden": inputs[3]}
    chunks = [as_chunks(inputs[k]) for k in (4, 5, 7)]
    for c, (ids, mask, hid) in enumerate(zip(*chunks)):
        arrays.update({f"p{c}_ids": ids, f"p{c}_mask": mask, f"p{c}_hidden": hid})
    if len(inputs) > 8:
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
        out = {"seconds": [], "loss": [], "grad_norm": []}
        for _ in range(int(n)):
            t0 = time.perf_counter()
            rec = self.trainer.train_step()
            out["seconds"].append(time.perf_counter() - t0)
            out["loss"].append(rec["loss"])
            out["grad_norm"].append(rec["grad_norm"])
        return out


def serve(handler) -> None:
    """The worker loop: a JSON command per stdin line -> ``handler.<op>(**args)`` -> one ``@@ {json}`` line."""
    print("@@ " + json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            ans = getattr(handler, op)(**cmd)
        except Exception as exc:                      # reported to the parent, which raises it
            ans = {"error": f"{type(exc).__name__}: {exc}"}
        print("@@ " + json.dumps(ans), flush=True)


# ---------------------------------------------------------------------------------------------- the parent
WORKER_MODULES = {"mindspore": "bgem3_lib.analysis.train_throughput", "torch": "bgem3_lib.analysis.torch_train_step"}


class Worker:
    """One framework's worker process; ``ask(op, **args)`` sends a command and returns its answer."""

    def __init__(self, framework: str, spec: StepSpec, log_path: Path | None = None, threads: int | None = None):
        self.framework = framework
        env = dict(os.environ, OMP_NUM_THREADS=str(threads or os.environ.get("OMP_NUM_THREADS", "2")),
                   GLOG_v=os.environ.get("GLOG_v", "3"))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        self.log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULES[framework], spec.to_json()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=str(ROOT))
        self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                ans = json.loads(line[3:])
                if "error" in ans:
                    raise RuntimeError(f"{self.framework} worker: {ans['error']}")
                return ans
        raise RuntimeError(f"{self.framework} worker exited with code {self.proc.wait()}"
                           + (f"; see {self.log.name}" if hasattr(self.log, "name") else ""))

    def ask(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if hasattr(self.log, "close"):
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def compare_checks(ours: Mapping, ref: Mapping, rtol: float = 1e-4, param_rtol: float = 1e-3) -> dict:
    """Largest relative differences between two ``check`` answers: ``loss`` (every loss part),
    ``grad_norm`` (global) and ``param_grad_norm`` (per parameter, relative to the largest parameter norm
    floor 1e-3 x global, so a near-zero gradient is not judged by its own size). ``ok`` when the first
    two are within ``rtol`` and the last within ``param_rtol``.

    >>> c = {"parts": {"total": 1.0}, "grad_norms": {"w": 2.0}, "global_norm": 2.0}
    >>> compare_checks(c, {"parts": {"total": 1.00001}, "grad_norms": {"w": 2.0}, "global_norm": 2.0})["ok"]
    True
    >>> compare_checks(c, {"parts": {"total": 1.1}, "grad_norms": {"w": 2.0}, "global_norm": 2.0})["ok"]
    False
    """
    def rel(a: float, b: float, floor: float = 0.0) -> float:
        return abs(a - b) / max(abs(b), floor, 1e-30)

    if set(ours["grad_norms"]) != set(ref["grad_norms"]):
        missing = sorted(set(ours["grad_norms"]) ^ set(ref["grad_norms"]))
        raise ValueError(f"the two sides train different parameters: {missing[:4]}")
    loss = max(rel(ours["parts"][k], ref["parts"][k]) for k in ref["parts"])
    glob = rel(ours["global_norm"], ref["global_norm"])
    floor = 1e-3 * ref["global_norm"]
    per = max(rel(ours["grad_norms"][k], v, floor) for k, v in ref["grad_norms"].items())
    return {"loss": loss, "grad_norm": glob, "param_grad_norm": per,
            "ok": bool(loss <= rtol and glob <= rtol and per <= param_rtol)}


def fit_line(seconds: Mapping[int, float]) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + per_layer * layers`` over the measured layer counts."""
    x = np.array(sorted(seconds), float)
    y = np.array([seconds[k] for k in sorted(seconds)], float)
    if x.size < 2:
        raise ValueError("need step times at >= 2 layer counts to fit a per-layer cost")
    per, fixed = np.polyfit(x, y, 1)
    return float(round(fixed, 12)), float(round(per, 12))


def layers_within(fixed: float, per_layer: float, budget: float, most: int) -> int:
    """Most trainable layers (0 .. ``most``) whose step ``fixed + per_layer * layers`` fits ``budget``
    seconds; 0 also when not even the heads fit."""
    if per_layer <= 0:
        return most if fixed <= budget else 0
    return int(min(most, max(0, np.floor((budget - fixed) / per_layer + 1e-9))))


def recipe_budget(steps: int, budget_seconds: float, log: Mapping | None) -> dict:
    """The recipe's seconds per training step: its wall-time budget less what its last run spent outside the
    training loop (data, hidden cache, validation: ``training_log.json``'s ``seconds``), over its steps.

    >>> recipe_budget(200, 1200.0, {"seconds": {"data": 5, "cache_states": 70, "validate_before": 1,
    ...     "validate_after": 1, "train": 80, "total": 157}})["per_step"]
    5.615
    """
    outside = 0.0
    if log is not None:
        s = log["seconds"]
        outside = float(s["total"] - s["train"])
    return {"budget_seconds": budget_seconds, "outside_training_seconds": outside, "steps": steps,
            "per_step": (budget_seconds - outside) / steps}


def median_seconds(runs: Sequence[float]) -> float:
    return float(np.median(np.asarray(runs, float)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {WORKER_MODULES['mindspore']} SPEC_JSON")
    serve(MindSporeStep(StepSpec.from_json(sys.argv[1])))
