"""``M3TrainNet``: encoder (whole, or its top layers over cached states) + heads -> unified loss.

A batch holds ``B`` queries and ``N = B * G`` passages (each query's positive, then its ``G - 1`` hard
negatives). Each text becomes, as in inference (:mod:`bgem3_lib.model.heads`) but kept differentiable
(:meth:`~bgem3_lib.model.heads.M3Heads.train_outputs`):

* dense   ``[B, H]``    pooled (CLS or masked mean, per config) and L2-normalised,
* sparse  ``[B, L]``    ``relu(sparse_linear(h))``, zero at padding and special tokens,
* colbert ``[B, L-1, D]`` ``colbert_linear(h[:, 1:])``, L2-normalised, zero at padding;

then :func:`bgem3_lib.training.losses.m3_loss` scores every query against every passage of the batch. Inside
the net the heads run once on the batch's packed real tokens and the lexical and ColBERT scores come from
:mod:`bgem3_lib.training.batch_scores`: the numbers of ``train_outputs``,
:func:`~bgem3_lib.training.losses.sparse_scores` and :func:`~bgem3_lib.training.losses.colbert_scores` (up to
float32 summation order), in fewer and cheaper CPU kernels.

Where the forward starts: ``start_layer = 0`` runs embeddings and all layers from token ids;
``start_layer = k`` takes hidden states cached at the input of layer ``k`` (the frozen lower part was
run once, forward only). ``freeze_layers`` (>= start_layer) lower layers and, optionally, the
embeddings run under ``stop_gradient`` and are left out of the optimizer.

Length chunks: the passages of a batch may come as several matrices, each padded only to its own
longest text (:func:`~bgem3_lib.training.bucketing.length_chunks`); scores are computed chunk by chunk and put
back in the batch's order, so the loss is the same as with one padded matrix, with less padding.

Recompute and split batch (the paper's long-text training, its Appendix B.3):

* ``recompute=True`` (gradient checkpointing) runs each trainable layer through ``mindspore.recompute``
  (the PyNative form of ``Cell.recompute()``): a layer keeps only its input ``[B, L, H]`` for backward
  and rebuilds its activations there, so at most one layer's activations of the batch exist at a time;
  past ``ATTENTION_BLOCK`` tokens the trainable layers' attention blocks are recomputed too
  (``SelfAttention.recompute_blocks``, set on those layers for good), so the L x L scores never exist at once;
* ``sub_batch > 0`` (split batch) encodes the texts ``sub_batch`` rows at a time and concatenates their
  outputs, so the loss still sees every in-batch negative; with ``recompute`` (the default whenever
  ``sub_batch`` is set) each sub-batch's whole encode is recomputed in backward, so the activations alive
  at once are one sub-batch's; without it every sub-batch's activations are kept (no memory saved).

Cross-device negatives (``world_size > 1``, e.g. under ``msrun``): the passages' dense vectors of all
ranks are gathered with ``AllGather`` and ``L_dense`` is replaced by the InfoNCE over all of them
(targets shifted by ``rank * N``); sparse and ColBERT stay per device.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..model.heads import _EPS
from ..retrieval.modes import TEACHER_WEIGHTS
from .batch_scores import MaxSim, ProjectNormalize, batch_plan, lexical_scores, maxsim_scores, packed_heads
from .fused_loss import PARTS, fused_m3_loss
from .losses import dense_scores, in_batch_targets, info_nce, m3_loss

PART_NAMES = PARTS[:-1]          # m3_loss's parts but "total" (returned first, on its own)


def as_chunks(x) -> tuple:
    """Passage inputs as a tuple of length chunks: one padded matrix becomes a 1-tuple."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _host(x) -> np.ndarray:
    """An input (ids, masks, order: no computation waits behind it) as a NumPy array."""
    return x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)


def _cat(parts: list, axis: int):
    return parts[0] if len(parts) == 1 else ops.cat(parts, axis=axis)


