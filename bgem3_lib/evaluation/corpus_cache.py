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

import contextlib
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..model.fingerprint import model_fingerprint
from ..paths import LockedError, atomic_write, cache_dir, file_lock, remove_stale_temps
from ..progress import tqdm
from .distributed import check_shard
from .encoding_store import REPS, check_reps, gather_rows, load_encodings, save_encodings, stored_reps
from .resumable import encode_in_chunks, load_chunks

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


def _part_dir(folder: Path, reps: Sequence[str], world: int, batch_size: int) -> Path:
    return folder / "shards" / f"{'+'.join(reps)}-n{world}-b{batch_size}"


def encode_rows_fn(model, texts: Sequence[str], reps: Sequence[str], max_length: int, kind: str = "passage"):
    """``rows -> encodings`` of those texts as one batch, by ``kind``: ``encode_corpus`` ("passage"),
    ``encode_queries`` ("query") or ``encode`` ("raw", no prefix)."""
    fn = {"query": model.encode_queries, "passage": model.encode_corpus, "raw": model.encode}[kind]

    def encode_rows(rows: np.ndarray) -> dict:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*longer than max_length.*")
            return fn([texts[i] for i in rows], batch_size=len(rows), max_length=max_length,
                      return_dense="dense" in reps, return_sparse="sparse" in reps,
                      return_colbert_vecs="colbert" in reps, show_progress=False)
    return encode_rows


def resumable_encode(model, texts: Sequence[str], work: str | Path, kind: str = "passage",
                     reps: Sequence[str] = ("dense",), max_length: int | None = None, batch_size: int = 32,
                     chunk_texts: int = 512) -> dict:
    """Encode ``texts`` (``BGEM3.encode`` dict, input order) through committed chunks in ``work``: a killed
    run, restarted with the same arguments, redoes at most one chunk and gives the same arrays bit for bit.
    ``work`` is left in place (the caller removes it once the result is safely stored)."""
    reps = check_reps(reps)
    max_length = model.resolve_max_length(max_length)
    ids = [str(i) for i in range(len(texts))]
    plan = cache_key(model_fingerprint(model), corpus_fingerprint(ids, texts), max_length, model.dtype)
    plan = f"{plan}-{kind}-{'+'.join(reps)}-b{batch_size}-c{chunk_texts}"
    batches = plan_batches(model, texts, max_length, batch_size)
    encode_in_chunks(encode_rows_fn(model, texts, reps, max_length, kind), batches, reps, Path(work), plan,
                     chunk_texts, desc=f"encode [{'+'.join(reps)}]")
    return gather_rows([load_chunks(Path(work), reps)], len(texts))


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cached_reps(folder: Path) -> set[str]:
    """Representations completely stored in a cache folder (listed in meta.json and present)."""
    return set(_read_meta(folder).get("reps", [])) & stored_reps(folder)


def wait_for_parts(parts_dir: Path, world: int, timeout: float, poll: float = 2.0,
                   finished: Callable[[], bool] = lambda: False) -> None:
    """Block until ``parts_dir/<r>/done.json`` exists for every rank, or ``finished()`` says another run has
    completed the cache meanwhile (TimeoutError after ``timeout`` s)."""
    start = time.monotonic()
    with tqdm(total=world, desc="shards done", unit="shard") as bar:
        while True:
            done = sum((parts_dir / str(r) / "done.json").is_file() for r in range(world))
            bar.update(done - bar.n)
            if done == world or finished():
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
        rows, enc = load_chunks(parts_dir / str(r), reps)
        if rows.size:                      # a shard gets no batch when world > number of batches
            parts.append((rows, enc))
    return gather_rows(parts, n)


