"""Encode a corpus once: an on-disk cache of corpus encodings, filled by one process or by many shards.

Cache folder: ``cache_dir()/encodings/<key>/`` (files of :mod:`bgem3_lib.evaluation.encoding_store` + ``meta.json``),
``key`` = hash of (model fingerprint, corpus hash, max_length, dtype):

* :func:`~bgem3_lib.model.fingerprint.model_fingerprint` - config, prefixes, pooling, normalisation,
  dtype and the bytes of every encoder / head parameter (so retrained weights, even under the same
  path, give a new key; no float reductions, whose rounding could depend on the thread count);
* :func:`corpus_fingerprint` - sha256 over the ordered (docid, text) pairs.

Batches do not depend on sharding. The corpus is tokenised, ordered by token length (longest first,
ties by corpus order) and cut into ``batch_size`` batches; batch ``j`` goes to shard ``j % world``.
Every batch is encoded with exactly the same texts and padding in a single process as in any shard,
so the merged shards equal the single-process result bit for bit (given the same ``batch_size``).
Each shard writes ``<key>/shards/<reps>-n<world>-b<batch>/<rank>/`` (rows + encodings, then a
``done.json`` marker); rank 0 waits for all parts, merges them into ``<key>/`` and removes the parts.
A second run finds ``<key>/`` and encodes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..model.fingerprint import model_fingerprint
from ..paths import cache_dir
from ..progress import tqdm
from .distributed import check_shard
from .encoding_store import REPS, check_reps, gather_rows, load_encodings, save_encodings, stored_reps

CACHE_VERSION = 1


def encodings_root() -> Path:
    """``$BGEM3_HOME/encodings`` (``cache_dir()/encodings``)."""
    return cache_dir() / "encodings"


def model_reps(model) -> tuple[str, ...]:
    """Representations ``model`` can produce: ("dense",) for a dense-only model, else all three."""
    return ("dense",) if getattr(model, "heads", None) is None else tuple(REPS)


def corpus_fingerprint(docids: Sequence[str], texts: Sequence[str]) -> str:
    """Hex sha256 of the ordered (docid, text) pairs."""
    h = hashlib.sha256()
    for d, t in zip(docids, texts):
        for s in (str(d), t):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
    h.update(len(docids).to_bytes(8, "little"))
    return h.hexdigest()


def cache_key(model_fp: str, corpus_fp: str, max_length: int, dtype: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "model": model_fp, "corpus": corpus_fp,
                       "max_length": int(max_length), "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def check_corpus(docids: Sequence[str], texts: Sequence[str]) -> None:
    """ValueError for an empty corpus, duplicate ids, or empty / non-string passages."""
    if len(docids) != len(texts):
        raise ValueError(f"{len(docids)} docids but {len(texts)} texts")
    if len(texts) == 0:
        raise ValueError("empty corpus: no passages to encode")
    if len(set(docids)) != len(docids):
        raise ValueError("corpus docids contain duplicates")
    for d, t in zip(docids, texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"corpus passage {d!r} is empty or not a string: {t!r:.60}")


def plan_batches(model, texts: Sequence[str], max_length: int, batch_size: int) -> list[np.ndarray]:
    """Corpus row indices per batch: by token length descending (ties by row), ``batch_size`` each."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefixed = [model.passage_instruction + t for t in texts]
    lengths = np.zeros(len(texts), np.int64)
    step = 8192
    for s in tqdm(range(0, len(texts), step), desc="tokenize corpus", disable=len(texts) <= step):
        ids = model.tokenizer.encode_ids(prefixed[s:s + step], max_length, warn=False)
        lengths[s:s + len(ids)] = [len(x) for x in ids]
    cut = int((lengths >= max_length).sum())
    if cut:
        print(f"[encode] {cut} of {len(texts)} passages reach max_length={max_length} tokens (longer ones "
              "are truncated)")
    order = np.argsort(-lengths, kind="stable")
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def encode_batches(model, texts: Sequence[str], batches: Sequence[np.ndarray], reps: Sequence[str],
                   max_length: int, desc: str = "encode corpus") -> tuple[np.ndarray, dict]:
    """Encode the given batches with ``model.encode_corpus`` -> (rows [n], encodings of those rows)."""
    parts = []
    for rows in tqdm(batches, desc=desc, unit="batch"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*longer than max_length.*")
            out = model.encode_corpus([texts[i] for i in rows], batch_size=len(rows), max_length=max_length,
                                      return_dense="dense" in reps, return_sparse="sparse" in reps,
                                      return_colbert_vecs="colbert" in reps, show_progress=False)
        parts.append((rows, out))
    rows = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    return rows, _concat(parts, reps)


def _concat(parts, reps) -> dict:
    out = {key: None for key in REPS.values()}
    for r in reps:
        key = REPS[r]
        if key == "dense_vecs":
            out[key] = np.concatenate([p[1][key] for p in parts]) if parts else None
        else:
            out[key] = [x for p in parts for x in p[1][key]]
    return out


def _part_dir(folder: Path, reps: Sequence[str], world: int, batch_size: int) -> Path:
    return folder / "shards" / f"{'+'.join(reps)}-n{world}-b{batch_size}"


def _write_part(part: Path, rows: np.ndarray, enc: dict) -> None:
    tmp = part.with_name(f"{part.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_encodings(enc, tmp)
    np.save(tmp / "rows.npy", rows.astype(np.int64))
    (tmp / "done.json").write_text(json.dumps({"rows": int(rows.size)}))
    shutil.rmtree(part, ignore_errors=True)
    os.rename(tmp, part)


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cached_reps(folder: Path) -> set[str]:
    """Representations completely stored in a cache folder (listed in meta.json and present)."""
    return set(_read_meta(folder).get("reps", [])) & stored_reps(folder)


def wait_for_parts(parts_dir: Path, world: int, timeout: float, poll: float = 2.0) -> None:
    """Block until ``parts_dir/<r>/done.json`` exists for every rank (TimeoutError after ``timeout`` s)."""
    start = time.monotonic()
    with tqdm(total=world, desc="shards done", unit="shard") as bar:
        while True:
            done = sum((parts_dir / str(r) / "done.json").is_file() for r in range(world))
            bar.update(done - bar.n)
            if done == world:
                return
            if time.monotonic() - start > timeout:
                missing = [r for r in range(world) if not (parts_dir / str(r) / "done.json").is_file()]
                raise TimeoutError(f"waited {timeout:.0f} s for shards {missing} of {world} in {parts_dir}; "
                                   "start them with --shard r/n (same --batch-size), or raise the timeout")
            time.sleep(poll)


def merge_parts(parts_dir: Path, world: int, n: int, reps: Sequence[str]) -> dict:
    """Combine the ``world`` shard folders into corpus order (ValueError if rows do not tile 0..n-1)."""
    parts = []
    for r in range(world):
        part = parts_dir / str(r)
        rows = np.load(part / "rows.npy")
        if rows.size:                      # a shard gets no batch when world > number of batches
            parts.append((rows, load_encodings(part, reps)))
    return gather_rows(parts, n)


def corpus_encodings(model, docids: Sequence[str], texts: Sequence[str], reps: Sequence[str] | None = None,
                     max_length: int | None = None, batch_size: int = 32, shard: tuple[int, int] = (0, 1),
                     root: str | Path | None = None, timeout: float = 7 * 24 * 3600.0,
                     mmap: bool = False) -> dict | None:
    """Corpus encodings (``BGEM3.encode`` dict, corpus order) from the cache, encoding what is missing.

    With ``shard=(rank, world)`` and ``world > 1`` this process encodes only its batches; rank 0 then
    waits for the other shards, merges them and returns the full result, other ranks return None.
    """
    rank, world = check_shard(tuple(shard))
    check_corpus(docids, texts)
    reps = check_reps(reps if reps is not None else model_reps(model))
    max_length = model.resolve_max_length(max_length)
    key = cache_key(model_fingerprint(model), corpus_fingerprint(docids, texts), max_length, model.dtype)
    folder = Path(root) if root is not None else encodings_root()
    folder = folder / key
    need = tuple(r for r in reps if r not in cached_reps(folder))
    if need:
        parts_dir = _part_dir(folder, need, world, batch_size)
        part = parts_dir / str(rank)
        if not (part / "done.json").is_file():
            batches = plan_batches(model, texts, max_length, batch_size)[rank::world]
            desc = f"encode corpus [{'+'.join(need)}]" + (f" shard {rank}/{world}" if world > 1 else "")
            rows, enc = encode_batches(model, texts, batches, need, max_length, desc)
            _write_part(part, rows, enc)
        if rank != 0:
            print(f"[encode] shard {rank}/{world} written to {part}; rank 0 merges the shards")
            return None
        if world > 1:
            wait_for_parts(parts_dir, world, timeout)
        merged = merge_parts(parts_dir, world, len(texts), need)
        save_encodings(merged, folder)
        meta = _read_meta(folder)
        meta.update({"model": model_fingerprint(model), "source": model.source, "n": len(texts),
                     "max_length": max_length, "dtype": model.dtype, "version": CACHE_VERSION,
                     "reps": sorted(set(meta.get("reps", [])) | set(need))})
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(parts_dir, ignore_errors=True)
        if (folder / "shards").is_dir() and not any((folder / "shards").iterdir()):
            (folder / "shards").rmdir()
    elif rank != 0:
        return None
    enc = load_encodings(folder, reps, mmap=mmap)
    got = len(enc[REPS[reps[0]]])
    if got != len(texts):
        raise ValueError(f"cache {folder} holds {got} encodings for a corpus of {len(texts)}: delete it")
    return enc