class EncodeBlock(nn.Cell):
    """Hidden states (or ids) of one (sub-)batch -> (dense [B,H], sparse [B,L], colbert [B,L-1,D]); with
    ``raw=True`` the last hidden states [B, L, H] (float32) that the heads would take."""

    def __init__(self, encoder, heads, start_layer: int, freeze_layers: int, freeze_embeddings: bool,
                 special_ids=(0, 1, 2, 3), layer_recompute: bool = False, raw: bool = False):
        super().__init__(auto_prefix=False)      # keep the encoder's own parameter names
        self.encoder, self.heads = encoder, heads
        self.layer_recompute, self.raw = bool(layer_recompute), bool(raw)
        self.cfg = encoder.cfg
        self.start, self.frozen, self.freeze_embeddings = start_layer, freeze_layers, freeze_embeddings
        self.special_ids = tuple(int(s) for s in special_ids)

    def construct(self, ids, mask, pos, hidden):
        n = len(self.encoder.layers)
        bias = self.encoder.mask_bias(mask) if self.start < n else None      # no layer runs over cached final states
        if self.start == 0:
            x = self.encoder.embed(ids, pos)
            if self.freeze_embeddings:
                x = ops.stop_gradient(x)
        else:
            x = hidden
        if self.frozen > self.start:
            x = ops.stop_gradient(self.encoder.run_layers(x, bias, self.start, self.frozen))
        if self.layer_recompute:
            for i in range(max(self.start, self.frozen), n):
                x = ms.recompute(self.encoder.layers[i], x, bias)
        else:
            x = self.encoder.run_layers(x, bias, max(self.start, self.frozen), n)
        h = x if x.dtype == ms.float32 else x.astype(ms.float32)
        if self.raw:
            return h
        return self.heads.train_outputs(h, mask, ids, self.cfg.pooling, self.special_ids)


