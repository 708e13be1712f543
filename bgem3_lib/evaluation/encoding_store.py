"""Store ``BGEM3.encode`` outputs on disk as flat arrays, and bring them back bit-exactly.

One folder per encoding set, one file per representation (all NumPy ``.npy``, readable anywhere):

=================  =====================================================================================
``dense.npy``      ``dense_vecs`` [N, H] as produced (float32)
``sparse_*.npy``   ``lexical_weights`` as CSR rows: ``sparse_indptr`` [N+1] int64, ``sparse_indices`` int32
                   (token ids, each row in the dict's own order) and ``sparse_data`` (float32 when that is
                   lossless, else float64). ``{"6": 0.5}`` comes back as ``{"6": 0.5}``, same key order.
``colbert.npy``    all ``colbert_vecs`` [n_i, D] concatenated [sum n_i, D] + ``colbert_offsets.npy`` [N+1]
=================  =====================================================================================

>>> import tempfile
>>> enc = {"dense_vecs": np.ones((2, 3), np.float32), "lexical_weights": [{"6": 0.5}, {}],
...        "colbert_vecs": [np.ones((1, 2), np.float32), np.zeros((2, 2), np.float32)]}
>>> with tempfile.TemporaryDirectory() as d:
...     stored = save_encodings(enc, d)
...     back = load_encodings(d)
>>> back["lexical_weights"], [v.shape for v in back["colbert_vecs"]]
([{'6': 0.5}, {}], [(1, 2), (2, 2)])
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..paths import atomic_write

REPS = {"dense": "dense_vecs", "sparse": "lexical_weights", "colbert": "colbert_vecs"}
_FILES = {"dense": ("dense.npy",), "sparse": ("sparse_indptr.npy", "sparse_indices.npy", "sparse_data.npy"),
          "colbert": ("colbert.npy", "colbert_offsets.npy")}


def check_reps(reps: Sequence[str]) -> tuple[str, ...]:
    """Validate representation names ("dense", "sparse", "colbert"); returned in canonical order."""
    unknown = [r for r in reps if r not in REPS]
    if unknown or not reps:
        raise ValueError(f"representations must be a non-empty subset of {tuple(REPS)}, got {list(reps)}")
    return tuple(r for r in REPS if r in reps)


# ---------------------------------------------------------------- list <-> flat arrays

def lexical_to_arrays(lexical: Sequence[Mapping[str, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """List of ``{token_id_str: weight}`` -> (indptr [N+1] int64, indices int32, data float).

    >>> [a.tolist() for a in lexical_to_arrays([{"9": 1.0, "2": 0.25}, {}])]
    [[0, 2, 2], [9, 2], [1.0, 0.25]]
    """
    lengths = np.fromiter((len(d) for d in lexical), np.int64, count=len(lexical))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.fromiter((int(k) for d in lexical for k in d), np.int64, count=int(indptr[-1]))
    data = np.fromiter((float(v) for d in lexical for v in d.values()), np.float64, count=int(indptr[-1]))
    if indices.size and (indices.min() < 0 or indices.max() > np.iinfo(np.int32).max):
        raise ValueError("lexical weight keys must be token ids in [0, 2^31)")
    if not np.all(np.isfinite(data)):
        raise ValueError("lexical weights contain NaN or inf")
    narrow = data.astype(np.float32)
    if np.array_equal(narrow.astype(np.float64), data):
        data = narrow
    return indptr, indices.astype(np.int32), data


def arrays_to_lexical(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> list[dict[str, float]]:
    """Inverse of :func:`lexical_to_arrays`."""
    keys = [str(i) for i in np.asarray(indices).tolist()]
    values = np.asarray(data, np.float64).tolist()
    bounds = np.asarray(indptr).tolist()
    return [dict(zip(keys[a:b], values[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def colbert_to_arrays(vecs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """List of [n_i, D] -> (concatenated [sum n_i, D], offsets [N+1] int64)."""
    dims = {np.shape(v)[1] for v in vecs if np.ndim(v) == 2}
    if any(np.ndim(v) != 2 for v in vecs) or len(dims) > 1:
        raise ValueError(f"colbert_vecs must be [n_i, D] arrays with one D, got dims {sorted(dims)}")
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in vecs])]).astype(np.int64)
    flat = np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
    return flat, offsets


def arrays_to_colbert(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`colbert_to_arrays` (views into ``flat``; works on memory maps)."""
    bounds = np.asarray(offsets).tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------- folders

def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def stored_reps(folder: str | Path) -> set[str]:
    """Representations whose files are all present in ``folder``."""
    folder = Path(folder)
    return {r for r, names in _FILES.items() if all((folder / n).is_file() for n in names)}


