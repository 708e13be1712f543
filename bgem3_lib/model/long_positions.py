"""Longer inputs for an encoder trained on short ones: its learned position table extended without training.

multilingual-e5-small learned 512 absolute positions. The paper's "w.o. long" setting (Table 3: MLDR
without long-document fine-tuning) is an encoder that *accepts* 8192 tokens but never trained on them;
this module builds exactly that from a real checkpoint, by one of :data:`METHODS`:

* ``"tile"`` - the learned rows copied over and over (row ``p`` = row ``p mod P``), the initialisation
  Longformer used to extend RoBERTa's 512 positions to 4096 (Beltagy et al., 2020, §5);
* ``"interpolate"`` - rows past the learned ones read the learned table at a stretched position: row
  ``p >= P`` is the linear interpolation of the table at ``p * (P - 1) / (N - 1)``, so the extension spans
  the whole learned range once instead of repeating it.

Both keep every learned row bit for bit (row ``p < P`` is the original row ``p``), so a text of at most
``P`` tokens encodes exactly as before. For ``xlm-roberta`` position tables the first ``pad_token_id + 1``
rows are never used for a token (positions start after the pad id) and are kept as they are.

``table`` [P, H] -> [N, H] float32, N >= P:

>>> t = np.arange(6, dtype=np.float32).reshape(3, 2)          # 3 learned positions, H = 2
>>> extend_table(t, 5, "tile")[:, 0].tolist()
[0.0, 2.0, 4.0, 0.0, 2.0]
>>> extend_table(t, 5, "interpolate")[:, 0].tolist()           # rows 3, 4 read the table at 1.5, 2.0
[0.0, 2.0, 4.0, 3.0, 4.0]
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

METHODS = ("tile", "interpolate")
POSITION_KEY = "embeddings.position_embeddings.weight"


def extend_table(table: np.ndarray, n: int, method: str = "tile", reserved: int = 0) -> np.ndarray:
    """The position table ``table`` [P, H] extended to ``n`` rows by ``method``; the first ``reserved`` rows
    (never a token's position) are kept and not used as a source."""
    if method not in METHODS:
        raise ValueError(f"position extension method must be one of {METHODS}, got {method!r}")
    table = np.asarray(table, np.float32)
    if table.ndim != 2:
        raise ValueError(f"a position table is [positions, hidden], got shape {table.shape}")
    if not 0 <= reserved < table.shape[0]:
        raise ValueError(f"reserved rows must lie in [0, {table.shape[0]}), got {reserved}")
    if n < table.shape[0]:
        raise ValueError(f"cannot extend a table of {table.shape[0]} positions to fewer ({n})")
    learned = table[reserved:]                                  # [P', H]: the rows tokens use
    p, new = learned.shape[0], n - reserved
    if method == "tile":
        rows = learned[np.arange(new) % p]
    else:
        extra = np.arange(p, new, dtype=np.float64) * (p - 1) / max(new - 1, 1)
        lo = np.floor(extra).astype(np.int64)
        hi = np.minimum(lo + 1, p - 1)
        frac = (extra - lo)[:, None]
        rows = np.concatenate([learned, ((1 - frac) * learned[lo] + frac * learned[hi]).astype(np.float32)])
    out = np.concatenate([table[:reserved], rows]).astype(np.float32)
    assert out.shape == (n, table.shape[1]), out.shape
    return out


def extend_positions(loaded, max_length: int = 8192, method: str = "tile"):
    """A :class:`~bgem3_lib.model.loading.LoadedModel` whose encoder accepts ``max_length`` tokens: the
    position table extended by :func:`extend_table`, ``max_position_embeddings`` raised to match, every other
    weight shared; ``source`` and ``extra`` say how it was made."""
    cfg = loaded.config
    reserved = cfg.pad_token_id + 1 if cfg.model_type == "xlm-roberta" else 0
    if POSITION_KEY not in loaded.encoder_state:
        raise ValueError(f"{loaded.source}: no {POSITION_KEY} to extend")
    if max_length < cfg.max_length:
        raise ValueError(f"{loaded.source} already accepts {cfg.max_length} tokens; asked for {max_length}")
    state = dict(loaded.encoder_state)
    state[POSITION_KEY] = extend_table(state[POSITION_KEY], max_length + reserved, method, reserved)
    new_cfg = replace(cfg, max_position_embeddings=max_length + reserved)
    extra = dict(loaded.extra, position_extension={"method": method, "from": cfg.max_length, "to": max_length})
    return replace(loaded, config=new_cfg, encoder_state=state, extra=extra,
                   source=f"{loaded.source}+positions-{method}-{max_length}")