def _publish(folder: Path, model, merged: dict, need: Sequence[str], n: int, max_length: int) -> None:
    """Write the merged encodings, then ``meta.json`` listing them (the commit point: a kill before it
    leaves the representations unlisted, so the next run merges again)."""
    save_encodings(merged, folder)
    meta = _read_meta(folder)
    meta.update({"model": model_fingerprint(model), "source": model.source, "n": n, "max_length": max_length,
                 "dtype": model.dtype, "version": CACHE_VERSION,
                 "reps": sorted(set(meta.get("reps", [])) | set(need))})
    with atomic_write(folder / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


def _tidy(folder: Path) -> None:
    """Under the cache lock: drop a dead process's temporaries and the shard folders of work already merged
    into the cache (whose representations the cache holds, and whose rank locks nobody holds)."""
    remove_stale_temps(folder, untagged=True)
    shards = folder / "shards"
    if not shards.is_dir():
        return
    have = cached_reps(folder)
    for parts_dir in shards.iterdir():
        if not set(parts_dir.name.split("-n")[0].split("+")) <= have:
            remove_stale_temps(parts_dir)             # not merged yet: keep it (a rerun resumes from it)
            continue
        try:
            with contextlib.ExitStack() as stack:
                for lock in parts_dir.glob("*.lock"):
                    stack.enter_context(file_lock(lock, f"shard {lock.stem} of {parts_dir}", wait=False))
                shutil.rmtree(parts_dir, ignore_errors=True)
        except LockedError:
            continue                                  # a live shard still works there
    if not any(shards.iterdir()):
        shards.rmdir()


def corpus_encodings(model, docids: Sequence[str], texts: Sequence[str], reps: Sequence[str] | None = None,
                     max_length: int | None = None, batch_size: int = 32, shard: tuple[int, int] = (0, 1),
                     root: str | Path | None = None, timeout: float = 7 * 24 * 3600.0,
                     mmap: bool = False, chunk_texts: int = 512) -> dict | None:
    """Corpus encodings (``BGEM3.encode`` dict, corpus order) from the cache, encoding what is missing.

    With ``shard=(rank, world)`` and ``world > 1`` this process encodes only its batches; rank 0 then
    waits for the other shards, merges them and returns the full result, other ranks return None.
    Encoding is committed every ``chunk_texts`` texts (a killed run resumes there). Processes sharing
    the cache take turns through ``<key>/.lock``: a second run on the same corpus waits for the first, then
    reads what it stored.
    """
    rank, world = check_shard(tuple(shard))
    check_corpus(docids, texts)
    reps = check_reps(reps if reps is not None else model_reps(model))
    max_length = model.resolve_max_length(max_length)
    key = cache_key(model_fingerprint(model), corpus_fingerprint(docids, texts), max_length, model.dtype)
    folder = (Path(root) if root is not None else encodings_root()) / key
    key_lock = folder / ".lock"
    what = f"the encoding cache {folder}"
    with contextlib.ExitStack() as stack:
        if world == 1:                                # one process: hold the cache for the whole job
            stack.enter_context(file_lock(key_lock, what))
            _tidy(folder)
        need = tuple(r for r in reps if r not in cached_reps(folder))
        if need:
            parts_dir = _part_dir(folder, need, world, batch_size)
            part = parts_dir / str(rank)
            with file_lock(parts_dir / f"{rank}.lock", f"shard {rank} of {parts_dir}"):
                if not (part / "done.json").is_file():
                    batches = plan_batches(model, texts, max_length, batch_size)[rank::world]
                    desc = f"encode corpus [{'+'.join(need)}]" + (f" shard {rank}/{world}" if world > 1 else "")
                    encode_in_chunks(encode_rows_fn(model, texts, need, max_length), batches, need, part,
                                     plan_id=f"{key}-{'+'.join(need)}-r{rank}", chunk_texts=chunk_texts, desc=desc)
                    (part / "done.json").write_text(json.dumps({"rank": rank, "world": world}))
            if rank != 0:
                print(f"[encode] shard {rank}/{world} written to {part}; rank 0 merges the shards")
                return None
            if world > 1:
                wait_for_parts(parts_dir, world, timeout,
                               finished=lambda: all(r in cached_reps(folder) for r in need))
                stack.enter_context(file_lock(key_lock, what))
            need = tuple(r for r in need if r not in cached_reps(folder))
            if need:
                _publish(folder, model, merge_parts(parts_dir, world, len(texts), need), need, len(texts),
                         max_length)
            _tidy(folder)
        elif rank != 0:
            return None
        enc = load_encodings(folder, reps, mmap=mmap)
    got = len(enc[REPS[reps[0]]])
    if got != len(texts):
        raise ValueError(f"cache {folder} holds {got} encodings for a corpus of {len(texts)}: delete it")
    return enc
