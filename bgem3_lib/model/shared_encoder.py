"""One encoder pass for several models that share an encoder, each with its own heads.

M3-small and its ablation ``m3-small-nosd`` are the same frozen e5-small encoder under two sets of
trained heads: encoding a corpus with both runs the identical encoder twice on identical batches.
Inside ``with shared_encoder_pass(models):`` every model's ``encode`` takes the encoder output of a
padded batch from a memo keyed by that batch (its token ids and mask, byte for byte): the first model to
encode a batch runs the encoder, the others read what it produced and only apply their heads. The
models must have the same encoder weights, conventions and backend (checked), so each model's vectors
are exactly those it computes alone. The memo keeps at most ``max_bytes`` of hidden states (the oldest
batch goes first) and is emptied on exit.

>>> a, b = BGEM3(tiny_dir), BGEM3(tiny_dir_other_heads)                     # doctest: +SKIP
>>> with shared_encoder_pass([a, b]):                                       # doctest: +SKIP
...     ea = a.encode_corpus(texts, return_sparse=True)                     # runs the encoder
...     eb = b.encode_corpus(texts, return_sparse=True)                     # heads only
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from .fingerprint import model_fingerprint


@contextmanager
def shared_encoder_pass(models: Sequence, max_bytes: int = 2 << 30) -> Iterator[dict]:
    """Let ``models`` (>= 1 ``BGEM3`` with one encoder) share each batch's encoder output; yields counters
    ``{"encoder": batches run, "shared": batches read from the memo}``."""
    models = list(models)
    if not models:
        raise ValueError("shared_encoder_pass needs at least one model")
    encoders = {model_fingerprint(m, heads=False) for m in models}
    backends = {m.backend for m in models}
    if len(encoders) != 1 or len(backends) != 1:
        raise ValueError(f"shared_encoder_pass needs models with one encoder: got {len(encoders)} different "
                         f"encoder weights/conventions and backends {sorted(backends)}")
    if any(getattr(m, "_encoder_pass", None) is not None for m in models):
        raise RuntimeError("a model is already inside a shared_encoder_pass")
    forward = models[0].encoder.forward_packed
    memo: OrderedDict = OrderedDict()
    held = 0
    counts = {"encoder": 0, "shared": 0}

    def encoder_pass(input_ids: np.ndarray, mask: np.ndarray):
        nonlocal held
        key = (input_ids.shape, np.ascontiguousarray(input_ids).tobytes(), np.ascontiguousarray(mask).tobytes())
        if key in memo:
            memo.move_to_end(key)
            counts["shared"] += 1
            return memo[key]
        out = forward(input_ids, mask)
        counts["encoder"] += 1
        memo[key] = out
        held += int(np.prod(out[0].shape)) * 4
        while held > max_bytes and len(memo) > 1:
            _, (old, _) = memo.popitem(last=False)
            held -= int(np.prod(old.shape)) * 4
        return out

    for m in models:
        m._encoder_pass = encoder_pass
    try:
        yield counts
    finally:
        for m in models:
            m._encoder_pass = None
        memo.clear()
