"""Training throughput of the M3-small recipe's step beside the same step in PyTorch (issue 16, item 5): what the
two worker processes share, and the benchmark's parent side.

The step measured is the trainer's own: :meth:`~bgem3_lib.training.trainer.Trainer.train_step` of an
:class:`~bgem3_lib.training.train_model.M3TrainNet` whose top ``layers`` encoder layers and the two heads are
trainable, fed from the hidden states cached at the input of the first trainable layer (as the recipe's
:mod:`~bgem3_lib.training.hidden_cache` feeds it): batch assembly from the cache, length chunks, forward,
the unified loss with self-distillation, ``value_and_grad``, global-norm clipping and AdamW with the
recipe's per-part learning rates. Only the sampler is fixed (every step takes the same examples), so every
timed step computes the same thing. It runs in :mod:`bgem3_lib.analysis.train_step_worker` (MindSpore); the
PyTorch side (:mod:`bgem3_lib.analysis.torch_train_step`) runs the same layers, heads and loss on the same
padded tensors with the same weights, in its own process: the MindSpore worker writes both to an ``.npz``
the PyTorch worker reads.

Here: :class:`StepSpec` and :func:`make_texts` (what both workers build), the worker protocol (:func:`serve`
in the workers, :class:`Worker` in the parent), :func:`compare_checks` (the agreement test run before any
timing counts) and the arithmetic of the benchmark's report (:func:`fit_line`, :func:`layers_within`,
:func:`recipe_budget`, :func:`median_seconds`).

Workers (one process per framework, JSON commands on stdin, one ``@@ {json}`` answer line on stdout)::

    python -m bgem3_lib.analysis.train_step_worker     SPEC_JSON     # MindSpore
    python -m bgem3_lib.analysis.torch_train_step      SPEC_JSON     # PyTorch

Commands: ``{"op": "setup", "layers": N, "dir": D}`` (MindSpore writes ``D/step.npz`` + ``D/step.json``,
PyTorch reads them), ``{"op": "check"}`` (loss parts and per-parameter gradient norms of the batch, no
update; its ``seconds``: the first forward + backward), ``{"op": "steps", "n": k}`` (``k`` optimizer steps:
seconds, loss, gradient norm of each), ``{"op": "quit"}``. :class:`Worker` drives one from the parent.

Nothing here imports MindSpore or PyTorch: the benchmark's parent process imports only this file.

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


# ---------------------------------------------------------------------------------------------- the workers' loop
def timed_steps(step, n: int) -> dict:
    """Run ``step()`` (one optimizer step -> ``{"loss", "grad_norm"}``, and ``"batch_seconds"`` where the step
    assembles its batch, as the trainer's does) ``n`` times: per-step wall seconds, losses, gradient norms (and
    batch seconds), as both workers answer the ``steps`` command.

    >>> timed_steps(lambda: {"loss": 1.0, "grad_norm": 2.0, "batch_seconds": 0.0}, 2)["batch_seconds"]
    [0.0, 0.0]
    """
    out = {"seconds": [], "loss": [], "grad_norm": []}
    for _ in range(int(n)):
        t0 = time.perf_counter()
        rec = step()
        out["seconds"].append(time.perf_counter() - t0)
        out["loss"].append(rec["loss"])
        out["grad_norm"].append(rec["grad_norm"])
        if "batch_seconds" in rec:
            out.setdefault("batch_seconds", []).append(rec["batch_seconds"])
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
WORKER_MODULES = {"mindspore": "bgem3_lib.analysis.train_step_worker", "torch": "bgem3_lib.analysis.torch_train_step"}


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

