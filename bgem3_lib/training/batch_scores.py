"""A training batch's heads and scores on its packed tokens, written for MindSpore's CPU kernels.

:class:`~bgem3_lib.training.train_model.M3TrainNet` computes the numbers of
:meth:`~bgem3_lib.model.heads.M3Heads.train_outputs`, :func:`~bgem3_lib.training.losses.sparse_scores` and
:func:`~bgem3_lib.training.losses.colbert_scores` (up to float32 summation order) here, because on CPU those
padded formulas took nearly all of a heads-only training step with M3-small's batch (measured, forward +
backward: heads 0.18 s, ColBERT scores 0.13 s, lexical scores 0.08 s of 0.39 s), mostly in broadcasting
element-wise kernels over ``[B, L, H]`` and ``[B, Lq, N, Lp]`` tensors, which MindSpore 2.7 runs ~5x slower than
the same op on equal shapes, once per length chunk.

Token ids and masks are inputs, so everything about positions is worked out on the host, once per step
(:func:`batch_plan`):

* packing: the real (attended) tokens of the queries and then of the passages, in passage order (the length
  chunks and their ``order`` undone), one row each: the heads run once on ``[T, H]`` (:func:`packed_heads`),
  padding never computed; the ColBERT projection and its normalisation are one cell (:class:`ProjectNormalize`)
  whose backward is written out with multiplications and matmuls (MindSpore's CPU ``Div`` and ``BiasAddGrad``
  kernels are slow; autograd used three big divisions there); where the fused CPU training kernels run,
  :class:`~bgem3_lib.training.train_model.M3TrainNet` takes ``kernels.train.project_normalize_train`` instead
  (the same numbers in two kernels, forward and backward);
* lexical matching (:func:`lexical_scores`): per text and distinct id (a "group"; special tokens left out, and
  only ids found on the other side) the weights of its positions are gathered into a row and max-pooled
  (``ArgMaxWithValue``: the first position of the maximum gets the gradient, as in the padded formula); each
  (query group, passage group) pair with one id adds ``u_q * u_p`` to its cell (``unsorted_segment_sum``);
* MaxSim (:class:`MaxSim`): the passages' ColBERT rows gathered into ``[N, Lmax]`` slots (a passage's
  unused slots repeat its first token after CLS, so they never change a maximum nor win its arg-max), one
  matmul against every query token, ``ArgMaxWithValue`` over each passage's slots; the backward is written
  out: the gradient scattered onto the arg-max tokens, two matmuls. With the CPU kernels,
  ``kernels.train.maxsim_train`` on the passages' row spans (``BatchPlan.spans``) instead: one product per
  passage, and a backward that touches only the arg-max rows (no ``[Tq, T]`` gradient matrix).

>>> import numpy as np
>>> plan = batch_plan(np.array([[0, 7, 9, 2]]), np.array([[1, 1, 1, 1]]), [np.array([[0, 9, 3, 7, 7]])],
...                   [np.array([[1, 1, 1, 1, 0]])], special_ids=(0, 1, 2, 3))
>>> w = np.array([0.0, 0.5, 0.2, 0.0, 0.0, 0.4, 1.0, 0.3], np.float32)     # the 8 packed tokens' weights
>>> round(float(lexical_scores(Tensor(w), plan).asnumpy()[0, 0]), 6)
0.23

(0.5 * 0.3 for id 7, whose second occurrence is padding, plus 0.2 * 0.4 for id 9.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn, ops

from ..model.heads import _EPS, _normalize_ms

SENTINEL = -1e30     # the weight read by a group row's unused entries: never the maximum


@dataclass
class BatchPlan:
    """Index arrays of one batch (:func:`batch_plan`); ``T`` packed tokens, ``B`` queries, ``N`` passages."""
    shape: tuple                   # (B, N)
    rows: Tensor                   # [T] int32: each packed token's row in the flat concatenation of the inputs
    first: Tensor                  # [B + N] int32: the packed row of each text's CLS (queries, then passages)
    text: Tensor                   # [T] int32: the text of each packed token (for mean pooling)
    lengths: Tensor                # [B + N, 1] float32: tokens per text
    n_query_tokens: int            # Tq: the queries' tokens are packed rows 0 .. Tq-1
    query_tokens: Tensor           # [B, Tq] float32: 1 at each query's tokens after CLS, else 0
    query_counts: Tensor           # [B, 1] float32: their number
    slots: Tensor                  # [N, Lmax] int32: the packed rows of each passage's tokens after CLS
    spans: Tensor                  # [N, 2] int32: those rows as (first, count) (the CPU kernels' MaxSim)
    groups: Tensor | None          # [S, K] int32: each lexical group's packed rows (padded with T: the sentinel)
    left: Tensor | None            # [P] int32: the query group of each matching pair
    right: Tensor | None           # [P] int32: its passage group
    cell: Tensor | None            # [P] int32: b * N + n, the pair's score
    offsets: np.ndarray | None = None   # [B + N + 1] int32 (host): text t is packed rows offsets[t]:offsets[t+1]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + c)`` over ``zip(starts, counts)``, without a Python loop.

    >>> _ranges(np.array([5, 0]), np.array([2, 3])).tolist()
    [5, 6, 0, 1, 2]
    """
    total = int(counts.sum())
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(total)


