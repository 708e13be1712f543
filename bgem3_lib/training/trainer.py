"""The fine-tuning loop: length-bucketed batches, AdamW, resumable checkpoints, a loss curve.

``Trainer(net, store, groups, config, out_dir).train()`` runs ``config.steps`` optimizer steps:

1. the next batch of example indices from :class:`~bgem3_lib.training.bucketing.LengthBucketSampler` (one length
   bucket per batch, batch size = ``token_budget // bucket upper length``); the batch's passages are
   encoded in up to ``length_chunks`` length-sorted chunks, each padded to its own longest text
   (:func:`~bgem3_lib.training.bucketing.length_chunks`: the padding left inside an example's group); states from a
   hidden cache go in packed, one ``[T, H]`` matrix of the batch's real tokens, where the net takes them so
   (heads only, or the fused kernels' layers: :meth:`~bgem3_lib.training.train_model.M3TrainNet.takes_packed_states`);
2. ``mindspore.value_and_grad`` of :class:`~bgem3_lib.training.train_model.M3TrainNet` w.r.t. the trainable
   parameters; gradients clipped to global norm ``clip_norm``;
3. :class:`~bgem3_lib.training.optim.AdamW` with warm-up + linear decay (:func:`~bgem3_lib.training.optim.lr_at`); peak
   learning rates per part: ``lr`` (encoder), ``head_lr`` (sparse), ``colbert_lr``; 0 freezes a part.

Checkpoints (every ``checkpoint_every`` steps and at the end) are one ``checkpoint.safetensors`` in
``out_dir``, written to a temporary file, fsync'd and moved into place with ``os.replace``: a run killed at
any moment (even ``SIGKILL`` during the write) leaves the previous complete checkpoint. It holds the
trainable parameters, AdamW's ``m``/``v`` and step, and as JSON metadata the sampler state (seed, epoch,
position in the epoch — the data position and the only random state of the loop: there is no dropout)
and the loss log. ``Trainer(...).train()`` with an existing checkpoint resumes from it; the
continuation is bit-identical to an uninterrupted run (``tests/training/test_trainer.py``) because every step is
a deterministic function of (parameters, optimizer state, batch).

Determinism on CPU: :func:`make_deterministic` calls ``mindspore.set_deterministic(True)`` and
``mindspore.set_seed``; MindSpore's CPU kernels split work statically over their thread pool, so
results repeat for the same thread count (keep ``OMP_NUM_THREADS`` / the machine the same when resuming).
On CPU it also switches PyNative to synchronous dispatch (``model.runtime.cpu_synchronous``): a training step is
thousands of small ops, and on a busy 2-core CPU the asynchronous dispatch threads spent ~10x longer
handing work over than computing (measured: 4 s vs 0.35 s per step of the tiny test model).

Multi-process (``world_size > 1``), documented, not tested here::

    msrun --worker_num=2 --local_worker_num=2 python -m bgem3_lib train --recipe m3-small

``mindspore.communication.init()`` is called when ``MS_WORKER_NUM`` > 1; each rank reads its own
shard of the batches (``batch[rank::world]``), passages' dense vectors are all-gathered for the dense
loss and gradients are averaged with ``AllReduce`` before the optimizer step.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..model.encoder import position_ids_for
from ..model.runtime import cpu_synchronous
from ..paths import atomic_write
from ..progress import tqdm
from ..retrieval.modes import TEACHER_WEIGHTS
from .bucketing import LengthBucketSampler, length_chunks
from .optim import AdamW, lr_at
from .train_model import PART_NAMES, M3TrainNet, TextStore, as_chunks  # noqa: F401 (TextStore re-exported)

CHECKPOINT = "checkpoint.safetensors"


def make_deterministic(seed: int) -> None:
    """Seeds, deterministic kernels and synchronous op dispatch (see the module docstring)."""
    try:
        ms.set_deterministic(True)
    except RuntimeError:          # MindSpore refuses a second call in one process; the first one holds
        pass
    if ms.get_context("device_target") == "CPU":      # on a device, asynchronous dispatch overlaps host and device
        cpu_synchronous()
    ms.set_seed(int(seed))
    np.random.seed(int(seed) % 2**32)


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-5                 # peak learning rate of encoder parameters
    head_lr: float = 1e-3            # peak learning rate of the sparse head (and ColBERT by default)
    colbert_lr: float | None = None  # peak learning rate of the ColBERT head (None: head_lr)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    clip_norm: float = 1.0
    temperature: float = 0.02
    use_self_distill: bool = True
    teacher_weights: tuple = TEACHER_WEIGHTS
    lambdas: tuple = (1.0, 0.1, 1.0)  # the paper's Sec. 3.3 (and FlagEmbedding's): VARIANT_LAMBDAS["paper"]
    token_budget: int = 4096
    boundaries: tuple = (64, 128, 256, 512)
    seed: int = 0
    checkpoint_every: int = 0
    sub_batch: int = 0
    recompute: bool | None = None    # gradient checkpointing (None: on exactly when sub_batch is set)
    length_chunks: int = 4           # passages of a batch in <= this many length-sorted chunks (1: one matrix)
    start_layer: int = 0
    freeze_layers: int = 0
    freeze_embeddings: bool = True
    extra: dict = field(default_factory=dict)


def world_info() -> tuple[int, int]:
    """(world size, rank): (1, 0) unless launched by ``msrun`` with several workers."""
    world = int(os.environ.get("MS_WORKER_NUM", "1"))
    if world <= 1:
        return 1, 0
    from mindspore.communication import get_group_size, get_rank, init
    init()
    return get_group_size(), get_rank()


def _shared(a: np.ndarray) -> Tensor:
    """A Tensor on a NumPy array made for this step alone (nothing writes it afterwards): its memory shared, not
    copied (``Tensor(a)`` copied the 8 MB of a heads-only step's states in 0.7-4 ms, faulting in fresh pages)."""
    return Tensor.from_numpy(np.ascontiguousarray(a))


class Trainer:
    """Fine-tunes ``net`` on ``groups`` (per example: text indices ``(query, positive, *negatives)``)."""

    def __init__(self, net: M3TrainNet, store: TextStore, groups: list, config: TrainConfig,
                 out_dir: str | Path | None = None, position_ids=None):
        if not groups or len({len(g) for g in groups}) != 1 or len(groups[0]) < 2:
            raise ValueError("groups must be non-empty (query, positive, *negatives) tuples of one size")
        net_side = {"use_self_distill": net.use_self_distill, "temperature": net.temperature,
                    "teacher_weights": tuple(net.teacher_weights), "lambdas": tuple(net.lambdas),
                    "sub_batch": net.sub_batch, "start_layer": net.block.start, "freeze_layers": net.block.frozen,
                    "freeze_embeddings": net.block.freeze_embeddings}
        if config.recompute is not None and bool(config.recompute) != net.recompute:
            raise ValueError("TrainConfig and M3TrainNet disagree on ['recompute']: build both from the same settings")
        cfg_side = {**{k: getattr(config, k) for k in net_side},
                    "freeze_layers": max(config.start_layer, config.freeze_layers)}
        differ = [k for k, v in net_side.items()
                  if (tuple(cfg_side[k]) if isinstance(v, tuple) else cfg_side[k]) != v]
        if differ:
            raise ValueError(f"TrainConfig and M3TrainNet disagree on {differ}: build both from the same settings")
        self.net, self.store, self.groups, self.cfg = net, store, [tuple(g) for g in groups], config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        cfg = net.block.cfg
        self.position_ids = position_ids or (lambda ids, mask: position_ids_for(ids, mask, cfg))
        lengths = [max(store.length(i) for i in g) for g in self.groups]
        self.sampler = LengthBucketSampler(lengths, boundaries=config.boundaries,
                                           token_budget=config.token_budget, seed=config.seed)
        self._iter = None
        heads = net.block.heads
        colbert = {id(p) for p in heads.colbert_linear.get_parameters()}
        sparse = {id(p) for p in heads.sparse_linear.get_parameters()}
        colbert_lr = config.head_lr if config.colbert_lr is None else config.colbert_lr

        def peak(p) -> float:
            return colbert_lr if id(p) in colbert else config.head_lr if id(p) in sparse else config.lr

        candidates = net.trainable_params()
        self.params = [p for p in candidates if peak(p) > 0]     # a peak of 0 freezes the parameter
        peaks = [peak(p) for p in self.params]
        self.opt = AdamW(self.params, peaks, weight_decay=config.weight_decay)
        self.grad_fn = ms.value_and_grad(net, grad_position=None, weights=self.params, has_aux=True)
        self.world, self.rank = net.world_size, net.rank
        self.step, self.log = 0, []

    # ------------------------------------------------------------------ data
    def next_batch(self) -> list[int]:
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.sampler)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise RuntimeError("the sampler yields no batches")

    def tensors(self, examples: list[int], packed: bool | None = None):
        """Example indices -> the inputs of :class:`M3TrainNet`: queries, then passages (in
        ``config.length_chunks`` length chunks with their order tensor when that is > 1). ``packed`` (default: where
        the net takes them, :meth:`M3TrainNet.takes_packed_states`): the cached states as one ``packed_states [T, H]``
        input after ``p_order`` (no padded states, no position ids) instead of padded per matrix."""
        if self.world > 1:
            examples = examples[self.rank::self.world] or examples[:1]
        if packed is None:
            packed = self.store.hidden is not None and self.net.takes_packed_states()
        queries = [self.groups[e][0] for e in examples]
        passages = [i for e in examples for i in self.groups[e][1:]]
        out = self._padded(queries, packed)
        if self.cfg.length_chunks <= 1:
            out += self._padded(passages, packed) + [None]
        else:
            chunks = length_chunks([self.store.length(i) for i in passages], self.cfg.length_chunks)
            parts = [self._padded([passages[j] for j in ch], packed) for ch in chunks]
            order = np.empty(len(passages), np.int32)
            order[np.concatenate(chunks)] = np.arange(len(passages), dtype=np.int32)
            out += [tuple(p[k] for p in parts) for k in range(4)] + [_shared(order)]
        return out + [_shared(self.store.packed_states(queries + passages))] if packed else out

    def _padded(self, idx: list[int], packed: bool = False) -> list:
        ids, mask, hid = self.store.batch(idx, with_states=not packed)
        pos = None if packed else _shared(self.position_ids(ids, mask))
        return [_shared(ids), _shared(mask), pos, None if hid is None else _shared(hid)]

    @staticmethod
    def token_counts(inputs) -> tuple[int, int]:
        """(real, padded) tokens of the inputs built by :meth:`tensors`."""
        masks = [inputs[1], *as_chunks(inputs[5])]
        return (int(sum(int(m.asnumpy().sum()) for m in masks)),
                int(sum(m.shape[0] * m.shape[1] for m in masks)))

    # ------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        t0 = time.time()
        examples = self.next_batch()
        inputs = self.tensors(examples)
        batch_seconds = time.time() - t0                   # the batch from the store: padding, widening, Tensors
        (total, *parts), grads = self.grad_fn(*inputs)
        real, padded = self.token_counts(inputs)
        padded_len = max(int(x.shape[1]) for x in as_chunks(inputs[4]))
        if self.world > 1:
            reduce = ops.AllReduce()
            grads = tuple(reduce(g) / self.world for g in grads)
        lr = lr_at(self.step, 1.0, self.cfg.warmup_steps, self.cfg.steps)   # x each parameter's peak
        norm = self.opt.clip_and_step(grads, self.cfg.clip_norm, lr)       # clip_by_global_norm, then AdamW
        self.step += 1
        rec = {"step": self.step, "lr_factor": lr, "loss": float(total.asnumpy()), "grad_norm": norm,
               "batch_size": len(examples), "padded_len": padded_len, "tokens": real, "padded_tokens": padded,
               "seconds": time.time() - t0, "batch_seconds": batch_seconds}
        names = PART_NAMES if self.net.use_self_distill else PART_NAMES[:5]
        rec.update({k: float(v.asnumpy()) for k, v in zip(PART_NAMES, parts) if k in names})
        self.log.append(rec)
        return rec

    def train(self, callback=None) -> list[dict]:
        """Run (or resume) to ``config.steps``; ``callback(trainer)`` after every step and checkpoint."""
        if self.out_dir is not None and (self.out_dir / CHECKPOINT).is_file():
            self.load_checkpoint(self.out_dir / CHECKPOINT)
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", disable=self.cfg.steps < 20)
        while self.step < self.cfg.steps:
            rec = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            every = self.cfg.checkpoint_every
            due = (every and self.step % every == 0) or self.step == self.cfg.steps
            if self.out_dir is not None and due and self.rank == 0:
                self.save_checkpoint(self.out_dir / CHECKPOINT)
            if callback is not None:
                callback(self)
        bar.close()
        from ..kernels import train as train_kernels
        train_kernels.free_saved()          # the training kernels' activation buffers, kept for reuse between steps
        return self.log

    # ------------------------------------------------------------------ checkpoints
    def state_meta(self) -> dict:
        return {"step": self.step, "sampler": self.sampler.state_dict(), "optimizer_t": self.opt.t,
                "config": asdict(self.cfg), "log": self.log,
                "params": [p.name for p in self.params]}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Atomically write parameters, optimizer state, sampler position and log to ``path``."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        opt = self.opt.state_dict()
        tensors = {f"param/{p.name}": p.asnumpy() for p in self.params}
        tensors.update({f"adam_m/{k}": v for k, v in opt["m"].items()})
        tensors.update({f"adam_v/{k}": v for k, v in opt["v"].items()})
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"trainer": json.dumps(self.state_meta())})
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = json.loads(f.metadata()["trainer"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:   # safetensors raises its own error types for a damaged file
            raise ValueError(f"{path} is not a readable trainer checkpoint: {exc}") from exc
        if json.loads(json.dumps(asdict(self.cfg))) != meta["config"]:
            raise ValueError(f"{path} was written by a run with another configuration; delete it to start over")
        if meta["params"] != [p.name for p in self.params]:
            raise ValueError(f"{path} was written for other trainable parameters: {meta['params'][:3]}...")
        for p in self.params:
            p.set_data(Tensor(tensors[f"param/{p.name}"], p.dtype))
        self.opt.load_state_dict({"t": meta["optimizer_t"],
                                  "m": {p.name: tensors[f"adam_m/{p.name}"] for p in self.params},
                                  "v": {p.name: tensors[f"adam_v/{p.name}"] for p in self.params}})
        self.sampler.load_state_dict(meta["sampler"])
        self._iter = None
        self.step, self.log = int(meta["step"]), list(meta["log"])
