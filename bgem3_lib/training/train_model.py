"""``M3TrainNet``: encoder (whole, or its top layers over cached states) + heads -> unified loss.

A batch holds ``B`` queries and ``N = B * G`` passages (each query's positive, then its ``G - 1`` hard
negatives). Each text becomes, as in inference (:mod:`bgem3_lib.model.heads`) but kept differentiable
(:meth:`~bgem3_lib.model.heads.M3Heads.train_outputs`):

* dense   ``[B, H]``    pooled (CLS or masked mean, per config) and L2-normalised,
* sparse  ``[B, L]``    ``relu(sparse_linear(h))``, zero at padding and special tokens,
* colbert ``[B, L-1, D]`` ``colbert_linear(h[:, 1:])``, L2-normalised, zero at padding;

then :func:`bgem3_lib.training.losses.m3_loss` scores every query against every passage of the batch.

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

from ..retrieval.modes import TEACHER_WEIGHTS
from .losses import colbert_scores, dense_scores, in_batch_targets, info_nce, m3_loss, sparse_scores

PART_NAMES = ("dense", "lex", "mul", "inter", "L", "distill_dense", "distill_lex", "distill_mul", "L_distill")


def as_chunks(x) -> tuple:
    """Passage inputs as a tuple of length chunks: one padded matrix becomes a 1-tuple."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _cat(parts: list, axis: int):
    return parts[0] if len(parts) == 1 else ops.cat(parts, axis=axis)


class EncodeBlock(nn.Cell):
    """Hidden states (or ids) of one (sub-)batch -> (dense [B,H], sparse [B,L], colbert [B,L-1,D])."""

    def __init__(self, encoder, heads, start_layer: int, freeze_layers: int, freeze_embeddings: bool,
                 special_ids=(0, 1, 2, 3), layer_recompute: bool = False):
        super().__init__(auto_prefix=False)      # keep the encoder's own parameter names
        self.encoder, self.heads = encoder, heads
        self.layer_recompute = bool(layer_recompute)
        self.cfg = encoder.cfg
        self.start, self.frozen, self.freeze_embeddings = start_layer, freeze_layers, freeze_embeddings
        self.special_ids = tuple(int(s) for s in special_ids)

    def construct(self, ids, mask, pos, hidden):
        bias = self.encoder.mask_bias(mask)
        n = len(self.encoder.layers)
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
            h = x.astype(ms.float32)
        else:
            h = self.encoder.run_layers(x, bias, max(self.start, self.frozen), n).astype(ms.float32)
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
                                 freeze_embeddings, special_ids, layer_recompute=self.recompute and not self.sub_batch)
        if self.recompute:
            for layer in encoder.layers[max(start_layer, freeze_layers):]:
                layer.attention.recompute_blocks = True
        self.temperature, self.teacher_weights, self.lambdas = temperature, tuple(teacher_weights), tuple(lambdas)
        self.use_self_distill = use_self_distill
        self.world_size, self.rank = int(world_size), int(rank)
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
        """All texts of a batch -> (dense [B, H], sparse [B, L], colbert [B, L-1, D]); in sub-batches of
        ``sub_batch`` rows when set, each through ``mindspore.recompute`` when ``recompute`` is on."""
        rows = ids.shape[0]
        if self.sub_batch <= 0:
            return self.block(ids, mask, pos, hidden)      # per-layer recompute inside, if on
        parts = []
        run = (lambda *a: ms.recompute(self.block, *a)) if self.recompute else self.block
        for s in range(0, rows, self.sub_batch):
            sl = slice(s, s + self.sub_batch)
            parts.append(run(ids[sl], mask[sl], pos[sl], None if hidden is None else hidden[sl]))
        if len(parts) == 1:
            return parts[0]
        return tuple(ops.cat([p[k] for p in parts], axis=0) for k in range(3))

    def construct(self, q_ids, q_mask, q_pos, q_hidden, p_ids, p_mask, p_pos, p_hidden, p_order=None):
        """Queries ``[B, Lq]``; passages either one padded ``[N, Lp]`` matrix or tuples of length chunks
        (``[N_c, L_c]`` each, see :func:`~bgem3_lib.training.bucketing.length_chunks`) with ``p_order [N]``: the row
        of each original passage in the chunks' concatenation."""
        p_ids, p_mask, p_pos, p_hidden = (as_chunks(x) for x in (p_ids, p_mask, p_pos, p_hidden))
        b, n = q_ids.shape[0], sum(x.shape[0] for x in p_ids)
        if n % b:
            raise ValueError(f"{n} passages for {b} queries: every query needs the same group size")
        if p_order is not None and tuple(p_order.shape) != (n,):
            raise ValueError(f"p_order must have shape ({n},), got {tuple(p_order.shape)}")
        q_dense, q_sparse, q_col = self.encode(q_ids, q_mask, q_pos, q_hidden)
        dense, lex, mul = [], [], []
        for ids, mask, pos, hidden in zip(p_ids, p_mask, p_pos, p_hidden):
            p_dense, p_sparse, p_col = self.encode(ids, mask, pos, hidden)
            dense.append(p_dense)
            lex.append(sparse_scores(q_sparse, q_ids, p_sparse, ids))
            mul.append(colbert_scores(q_col, q_mask[:, 1:], p_col, mask[:, 1:]))
        p_dense, s_lex, s_mul = _cat(dense, 0), _cat(lex, 1), _cat(mul, 1)
        if p_order is not None:
            p_dense, s_lex, s_mul = p_dense[p_order], s_lex[:, p_order], s_mul[:, p_order]
        target = in_batch_targets(b, n // b)
        s_dense = dense_scores(q_dense, p_dense)
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
    ``batch(idx)`` -> ``(ids [B, L] int32, mask [B, L] int32, hidden [B, L, H] float32 or None)``.
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

    def batch(self, idx):
        L = max(self.length(i) for i in idx)
        ids = np.full((len(idx), L), self.pad_id, np.int32)
        mask = np.zeros((len(idx), L), np.int32)
        hid = None
        for r, i in enumerate(idx):
            ids[r, : self.length(i)], mask[r, : self.length(i)] = self.ids[i], 1
        if self.hidden is not None:
            first = np.asarray(self.hidden(idx[0]))
            hid = np.zeros((len(idx), L, first.shape[-1]), np.float32)
            for r, i in enumerate(idx):
                h = np.asarray(self.hidden(i), dtype=np.float32)
                assert h.shape[0] == self.length(i), (h.shape, self.length(i))
                hid[r, : h.shape[0]] = h
        return ids, mask, hid
