"""Hidden states of a frozen lower encoder, computed once (forward only) and kept as fp16 on disk.

When the embeddings and layers ``0 .. k-1`` are frozen, their output never changes during training,
so it is computed once for every training text and the trainer starts at layer ``k``
(``M3TrainNet(start_layer=k)``); ``k = num_hidden_layers`` caches the final states (heads-only training).

Layout in ``dir``: ``states.npy`` — all texts' token states concatenated, ``[T, H]`` float16 (opened as a
memmap, so RAM holds only what a batch touches); ``offsets.npy`` ``[N + 1]`` int64 (text ``i`` is rows
``offsets[i]:offsets[i+1]``); ``meta.json`` with the key the cache was built for (token ids, layer,
model fingerprint). The directory is written under a temporary name and renamed when complete, so a
killed run never leaves a half cache that a later run would trust.

>>> cache = build_hidden_cache(encoder, [[0, 5, 2], [0, 7, 8, 2]], layer=2, path=None)   # doctest: +SKIP
>>> cache(1).shape                                                                        # doctest: +SKIP
(4, 384)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np

from ..model.encoder import encoder_inputs
from ..model.fingerprint import fingerprint
from ..progress import tqdm


class HiddenCache:
    """``cache(i)`` -> ``[len_i, H]`` float16 states of text ``i``."""

    def __init__(self, states: np.ndarray, offsets: np.ndarray):
        if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != states.shape[0] or np.any(np.diff(offsets) < 1):
            raise ValueError(f"offsets do not partition the {states.shape[0]} cached rows")
        self.states, self.offsets = states, offsets

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __call__(self, i: int) -> np.ndarray:
        return self.states[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def open(cls, path: str | Path) -> "HiddenCache":
        path = Path(path)
        for name in ("states.npy", "offsets.npy", "meta.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"hidden-state cache {path} has no {name}")
        return cls(np.load(path / "states.npy", mmap_mode="r"), np.load(path / "offsets.npy"))


def cache_key(ids: list, layer: int, fingerprint: str) -> str:
    h = hashlib.sha1(f"{layer}|{fingerprint}|{len(ids)}".encode())
    for x in ids:
        h.update(np.asarray(x, np.int32).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices sorted by length (longest first), cut so ``rows * longest <= batch_tokens``."""
    order = np.argsort(-lengths, kind="stable")
    out, start = [], 0
    while start < order.size:
        rows = max(1, batch_tokens // int(lengths[order[start]]))
        out.append(order[start:start + rows])
        start += rows
    return out


def compute_states(encoder, ids: list, layer: int, batch_tokens: int = 4096, states=None,
                   desc: str = "cache states") -> tuple[np.ndarray, np.ndarray]:
    """Run embeddings + layers ``0..layer-1`` over ``ids``; returns (states [T, H] fp16, offsets [N+1])."""
    if not ids:
        raise ValueError("no texts to cache")
    n_layers = len(encoder.layers)
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer must lie in [0, {n_layers}], got {layer}")
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    H = encoder.cfg.hidden_size
    if states is None:
        states = np.zeros((int(offsets[-1]), H), np.float16)
    encoder.set_train(False)
    for idx in tqdm(_batches(lengths, batch_tokens), desc=desc, mininterval=5):
        L = int(lengths[idx].max())
        arr = np.full((idx.size, L), encoder.cfg.pad_token_id, np.int32)
        mask = np.zeros((idx.size, L), np.int32)
        for r, i in enumerate(idx):
            arr[r, : lengths[i]], mask[r, : lengths[i]] = ids[i], 1
        t_ids, t_mask, t_pos = encoder_inputs(arr, mask, encoder.cfg)
        x = encoder.run_layers(encoder.embed(t_ids, t_pos), encoder.mask_bias(t_mask), 0, layer)
        x = x.astype(ms.float32).asnumpy()
        for r, i in enumerate(idx):
            states[offsets[i]:offsets[i + 1]] = x[r, : lengths[i]]
    return states, offsets


def build_hidden_cache(encoder, ids: list, layer: int, path: str | Path | None = None,
                       batch_tokens: int = 4096) -> HiddenCache:
    """Cached states at the input of ``layer`` for every text; reuses ``path`` if built for the same key."""
    if path is None:
        return HiddenCache(*compute_states(encoder, ids, layer, batch_tokens))
    path = Path(path)
    key = cache_key(ids, layer, fingerprint({"encoder": encoder}, {"config": encoder.cfg.to_dict()}))
    if (path / "meta.json").is_file() and json.loads((path / "meta.json").read_text()).get("key") == key:
        return HiddenCache.open(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = sum(len(x) for x in ids)
    states = np.lib.format.open_memmap(tmp / "states.npy", mode="w+", dtype=np.float16,
                                       shape=(total, encoder.cfg.hidden_size))
    states, offsets = compute_states(encoder, ids, layer, batch_tokens, states=states)
    states.flush()
    del states
    np.save(tmp / "offsets.npy", offsets)
    (tmp / "meta.json").write_text(json.dumps({"key": key, "layer": layer, "texts": len(ids), "tokens": total}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return HiddenCache.open(path)
