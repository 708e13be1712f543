"""MCLS (multiple CLS, M3-Embedding paper, long-document section): a dense embedding for long texts
without fine-tuning.

A CLS token is inserted every ``every`` positions, so each CLS summarises its own window of text;
the embedding is the average of the final hidden states of all CLS tokens, L2-normalised::

    plain:  <s> t1 t2 ... tk </s>
    MCLS:   <s> t1 .. t255 <s> t256 .. t510 <s> t511 ... tk </s>      (every = 256)

CLS sits at positions ``0, every, 2*every, ...``; a text shorter than ``every`` tokens gets no extra CLS,
so MCLS equals the plain CLS embedding there. Position ids come from the model's own convention
(:func:`bgem3_lib.model.encoder.position_ids_for`: ``0..L-1`` for BERT, non-pad count from ``pad_id + 1`` for
XLM-R), treating the inserted CLS tokens as ordinary positions; the whole sequence, inserted tokens
included, must fit ``max_length`` (text tokens beyond are cut).

``segment_pooling="cls"`` is the paper's method (BGE-M3 pools CLS). For a mean-pooling model such as
multilingual-e5 (``m3-small``) the CLS state is not what it was trained to embed with, so
``segment_pooling="mean"`` averages, per window, the mean of its tokens (the window's CLS included) and
then averages the windows: the same multiple-summary idea in that model's own pooling; it equals the
plain mean-pooled embedding for texts shorter than ``every``.

>>> mcls_positions(600, 256)
[0, 256, 512]
"""
from __future__ import annotations

import sys

import mindspore as ms
import numpy as np

from .encoder import encoder_inputs
from .heads import l2_normalize
from .tokenization import check_texts


def mcls_positions(length: int, every: int = 256) -> list[int]:
    """CLS positions in an MCLS sequence of ``length`` tokens: ``0, every, 2*every, ... < length``."""
    if every < 2:
        raise ValueError(f"every must be >= 2, got {every}")
    return list(range(0, length, every))


def insert_cls(ids: list[int], cls_id: int, eos_id: int, every: int, max_length: int) -> tuple[list[int], list[int]]:
    """Plain ``<s> body </s>`` ids -> (MCLS ids, CLS positions), truncating the body to fit ``max_length``.

    >>> insert_cls([0, 5, 6, 7, 8, 2], cls_id=0, eos_id=2, every=3, max_length=16)
    ([0, 5, 6, 0, 7, 8, 2], [0, 3])
    """
    if len(ids) < 2 or ids[0] != cls_id or ids[-1] != eos_id:
        raise ValueError("expected token ids of the form <s> ... </s>")
    body, out = list(ids[1:-1]), []
    for tok in body:
        if len(out) % every == 0:
            out.append(cls_id)
        out.append(tok)
        if len(out) + 1 >= max_length:        # room for </s>
            break
    if not out:
        out = [cls_id]
    if len(out) >= max_length:
        out = out[: max_length - 1]
    if len(out) > 1 and out[-1] == cls_id:      # an inserted CLS with no text after it
        out.pop()
    out.append(eos_id)
    return out, [p for p in mcls_positions(len(out), every) if out[p] == cls_id and p < len(out) - 1]


def _pool(hidden: np.ndarray, length: int, cls_pos: list[int], every: int, segment_pooling: str) -> np.ndarray:
    if segment_pooling == "cls":
        return hidden[cls_pos].mean(0)
    windows = [hidden[p:min(p + every, length)].mean(0) for p in cls_pos]
    if len(cls_pos) == 1:
        return hidden[:length].mean(0)
    return np.mean(windows, axis=0)


def mcls_dense_embedding(model, texts, max_length: int | None = None, every: int = 256,
                         batch_size: int = 8, segment_pooling: str = "cls") -> np.ndarray:
    """``[N, H]`` MCLS embeddings of ``texts`` with ``model`` (a :class:`~bgem3_lib.model.bgem3.BGEM3`).

    No prefix is added: pass ``model.passage_instruction + text`` for e5-style models.
    """
    texts = check_texts(texts)
    if segment_pooling not in ("cls", "mean"):
        raise ValueError(f"segment_pooling must be 'cls' or 'mean', got {segment_pooling!r}")
    cfg = model.config
    max_length = max_length or cfg.max_length
    if max_length > cfg.max_length:
        raise ValueError(f"max_length={max_length} exceeds the model's position table ({cfg.max_length})")
    if not 2 <= every <= max_length:
        raise ValueError(f"every must lie in [2, max_length={max_length}], got {every}")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty: nothing to embed")
    plain = model.tokenizer.encode_ids(texts, sys.maxsize, warn=False)
    seqs = [insert_cls(x, cfg.bos_token_id, cfg.eos_token_id, every, max_length) for x in plain]
    out = np.zeros((len(texts), cfg.hidden_size), np.float32)
    order = np.argsort([-len(s[0]) for s in seqs], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = model.tokenizer.pad([seqs[i][0] for i in idx])
        hidden = model.encoder(*encoder_inputs(ids, mask, cfg)).astype(ms.float32).asnumpy()
        for r, i in enumerate(idx):
            out[i] = _pool(hidden[r], len(seqs[i][0]), seqs[i][1], every, segment_pooling)
    return l2_normalize(out) if model.normalize_embeddings else out
