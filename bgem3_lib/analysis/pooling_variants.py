"""Dense embeddings of long texts under several poolings from ONE encoder pass: plain CLS, plain mean,
and MCLS (:mod:`bgem3_lib.model.mcls`) with CLS or mean summaries per window.

:func:`~bgem3_lib.model.mcls.mcls_dense_embedding` returns one pooling per call and runs the padded
MindSpore encoder; comparing poolings on a long-document set would encode the corpus once per pooling.
Here every text is laid out once for a given ``every`` (a CLS inserted every ``every`` tokens by
:func:`~bgem3_lib.model.mcls.insert_cls`), encoded once with the packed inference path
(``encoder.forward_packed``: padding costs nothing), and pooled both ways::

    {"cls":  mean of the final states at the CLS positions,            (MCLS, the paper's)
     "mean": mean over windows of each window's mean state}            (MCLS in e5's own pooling)

With ``every >= max_length`` no CLS is inserted and the two are the plain CLS and plain mean-pooled
embeddings, i.e. what ``model.encode`` gives with ``config.pooling = "cls"`` / ``"mean"``.

No prefix is added: pass ``model.passage_instruction + text`` (``"passage: "`` for e5).

>>> out = mcls_poolings(model, ["passage: " + long_text], every=128)          # doctest: +SKIP
>>> out["cls"].shape, out["mean"].shape                                      # doctest: +SKIP
((1, 384), (1, 384))
"""
from __future__ import annotations

import sys

import numpy as np

from ..model.heads import l2_normalize
from ..model.mcls import _pool, insert_cls
from ..model.tokenization import check_texts
from ..progress import tqdm

POOLINGS = ("cls", "mean")


def mcls_layout(model, texts, every: int, max_length: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Per text: (token ids with a CLS every ``every`` tokens, CLS positions), at most ``max_length`` long."""
    texts = check_texts(texts)
    cfg = model.config
    max_length = int(max_length or cfg.max_length)
    if max_length > cfg.max_length:
        raise ValueError(f"max_length={max_length} exceeds the model's position table ({cfg.max_length})")
    if not 2 <= every:
        raise ValueError(f"every must be >= 2, got {every}")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty: nothing to embed")
    plain = model.tokenizer.encode_ids(texts, sys.maxsize, warn=False)
    window = min(int(every), max_length)
    return [insert_cls(x, cfg.bos_token_id, cfg.eos_token_id, window, max_length) for x in plain]


def mcls_poolings(model, texts, every: int, max_length: int | None = None, batch_size: int = 8,
                  show_progress: bool = False) -> dict[str, np.ndarray]:
    """``{"cls": [N, H], "mean": [N, H]}`` MCLS embeddings of ``texts`` (L2-normalised when the model
    normalises), from one packed encoder pass; ``every >= max_length`` gives the plain poolings."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seqs = mcls_layout(model, texts, every, max_length)
    window = min(int(every), int(max_length or model.config.max_length))
    out = {p: np.zeros((len(seqs), model.config.hidden_size), np.float32) for p in POOLINGS}
    order = np.argsort([-len(s[0]) for s in seqs], kind="stable")
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="MCLS encode", disable=not show_progress):
        idx = order[start:start + batch_size]
        ids, mask = model.tokenizer.pad([seqs[i][0] for i in idx])
        packed, offsets = model.encoder.forward_packed(ids, mask)
        packed = packed.asnumpy()
        for r, i in enumerate(idx):
            hidden = packed[offsets[r]:offsets[r + 1]]                   # [n_i, H], positions 0..n_i-1
            if hidden.shape[0] != len(seqs[i][0]):
                raise ValueError(f"encoder returned {hidden.shape[0]} states for a {len(seqs[i][0])}-token text")
            for p in POOLINGS:
                out[p][i] = _pool(hidden, len(seqs[i][0]), seqs[i][1], window, p)
    if model.normalize_embeddings:
        out = {p: l2_normalize(v) for p, v in out.items()}
    return out


def cls_counts(model, texts, every: int, max_length: int | None = None) -> np.ndarray:
    """``[N]`` number of CLS tokens (windows) each text gets in the MCLS layout."""
    return np.array([len(pos) for _, pos in mcls_layout(model, texts, every, max_length)], dtype=np.int64)