class M3TrainNet(nn.Cell):
    """Loss of one batch; ``construct`` returns ``(total, *parts)`` (parts in :data:`PART_NAMES` order,
    zeros for the distillation parts when ``use_self_distill=False``)."""

    def __init__(self, encoder, heads, start_layer: int = 0, freeze_layers: int = 0,
                 freeze_embeddings: bool = True, special_ids=(0, 1, 2, 3), sub_batch: int = 0,
                 recompute: bool | None = None, temperature: float = 0.02, teacher_weights=TEACHER_WEIGHTS,
                 lambdas=(1.0, 0.1, 1.0),
                 use_self_distill: bool = True, world_size: int = 1, rank: int = 0):
        super().__init__(auto_prefix=False)
        n = len(encoder.layers)
        if not 0 <= start_layer <= n or not start_layer <= max(start_layer, freeze_layers) <= n:
            raise ValueError(f"need 0 <= start_layer <= freeze_layers <= {n}, got {start_layer}, {freeze_layers}")
        if int(sub_batch) != sub_batch or sub_batch < 0:
            raise ValueError(f"sub_batch must be an integer >= 0 (0: no split), got {sub_batch!r}")
        self.sub_batch = int(sub_batch)
        self.recompute = self.sub_batch > 0 if recompute is None else bool(recompute)
        self.block = EncodeBlock(encoder, heads, start_layer, max(start_layer, freeze_layers),
                                 freeze_embeddings, special_ids, layer_recompute=self.recompute and not self.sub_batch,
                                 raw=True)
        self.maxsim = MaxSim()
        self.project = ProjectNormalize(input_grad=self.block.frozen < n)     # no layer trains: states are constant
        if self.recompute:
            for layer in encoder.layers[max(start_layer, freeze_layers):]:
                layer.attention.recompute_blocks = True
        self.temperature, self.teacher_weights, self.lambdas = temperature, tuple(teacher_weights), tuple(lambdas)
        self.use_self_distill = use_self_distill
        self.world_size, self.rank = int(world_size), int(rank)
        self.use_cpu_kernels = True      # False: the trainable layers as MindSpore ops even where the kernels run
        self.all_gather = ops.AllGather() if self.world_size > 1 else None

    def trainable_params(self) -> list:
        """Parameters the optimizer updates: the heads, the unfrozen top layers, embeddings if unfrozen."""
        b = self.block
        out = []
        if b.start == 0 and not b.freeze_embeddings and b.frozen == 0:   # frozen layers above cut their gradient
            out += list(b.encoder.embeddings.get_parameters())
        for i in range(b.frozen, len(b.encoder.layers)):
            out += list(b.encoder.layers[i].get_parameters())
        return out + list(b.heads.get_parameters())

    def encode(self, ids, mask, pos, hidden):
        """The last hidden states ``[R, L, H]`` (float32) of a (chunk of a) batch, which the heads take; in
        sub-batches of ``sub_batch`` rows when set, each through ``mindspore.recompute`` when ``recompute`` is on."""
        rows = ids.shape[0]
        if self.sub_batch <= 0:
            return self.block(ids, mask, pos, hidden)      # per-layer recompute inside, if on
        parts = []
        run = (lambda *a: ms.recompute(self.block, *a)) if self.recompute else self.block
        for s in range(0, rows, self.sub_batch):
            sl = slice(s, s + self.sub_batch)
            parts.append(run(ids[sl], mask[sl], pos[sl], None if hidden is None else hidden[sl]))
        return _cat(parts, 0)

    def packed_layers_ready(self, q_hidden) -> bool:
        """True when the layers above the hidden cache run as the fused training kernels on packed tokens
        (:func:`bgem3_lib.kernels.train.layer_train`): CPU, kernels built, float32, erf GELU, cached states as
        input (``q_hidden`` not None), at least one layer to run, no gradient checkpointing or sub-batches,
        ``use_cpu_kernels`` on."""
        return q_hidden is not None and self._kernel_layers()

    def _kernel_layers(self) -> bool:
        """The layers above a hidden cache can run on the fused training kernels (:meth:`packed_layers_ready`
        without the input check)."""
        b = self.block
        n = len(b.encoder.layers)
        if not (self.use_cpu_kernels and 0 < b.start < n and not self.recompute and not self.sub_batch
                and b.cfg.hidden_act == "gelu"
                and b.encoder.layers[b.start].attention.query.weight.dtype == ms.float32):
            return False
        from ..kernels import train as train_kernels
        return train_kernels.available()

    def takes_packed_states(self) -> bool:
        """True when ``construct`` can take the batch's cached states already packed (``packed_states [T, H]``:
        each text's rows, queries then passages, no padding; :meth:`TextStore.packed_states`): heads-only training
        (``start_layer`` = the number of layers), or the fused training kernels' layers (:meth:`packed_layers_ready`).
        The trainer then never builds the padded ``[R, L, H]`` states, which the net would only pack again."""
        b = self.block
        return b.start == len(b.encoder.layers) or self._kernel_layers()

    def head_ops(self) -> tuple:
        """(project, maxsim) for :func:`~bgem3_lib.training.batch_scores.packed_heads` and ``maxsim_scores``: the
        fused CPU kernels (``kernels.train.project_normalize_train``, ``maxsim_train``) where they run (CPU,
        float32 ColBERT head, ``use_cpu_kernels`` on), else the MindSpore cells ``project`` and ``maxsim``."""
        col = self.block.heads.colbert_linear
        if self.use_cpu_kernels and col.weight.dtype == ms.float32:
            from ..kernels import train as train_kernels
            if train_kernels.available():
                input_grad = self.project.input_grad
                return ((lambda x, w, b: train_kernels.project_normalize_train(x, w, b, _EPS, input_grad)),
                        train_kernels.maxsim_train)
        return self.project, self.maxsim

    @staticmethod
    def pack_states(hidden: list, plan) -> Tensor:
        """Padded cached states (queries', then each passage chunk's, ``[R, L, H]``) -> the batch's real tokens
        ``[T, H]`` float32 in ``plan`` order."""
        return ops.gather(_cat([h.reshape(-1, h.shape[-1]).astype(ms.float32) for h in hidden], 0), plan.rows, 0)

    def packed_layers(self, x: Tensor, plan) -> Tensor:
        """Packed states at the input of layer ``start`` (``[T, H]`` float32, ``plan`` order) -> the last layer's,
        through the fused kernels (layers below ``freeze_layers``, if any, under a ``stop_gradient``)."""
        from ..kernels import train as train_kernels
        b = self.block
        cfg = b.cfg
        train_kernels.begin_pass()
        for i in range(b.start, len(b.encoder.layers)):
            x = train_kernels.layer_train(x, b.encoder.layers[i], plan.offsets, cfg.num_attention_heads,
                                          cfg.layer_norm_eps)
            if i + 1 == b.frozen:
                x = ops.stop_gradient(x)
        return x

    def _given_packed(self, states, plan, q_hidden, p_hidden) -> Tensor:
        """``packed_states``, checked, -> the last layer's packed states (the given ones when no layer trains)."""
        if q_hidden is not None or any(h is not None for h in p_hidden):
            raise ValueError("give the cached states either padded (q_hidden, p_hidden) or packed, not both")
        if not self.takes_packed_states():
            raise ValueError("packed_states need heads-only training or the fused CPU training kernels' layers; "
                             "give padded q_hidden / p_hidden")
        want = (int(plan.rows.shape[0]), self.block.cfg.hidden_size)
        if tuple(states.shape) != want or states.dtype != ms.float32:
            raise ValueError(f"packed_states must be float32 {list(want)} (the batch's real tokens x hidden), "
                             f"got {states.dtype} {list(states.shape)}")
        return states if self.block.start == len(self.block.encoder.layers) else self.packed_layers(states, plan)

    def construct(self, q_ids, q_mask, q_pos, q_hidden, p_ids, p_mask, p_pos, p_hidden, p_order=None,
                  packed_states=None):
        """Queries ``[B, Lq]``; passages either one padded ``[N, Lp]`` matrix or tuples of length chunks
        (``[N_c, L_c]`` each, see :func:`~bgem3_lib.training.bucketing.length_chunks`) with ``p_order [N]``: the row
        of each original passage in the chunks' concatenation. Cached states come padded (``q_hidden``,
        ``p_hidden``) or, where :meth:`takes_packed_states`, as ``packed_states [T, H]`` float32 (hiddens None; ids
        and masks still give the positions, and the masks must be each text's first ``len`` positions)."""
        p_ids, p_mask, p_pos, p_hidden = (as_chunks(x) for x in (p_ids, p_mask, p_pos, p_hidden))
        b, n = q_ids.shape[0], sum(x.shape[0] for x in p_ids)
        if n % b:
            raise ValueError(f"{n} passages for {b} queries: every query needs the same group size")
        if p_order is not None and tuple(p_order.shape) != (n,):
            raise ValueError(f"p_order must have shape ({n},), got {tuple(p_order.shape)}")
        plan = batch_plan(_host(q_ids), _host(q_mask), [_host(x) for x in p_ids], [_host(x) for x in p_mask],
                          self.block.special_ids, None if p_order is None else _host(p_order))
        if packed_states is not None:
            packed = self._given_packed(packed_states, plan, q_hidden, p_hidden)
        elif self.packed_layers_ready(q_hidden):
            packed = self.packed_layers(self.pack_states([q_hidden, *p_hidden], plan), plan)
        else:
            states = [self.encode(q_ids, q_mask, q_pos, q_hidden)]
            states += [self.encode(*chunk) for chunk in zip(p_ids, p_mask, p_pos, p_hidden)]
            flat = _cat([h.reshape(-1, h.shape[-1]) for h in states], 0)
            if self.block.frozen == len(self.block.encoder.layers):     # no layer trains: no gradient to the states
                flat = ops.stop_gradient(flat)
            packed = ops.gather(flat, plan.rows, 0)
        project, maxsim = self.head_ops()
        dense, weights, colbert = packed_heads(self.block.heads, project, packed, plan, self.block.cfg.pooling)
        q_dense, p_dense = dense[:b], dense[b:]
        s_lex, s_mul = lexical_scores(weights, plan), maxsim_scores(maxsim, colbert, plan)
        target = in_batch_targets(b, n // b)
        s_dense = dense_scores(q_dense, p_dense)
        if self.use_cpu_kernels and ms.get_context("device_target") == "CPU":   # two host ops instead of ~100
            out = fused_m3_loss(s_dense, s_lex, s_mul, target, self.teacher_weights, self.temperature, self.lambdas,
                                self.use_self_distill)
        else:
            out = m3_loss(s_dense, s_lex, s_mul, target, weights=self.teacher_weights,
                          temperature=self.temperature, use_self_distill=self.use_self_distill, lambdas=self.lambdas)
        total = out["total"]
        if self.all_gather is not None:
            every = self.all_gather(p_dense)                                   # [world * N, H]
            shift = Tensor(np.arange(b, dtype=np.int32) * (n // b) + self.rank * n)
            global_dense = info_nce(dense_scores(q_dense, every), shift, self.temperature)
            swap = self.lambdas[0] * (global_dense - out["dense"]) / 4
            total = total + (swap / 2 if self.use_self_distill else swap)
            out["dense"] = global_dense
        zero = ops.zeros((), total.dtype)
        return (total, *(out.get(k, zero) for k in PART_NAMES))


class TextStore:
    """Token ids of every text (and optionally hidden states cached at ``start_layer``).

    ``ids``: list of 1-D int arrays; ``hidden``: callable ``i -> [len_i, H]`` array or None.
    ``batch(idx)`` -> ``(ids [B, L] int32, mask [B, L] int32, hidden [B, L, H] float32 or None)``;
    ``packed_states(idx)`` -> ``[T, H]`` float32: the texts' states one after another, no padding (T = their lengths).

    >>> store = TextStore([[0, 5, 2], [0, 2]], hidden=lambda i: np.full((3 - i, 1), i, np.float16))
    >>> ids, mask, hid = store.batch([0, 1])
    >>> ids.tolist(), hid[:, :, 0].tolist(), store.packed_states([0, 1])[:, 0].tolist()
    ([[0, 5, 2], [0, 2, 1]], [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], [0.0, 0.0, 0.0, 1.0, 1.0])
    """

    def __init__(self, ids: list, pad_id: int = 1, hidden=None):
        if not ids:
            raise ValueError("TextStore needs at least one text")
        self.ids = [np.asarray(x, dtype=np.int32) for x in ids]
        if any(x.ndim != 1 or x.size < 2 for x in self.ids):
            raise ValueError("every text needs a 1-D id array of >= 2 tokens (<s> ... </s>)")
        self.pad_id, self.hidden = int(pad_id), hidden

    def __len__(self) -> int:
        return len(self.ids)

    def length(self, i: int) -> int:
        return int(self.ids[i].size)

    def _states(self, idx) -> list:
        states = [np.asarray(self.hidden(i)) for i in idx]
        for i, h in zip(idx, states):
            if h.ndim != 2 or h.shape[0] != self.length(i):
                raise ValueError(f"hidden states of text {i} have shape {h.shape}, want ({self.length(i)}, H)")
        return states

    def packed_states(self, idx) -> np.ndarray:
        if self.hidden is None:
            raise ValueError("this TextStore has no hidden states")
        states = self._states(idx)
        flat = np.concatenate(states)
        if flat.dtype == np.float16:
            from ..kernels.train import widen_half
            return widen_half(flat)                            # exact; 5x NumPy's cast
        return flat.astype(np.float32, copy=False)

    def batch(self, idx, with_states: bool = True):
        """Padded ids, mask and (``with_states`` and a cache) hidden states of the texts ``idx``."""
        L = max(self.length(i) for i in idx)
        ids = np.full((len(idx), L), self.pad_id, np.int32)
        mask = np.zeros((len(idx), L), np.int32)
        hid = None
        for r, i in enumerate(idx):
            ids[r, : self.length(i)], mask[r, : self.length(i)] = self.ids[i], 1
        if self.hidden is not None and with_states:
            states = self._states(idx)
            half = all(h.dtype == np.float16 for h in states)     # the cache's dtype: padded in it, widened once
            hid = np.zeros((len(idx), L, states[0].shape[-1]), np.float16 if half else np.float32)
            for r, h in enumerate(states):
                hid[r, : h.shape[0]] = h
            if half:
                from ..kernels.train import widen_half
                hid = widen_half(hid)                          # exact; 5x NumPy's cast
        return ids, mask, hid
