"""Evaluations computed earlier in the same book build, read back instead of run again.

Chapters 6 and 8 both evaluate M3-small on every TyDi question against the whole corpus of its
language, in all five modes: the same model, set, modes and weights, so the same numbers. When
``BGEM3_BUILD_ID`` is set (``book/build.sh`` sets a fresh one for every build),
:func:`~bgem3_lib.evaluation.runner.evaluate_set` keeps what it computed (metric rows and per-query values)
in ``cache_dir()/build_results/<build id>/<key>.json`` and a later call with the same key *in the same
build* reads it. Every number in the book is still computed by that build's code; nothing outlives the
build (``book/build.sh`` removes the folders of earlier builds). Without ``BGEM3_BUILD_ID`` (tests, the CLI,
a notebook run by hand) nothing is stored or read.

``key`` = sha256 over everything the result depends on: the model fingerprint, the set's name, language,
queries, corpus, qrels and answers, the modes, weights, token window, batch size and task. Two chapters
that ask for the same key at the same time take turns through a lock, so the second one reads.

>>> with tempfile.TemporaryDirectory() as d:
...     os.environ["BGEM3_BUILD_ID"], os.environ["BGEM3_HOME"] = "demo", d
...     calls = []
...     compute = lambda: (calls.append(1) or [{"value": 0.5}], {("t", "en", "dense", "m"): {"q1": 0.5}})
...     first = reuse_in_build({"model": "abc", "modes": ["dense"]}, compute)
...     again = reuse_in_build({"model": "abc", "modes": ["dense"]}, compute)
...     other = reuse_in_build({"model": "abd", "modes": ["dense"]}, compute)
...     del os.environ["BGEM3_BUILD_ID"], os.environ["BGEM3_HOME"]
>>> len(calls), again == first
(2, True)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile  # noqa: F401  (the doctest)
from collections.abc import Callable
from pathlib import Path

from ..paths import atomic_write, cache_dir, file_lock

ENV = "BGEM3_BUILD_ID"


def build_folder() -> Path | None:
    """``cache_dir()/build_results/<BGEM3_BUILD_ID>``, or None outside a book build."""
    build = os.environ.get(ENV, "").strip()
    if not build:
        return None
    if not build.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{ENV} must be letters, digits, '-' or '_', got {build!r}")
    return cache_dir() / "build_results" / build


def result_key(parts: dict) -> str:
    """sha256 of ``parts`` as canonical JSON (sorted keys; tuples as lists)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _encode(per_query: dict) -> list:
    return [[list(k), v] for k, v in per_query.items()]


def _decode(items: list) -> dict:
    return {tuple(k): {q: float(x) for q, x in v.items()} for k, v in items}


def reuse_in_build(parts: dict, compute: Callable[[], tuple[list, dict]]) -> tuple[list, dict]:
    """``compute()`` -> (rows, per_query ``{(task, lang, mode, metric): {qid: value}}``), or the same pair
    stored by an earlier call with the same ``parts`` in this build."""
    folder = build_folder()
    if folder is None:
        return compute()
    path = folder / f"{result_key(parts)}.json"
    with file_lock(path.with_suffix(".lock"), f"the build result {path.name}"):
        if path.is_file():
            stored = json.loads(path.read_text())
            return stored["rows"], _decode(stored["per_query"])
        rows, per_query = compute()
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"parts": parts, "rows": rows, "per_query": _encode(per_query)}))
        return rows, per_query
