"""The one identity of a loaded model: a sha256 over its encoding conventions and every weight byte.

Caches key on it (corpus encodings, long-document poolings, hidden states of frozen layers), so a
cache written by other weights, another dtype or other prefixes is never read back.

* :func:`param_arrays` - (name, float32 array) of every parameter of the given cells;
* :func:`fingerprint` - hex sha256 of ``conventions`` (JSON) and the named cells' parameters;
* :func:`model_fingerprint` - that of a ``BGEM3`` (config, dtype, prefixes, normalisation; encoder and,
  with ``heads=True``, the heads), cached on the object.

Hashing reads every byte (~1 s per GB): exact, and cheap beside any encoding it protects.

>>> len(fingerprint({}, {"config": {"hidden_size": 8}}))
64
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping

import numpy as np


def param_arrays(cells: Mapping[str, object]) -> Iterator[tuple[str, np.ndarray]]:
    """(``prefix.param_name``, float32 array) of every parameter of each cell in ``cells`` {prefix: cell}."""
    import mindspore as ms
    for prefix, cell in cells.items():
        for p in cell.get_parameters():
            yield f"{prefix}.{p.name}", p.data.astype(ms.float32).asnumpy()


def fingerprint(cells: Mapping[str, object], conventions: Mapping) -> str:
    """Hex sha256 of ``conventions`` (JSON, sorted keys) and the names, shapes and bytes of the cells' parameters."""
    h = hashlib.sha256(json.dumps(conventions, sort_keys=True, default=str).encode())
    for name, arr in param_arrays(cells):
        h.update(f"{name}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def model_fingerprint(model, heads: bool = True) -> str:
    """Hex sha256 of a loaded model's weights and encoding conventions (cached on the object).

    ``heads=False`` leaves the sparse/ColBERT heads out: for what depends on the encoder only (dense
    poolings of long documents)."""
    attr = "_bgem3_fingerprint" if heads else "_bgem3_encoder_fingerprint"
    cached = getattr(model, attr, None)
    if cached is not None:
        return cached
    conventions = {"config": model.config.to_dict(), "dtype": model.dtype,
                   "normalize": bool(model.normalize_embeddings)}
    cells = {"encoder": model.encoder}
    if heads:
        conventions.update(prefixes=[model.query_instruction, model.passage_instruction],
                           heads=model.heads is not None)
        if model.heads is not None:
            cells["heads"] = model.heads
    value = fingerprint(cells, conventions)
    setattr(model, attr, value)
    return value