def _groups(ids: np.ndarray, text: np.ndarray, keep: np.ndarray, shared: np.ndarray):
    """(text, id) groups of the packed tokens kept and with an id in ``shared``: (text [S], id [S], the packed rows
    of every group one after another, [S] sizes), ordered by text, then id; rows ascending within a group."""
    rows = np.nonzero(keep & np.isin(ids, shared))[0]
    order = np.lexsort((rows, ids[rows], text[rows]))
    rows = rows[order]
    tok, txt = ids[rows], text[rows]
    start = np.r_[True, (txt[1:] != txt[:-1]) | (tok[1:] != tok[:-1])] if rows.size else np.zeros(0, bool)
    bounds = np.r_[np.nonzero(start)[0], rows.size]
    return txt[bounds[:-1]], tok[bounds[:-1]], rows, np.diff(bounds)


def _lexical(ids, text, keep, b: int, n: int):
    """The lexical part of :class:`BatchPlan`: (groups, left, right, cell) Tensors, or Nones."""
    is_q = text < b
    shared = np.intersect1d(ids[keep & is_q], ids[keep & ~is_q])
    if shared.size == 0:
        return None, None, None, None
    q_text, q_id, q_rows, q_size = _groups(ids, text, keep & is_q, shared)
    p_text, p_id, p_rows, p_size = _groups(ids, text, keep & ~is_q, shared)
    sizes = np.r_[q_size, p_size]
    groups = np.full((sizes.size, int(sizes.max())), ids.size, np.int32)
    groups[np.repeat(np.arange(sizes.size), sizes), _ranges(np.zeros_like(sizes), sizes)] = np.r_[q_rows, p_rows]
    p_sort = np.argsort(p_id, kind="stable")        # a sort-merge join of the two sides' groups on the id
    lo, hi = np.searchsorted(p_id[p_sort], q_id, "left"), np.searchsorted(p_id[p_sort], q_id, "right")
    left = np.repeat(np.arange(q_id.size), hi - lo)
    right = p_sort[_ranges(lo, hi - lo)]
    cell = q_text[left] * n + (p_text[right] - b)
    order = np.lexsort((left, cell))                 # each score's terms in the order of its query's tokens
    return (Tensor(groups), *(Tensor(x[order].astype(np.int32)) for x in (left, right + q_id.size, cell)))


