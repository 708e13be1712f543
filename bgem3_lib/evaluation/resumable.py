"""Encode in committed chunks, so a killed run loses at most one chunk.

A work folder holds ``plan.json`` (what is being encoded: a caller's plan id and the chunk count) and one
folder per finished chunk, ``chunk-00000/`` ... (the files of :mod:`~bgem3_lib.evaluation.encoding_store`
plus ``rows.npy``, the corpus rows it holds). A chunk is written to a temporary folder named by its writer
(:func:`~bgem3_lib.paths.temp_tag`) and renamed into place only when complete, so a folder named
``chunk-*`` is always whole. A rerun with the same plan skips the finished chunks (the progress bar starts at
the resumed position); a rerun with another plan starts over. Chunks are fixed by the batches and
``chunk_texts`` alone, so a resumed run computes exactly the batches an uninterrupted one does.

>>> import tempfile
>>> batches = [np.array([2, 0]), np.array([1])]
>>> fake = lambda rows: {"dense_vecs": np.asarray(rows, np.float32)[:, None], "lexical_weights": None,
...                      "colbert_vecs": None}
>>> with tempfile.TemporaryDirectory() as d:
...     encode_in_chunks(fake, batches, ("dense",), Path(d), "demo", chunk_texts=1, progress=False)
...     rows, enc = load_chunks(Path(d), ("dense",))
>>> rows.tolist(), enc["dense_vecs"][:, 0].tolist()
([2, 0, 1], [2.0, 0.0, 1.0])
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..paths import atomic_write, remove_stale_temps, temp_tag
from ..progress import tqdm
from .encoding_store import REPS, load_encodings, save_encodings

PLAN = "plan.json"


def chunk_batches(batches: Sequence[np.ndarray], chunk_texts: int) -> list[list[np.ndarray]]:
    """Consecutive batches grouped until a group holds ``chunk_texts`` texts or more.

    >>> [len(c) for c in chunk_batches([np.arange(2)] * 5, chunk_texts=4)]
    [2, 2, 1]
    """
    if chunk_texts < 1:
        raise ValueError(f"chunk_texts must be >= 1, got {chunk_texts}")
    chunks, current, size = [], [], 0
    for b in batches:
        current.append(np.asarray(b, np.int64))
        size += len(b)
        if size >= chunk_texts:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


def _chunk_dir(work: Path, i: int) -> Path:
    return work / f"chunk-{i:05d}"


def _start(work: Path, plan_id: str, n_chunks: int) -> None:
    """Keep the work folder if it holds this plan; otherwise empty it and record the plan."""
    plan = {"plan": plan_id, "chunks": n_chunks}
    try:
        old = json.loads((work / PLAN).read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    if old != plan:
        if old is not None or any(work.glob("chunk-*")):
            print(f"[encode] {work} holds another run's chunks: starting over")
        for p in work.glob("chunk-*"):
            shutil.rmtree(p, ignore_errors=True)
        with atomic_write(work / PLAN) as tmp:
            tmp.write_text(json.dumps(plan))
    remove_stale_temps(work)


def _concat(parts: Sequence[tuple[np.ndarray, dict]], reps: Sequence[str]) -> dict:
    out = {key: None for key in REPS.values()}
    for r in reps:
        key = REPS[r]
        if key == "dense_vecs":
            out[key] = np.concatenate([np.asarray(p[1][key]) for p in parts])
        else:
            out[key] = [x for p in parts for x in p[1][key]]
    return out


def encode_in_chunks(encode_rows: Callable[[np.ndarray], dict], batches: Sequence[np.ndarray],
                     reps: Sequence[str], work: Path, plan_id: str, chunk_texts: int = 512,
                     desc: str = "encode", progress: bool = True) -> None:
    """Encode every batch (``encode_rows(rows)`` -> a ``BGEM3.encode`` dict for those corpus rows) into
    committed chunks under ``work``; chunks already there for the same ``plan_id`` are not redone."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    chunks = chunk_batches(batches, chunk_texts)
    _start(work, plan_id, len(chunks))
    done = [(_chunk_dir(work, i) / "done.json").is_file() for i in range(len(chunks))]
    sizes = [sum(len(b) for b in c) for c in chunks]
    resumed = sum(s for s, d in zip(sizes, done) if d)
    label = desc + (f" (resumed at {resumed})" if resumed else "")
    with tqdm(total=sum(sizes), initial=resumed, desc=label, unit="text", disable=not progress) as bar:
        for i, chunk in enumerate(chunks):
            if done[i]:
                continue
            parts = [(rows, encode_rows(rows)) for rows in chunk]
            tmp = work / f".chunk-{i:05d}.{temp_tag()}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_encodings(_concat(parts, reps), tmp)
            with atomic_write(tmp / "rows.npy") as t, open(t, "wb") as f:
                np.save(f, np.concatenate(chunk), allow_pickle=False)
            (tmp / "done.json").write_text(json.dumps({"rows": sizes[i]}))
            os.rename(tmp, _chunk_dir(work, i))                     # the chunk is committed
            bar.update(sizes[i])


def load_chunks(work: Path, reps: Sequence[str]) -> tuple[np.ndarray, dict]:
    """All committed chunks of a finished :func:`encode_in_chunks` -> (rows [n], encodings of those rows)."""
    work = Path(work)
    try:
        n_chunks = json.loads((work / PLAN).read_text())["chunks"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{work}: no encoding plan ({e}); encode first") from None
    parts = []
    for i in range(n_chunks):
        folder = _chunk_dir(work, i)
        if not (folder / "done.json").is_file():
            raise ValueError(f"{work}: chunk {i} of {n_chunks} is missing; rerun the encoding to finish it")
        parts.append((np.load(folder / "rows.npy", allow_pickle=False), load_encodings(folder, reps)))
    if not parts:
        return np.zeros(0, np.int64), {key: None for key in REPS.values()}
    return np.concatenate([p[0] for p in parts]), _concat(parts, reps)
