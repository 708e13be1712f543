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

One implementation, on the packed inference path (``encoder.forward_packed``: padding costs nothing):
:func:`mcls_dense_embedding` lays every text out once for a given ``every`` (:func:`mcls_layout`),
encodes it once and pools it in each requested way (:func:`mcls_pool`). With ``every >= max_length``
no CLS is inserted and the two poolings are the plain CLS and mean-pooled embeddings, i.e. what
``model.encode`` gives with ``config.pooling = "cls"`` / ``"mean"``. No prefix is added: pass
``model.passage_instruction + text`` for e5-style models.

>>> mcls_positions(600, 256)
[0, 256, 512]
"""
from __future__ import annotations

import sys

import numpy as np

from ..progress import tqdm
from .heads import l2_normalize
from .tokenization import check_texts

SEGMENT_POOLINGS = ("cls", "mean")


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


def mcls_layout(model, texts, every: int, max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Per text: (token ids with a CLS every ``min(every, max_length)`` tokens, CLS positions), at most
    ``max_length`` (the model's when None) long."""
    texts = check_texts(texts)
    cfg = model.config
    max_length = model.resolve_max_length(max_length)
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 2:
        raise ValueError(f"every must be an integer >= 2, got {every!r}")
    plain = model.tokenizer.encode_ids(texts, sys.maxsize, warn=False)
    window = min(int(every), max_length)
    return [insert_cls(x, cfg.bos_token_id, cfg.eos_token_id, window, max_length) for x in plain]


def mcls_pool(hidden: np.ndarray, cls_pos: list[int], every: int, segment_pooling: str = "cls") -> np.ndarray:
    """One text's final states [n, H] -> [H]: the mean of its CLS states (``"cls"``, the paper's), or
    the mean over windows of each window's mean state (``"mean"``; one window = the plain mean)."""
    if segment_pooling == "cls":
        return hidden[cls_pos].mean(0)
    if segment_pooling != "mean":
        raise ValueError(f"segment_pooling must be one of {SEGMENT_POOLINGS}, got {segment_pooling!r}")
    if len(cls_pos) == 1:
        return hidden.mean(0)
    return np.mean([hidden[p:min(p + every, len(hidden))].mean(0) for p in cls_pos], axis=0)


def mcls_dense_embedding(model, texts, every: int = 256, max_length: int | None = None,
                         segment_pooling: str | tuple[str, ...] = "cls", batch_size: int = 8,
                         show_progress: bool = False):
    """MCLS embeddings of ``texts`` with ``model`` (a :class:`~bgem3_lib.model.bgem3.BGEM3`): ``[N, H]``
    for one ``segment_pooling``, or ``{pooling: [N, H]}`` for a tuple of them (one encoder pass for all).
    L2-normalised when the model normalises."""
    poolings = (segment_pooling,) if isinstance(segment_pooling, str) else tuple(segment_pooling)
    bad = [p for p in poolings if p not in SEGMENT_POOLINGS]
    if bad or not poolings:
        raise ValueError(f"segment_pooling must be from {SEGMENT_POOLINGS}, got {segment_pooling!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    max_length = model.resolve_max_length(max_length)
    seqs = mcls_layout(model, texts, every, max_length)
    window = min(int(every), max_length)
    out = {p: np.zeros((len(seqs), model.config.hidden_size), np.float32) for p in poolings}
    order = np.argsort([-len(s[0]) for s in seqs], kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc="MCLS encode", disable=not show_progress):
        idx = order[start:start + batch_size]
        ids, mask = model.tokenizer.pad([seqs[i][0] for i in idx])
        packed, offsets = model.encoder.forward_packed(ids, mask)
        packed = packed.asnumpy()
        for r, i in enumerate(idx):
            hidden = packed[offsets[r]:offsets[r + 1]]                   # [n_i, H], positions 0..n_i-1
            if hidden.shape[0] != len(seqs[i][0]):
                raise ValueError(f"encoder returned {hidden.shape[0]} states for a {len(seqs[i][0])}-token text")
            for p in poolings:
                out[p][i] = mcls_pool(hidden, seqs[i][1], window, p)
    if model.normalize_embeddings:
        out = {p: l2_normalize(v) for p, v in out.items()}
    return out[segment_pooling] if isinstance(segment_pooling, str) else out


def cls_counts(model, texts, every: int, max_length: int | None = None) -> np.ndarray:
    """``[N]`` number of CLS tokens (windows) each text gets in the MCLS layout."""
    return np.array([len(pos) for _, pos in mcls_layout(model, texts, every, max_length)], dtype=np.int64)