def batch_plan(q_ids, q_mask, p_ids, p_mask, special_ids=(0, 1, 2, 3), order=None) -> BatchPlan:
    """The host-side plan of a batch from NumPy ids and 0/1 masks: queries ``[B, Lq]``, passages as a list of
    length chunks ``[N_c, L_c]``; ``order [N]`` (optional): the row of passage ``j`` in the chunks'
    concatenation. Flat rows number the queries' ``[B * Lq]`` positions, then each chunk's ``[N_c * L_c]``.
    Raises ``ValueError`` when a text has no token after CLS."""
    flat_rows, flat_ids, counts, offset = [], [], [], 0
    for ids, mask in [(q_ids, q_mask), *zip(p_ids, p_mask)]:
        ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
        if not mask[:, 0].all():
            raise ValueError("every query and passage must start with an attended CLS token (mask[:, 0] = 1)")
        if not mask[:, 1:].any(axis=1).all():
            raise ValueError("every query and passage needs at least one valid token in its mask")
        r, c = np.nonzero(mask)                                      # row-major: each text's tokens in order
        flat_rows.append(offset + r * ids.shape[1] + c)
        flat_ids.append(ids[r, c])
        counts.append(mask.sum(axis=1))
        offset += ids.size
    b = np.asarray(q_ids).shape[0]
    counts = np.concatenate(counts)
    n = counts.size - b
    texts = np.arange(b + n) if order is None else np.r_[np.arange(b), b + np.asarray(order, np.int64)]
    lengths = counts[texts]
    take = _ranges((np.cumsum(counts) - counts)[texts], lengths)      # the texts' tokens, in the batch's order
    rows, ids = np.concatenate(flat_rows)[take], np.concatenate(flat_ids)[take]
    text = np.repeat(np.arange(b + n), lengths)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    tq = int(lengths[:b].sum())
    query_tokens = np.zeros((b, tq), np.float32)
    query_tokens[text[:tq], np.arange(tq)] = 1.0
    query_tokens[np.arange(b), first[:b]] = 0.0                      # not the CLS
    width = int(lengths[b:].max()) - 1
    k = np.arange(width)
    slots = first[b:, None] + 1 + np.where(k < lengths[b:, None] - 1, k, 0)   # unused slots: the first after CLS
    keep = ~np.isin(ids, np.asarray(special_ids))                    # (every packed token is attended)
    lexical = _lexical(ids, text, keep, b, n)
    as_i = lambda a: Tensor(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
    return BatchPlan((b, n), as_i(rows), as_i(first), as_i(text), Tensor(lengths[:, None].astype(np.float32)),
                     tq, Tensor(query_tokens), Tensor((lengths[:b, None] - 1).astype(np.float32)), as_i(slots),
                     as_i(np.stack([first[b:] + 1, lengths[b:] - 1], 1)),
                     *lexical, offsets=np.r_[0, np.cumsum(lengths)].astype(np.int32))


def lexical_scores(weights, plan: BatchPlan):
    """``[B, N]`` lexical scores from the packed tokens' non-negative weights ``[T]`` (those of special tokens
    are not read)."""
    b, n = plan.shape
    if plan.groups is None:
        return ops.zeros((b, n), weights.dtype)
    flat = ops.cat([weights, ops.full((1,), SENTINEL, dtype=weights.dtype)])
    _, pooled = ops.ArgMaxWithValue(axis=1)(ops.gather(flat, plan.groups, 0))     # [S]: each group's max weight
    terms = ops.gather(pooled, plan.left, 0) * ops.gather(pooled, plan.right, 0)
    return ops.unsorted_segment_sum(terms, plan.cell, b * n).reshape(b, n)


class MaxSim(nn.Cell):
    """``(q [Tq, D], p [T, D], slots [N, Lmax]) -> (best [Tq, N], arg [Tq, N])``: for each query token and passage,
    the largest ``<q_t, p_r>`` over the passage's rows ``r = slots[n, :]``, and the slot where it is. The gradient
    reaches ``q`` and ``p`` through ``best`` only, at the arg-max rows."""

    def __init__(self):
        super().__init__()
        self.scores = ops.MatMul(transpose_b=True)
        self.back_p = ops.MatMul(transpose_a=True)
        self.argmax = ops.ArgMaxWithValue(axis=-1)

    def construct(self, q, p, slots):
        n, width = slots.shape
        sim = self.scores(q, ops.gather(p, slots.reshape(-1), 0))                    # [Tq, N * Lmax]
        arg, best = self.argmax(sim.reshape(q.shape[0], n, width))
        return best, arg

    def bprop(self, q, p, slots, out, dout):
        n, width = slots.shape
        flat = out[1] + ops.tile(ops.arange(0, n * width, width, dtype=out[1].dtype)[None], (q.shape[0], 1))
        rows = ops.gather(slots.reshape(-1), flat.reshape(-1), 0).reshape(q.shape[0], n)
        dsim = ops.tensor_scatter_elements(ops.zeros((q.shape[0], p.shape[0]), dout[0].dtype), rows, dout[0], axis=1)
        return ops.matmul(dsim, p), self.back_p(dsim, q), ops.zeros_like(slots)


def maxsim_scores(maxsim, colbert, plan: BatchPlan):
    """ColBERT scores ``[B, N]`` from the packed tokens' normalised ColBERT vectors ``[T, D]``: per query and
    passage, the mean over the query's tokens after CLS of the best match among the passage's tokens after CLS.
    ``maxsim``: a :class:`MaxSim` cell, or the CPU kernel (``kernels.train.maxsim_train``, on ``plan.spans``)."""
    q = colbert[: plan.n_query_tokens]
    best = maxsim(q, colbert, plan.slots)[0] if isinstance(maxsim, MaxSim) else maxsim(q, colbert, plan.spans)
    return ops.matmul(plan.query_tokens, best) / plan.query_counts


class ProjectNormalize(nn.Cell):
    """``(x [T, H], weight [D, H], bias [D]) -> (y [T, D], ||z|| [T, 1])``: ``z = x weight^T + bias``, each row
    divided by ``max(||z||, 1e-12)`` (the forward of ``_normalize_ms(nn.Dense(x))``). Backward:
    ``dz = (g - y <g, y>) / n`` (no projection where ``||z|| < 1e-12``), taken as a product with ``1 / n``;
    ``d bias`` as a matmul with ones; ``dx`` only with ``input_grad`` (else zeros: the states are constants)."""

    def __init__(self, input_grad: bool = True):
        super().__init__()
        self.input_grad = bool(input_grad)
        self.project = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()
        self.divide = ops.RealDiv()          # the quotients of ``/`` (ops.Div), ~4x faster on CPU (measured)
        self.back_w = ops.MatMul(transpose_a=True)

    def construct(self, x, weight, bias):
        z = self.bias_add(self.project(x, weight), bias)
        raw = ops.sqrt(ops.square(z).sum(-1, keepdims=True))
        norm = ops.maximum(raw, ops.full((), _EPS, dtype=z.dtype))
        return self.divide(z, ops.tile(norm, (1, z.shape[1]))), raw

    def bprop(self, x, weight, bias, out, dout):
        y, raw, g = out[0], out[1], dout[0]
        d = y.shape[1]
        inv = 1.0 / ops.maximum(raw, ops.full((), _EPS, dtype=y.dtype))
        along = (g * y).sum(-1, keepdims=True) * (raw >= _EPS).astype(y.dtype)
        dz = (g - y * ops.tile(along, (1, d))) * ops.tile(inv, (1, d))
        dx = ops.matmul(dz, weight) if self.input_grad else ops.zeros_like(x)
        dbias = ops.matmul(ops.ones((1, x.shape[0]), dz.dtype), dz).reshape(d)
        return dx, self.back_w(dz, x), dbias


def packed_heads(heads, project, packed, plan: BatchPlan, pooling: str):
    """:meth:`~bgem3_lib.model.heads.M3Heads.train_outputs` on the packed tokens ``[T, H]`` (float32) ->
    dense ``[B + N, H]`` (normalised; queries, then passages), sparse ``[T]`` (ReLU weights, special tokens
    included), colbert ``[T, D]`` (every token, CLS included, normalised). ``project``: a
    :class:`ProjectNormalize` cell or a function of the same arguments and outputs (the CPU kernel)."""
    if pooling == "mean":
        dense = ops.unsorted_segment_sum(packed, plan.text, plan.lengths.shape[0]) / plan.lengths
    else:
        dense = ops.gather(packed, plan.first, 0)
    sparse = ops.relu(heads.sparse_linear(packed)).reshape(-1)
    col = heads.colbert_linear
    return _normalize_ms(dense), sparse, project(packed, col.weight, col.bias)[0]