def save_encodings(enc: Mapping, folder: str | Path) -> list[str]:
    """Write every representation present (not None) in ``enc``; return their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if enc.get("dense_vecs") is not None:
        _save_array(folder / "dense.npy", np.asarray(enc["dense_vecs"]))
        written.append("dense")
    if enc.get("lexical_weights") is not None:
        for name, arr in zip(_FILES["sparse"], lexical_to_arrays(enc["lexical_weights"])):
            _save_array(folder / name, arr)
        written.append("sparse")
    if enc.get("colbert_vecs") is not None:
        flat, offsets = colbert_to_arrays(enc["colbert_vecs"])
        _save_array(folder / "colbert.npy", flat)
        _save_array(folder / "colbert_offsets.npy", offsets)
        written.append("colbert")
    return written


def _load(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: truncated or corrupt array file ({e}); "
                         "delete its folder to re-encode") from e


def load_encodings(folder: str | Path, reps: Sequence[str] | None = None, mmap: bool = False) -> dict:
    """Read an encoding folder into the ``BGEM3.encode`` dict (absent representations -> None).

    ``mmap=True`` maps dense / ColBERT arrays instead of reading them (large corpora).
    """
    folder = Path(folder)
    have = stored_reps(folder)
    want = check_reps(reps) if reps is not None else tuple(r for r in REPS if r in have)
    missing = [r for r in want if r not in have]
    if missing:
        raise FileNotFoundError(f"{folder} has no stored {missing} encodings (has {sorted(have)})")
    out = {key: None for key in REPS.values()}
    if "dense" in want:
        out["dense_vecs"] = _load(folder / "dense.npy", mmap)
    if "sparse" in want:
        out["lexical_weights"] = arrays_to_lexical(*(_load(folder / n, False) for n in _FILES["sparse"]))
    if "colbert" in want:
        out["colbert_vecs"] = arrays_to_colbert(_load(folder / "colbert.npy", mmap),
                                                _load(folder / "colbert_offsets.npy", False))
    sizes = {k: len(v) for k, v in out.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{folder}: stored representations disagree on the number of texts: {sizes}")
    return out


def gather_rows(parts: Sequence[tuple[np.ndarray, Mapping]], n: int) -> dict:
    """Put per-shard encodings back in corpus order.

    ``parts``: ``(rows, enc)`` pairs, ``rows`` [n_j] the corpus indices of ``enc``'s texts. Together
    the rows must cover ``0..n-1`` exactly once.
    """
    rows = np.concatenate([np.asarray(r, np.int64) for r, _ in parts]) if parts else np.zeros(0, np.int64)
    if rows.shape != (n,) or not np.array_equal(np.sort(rows), np.arange(n)):
        raise ValueError(f"shard rows do not cover the {n} corpus rows exactly once "
                         f"({rows.size} rows given): missing or overlapping shards")
    where = np.empty(n, np.int64)
    where[rows] = np.arange(n)                      # corpus row -> position in the concatenation
    out = {key: None for key in REPS.values()}
    keys = [k for k in REPS.values() if all(p[1].get(k) is not None for p in parts)]
    for key in keys:
        if key == "dense_vecs":
            out[key] = np.concatenate([np.asarray(p[1][key]) for p in parts])[where]
        else:
            flat = [x for p in parts for x in p[1][key]]
            out[key] = [flat[i] for i in where]
    return out


def npz_path(path: str | Path) -> Path:
    """The file :func:`encodings_to_npz` writes for ``path``: ``path`` itself when it ends in ``.npz``, else
    ``path.npz``.

    >>> npz_path("vecs").name, npz_path("vecs.npz").name
    ('vecs.npz', 'vecs.npz')
    """
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def encodings_to_npz(enc: Mapping, path: str | Path, line_numbers=None) -> Path:
    """One ``.npz`` with the arrays of :func:`save_encodings` (``dense``, ``sparse_*``, ``colbert*``) and,
    when given, ``line_numbers`` [N] (the input line of each row). Written to a temporary file in the same
    folder and moved into place: a failed write leaves the previous file as it was."""
    arrays = {}
    if enc.get("dense_vecs") is not None:
        arrays["dense"] = np.asarray(enc["dense_vecs"])
    if enc.get("lexical_weights") is not None:
        names = ("sparse_indptr", "sparse_indices", "sparse_data")
        arrays.update(zip(names, lexical_to_arrays(enc["lexical_weights"])))
    if enc.get("colbert_vecs") is not None:
        arrays["colbert"], arrays["colbert_offsets"] = colbert_to_arrays(enc["colbert_vecs"])
    if not arrays:
        raise ValueError("nothing to save: the encodings hold no representation")
    if line_numbers is not None:
        arrays["line_numbers"] = np.asarray(line_numbers, dtype=np.int64)
    path = npz_path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path
