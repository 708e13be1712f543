"""Chunked, resumable encoding: a run that dies mid-way resumes at its last committed chunk and ends with
exactly the arrays of an uninterrupted run."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bgem3_lib.evaluation.resumable import chunk_batches, encode_in_chunks, load_chunks
from bgem3_lib.paths import temp_tag

REPS = ("dense", "sparse", "colbert")


class Encoder:
    """Deterministic fake encodings of corpus rows; counts calls; can die after ``die_after`` batches."""

    def __init__(self, die_after: int | None = None):
        self.calls, self.die_after = 0, die_after

    def __call__(self, rows):
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        rows = np.asarray(rows)
        return {"dense_vecs": np.stack([np.sin(np.arange(4) + r) for r in rows]).astype(np.float32),
                "lexical_weights": [{str(r): 0.5 + r} for r in rows],
                "colbert_vecs": [np.full((1 + r % 3, 2), r, np.float32) for r in rows]}


def _batches(n=23, size=3):
    order = np.random.default_rng(0).permutation(n)
    return [order[s:s + size] for s in range(0, n, size)]


def test_chunks_group_whole_batches():
    chunks = chunk_batches(_batches(), chunk_texts=7)                # batches of 3: 3 batches (9 texts) per chunk
    assert [sum(len(b) for b in c) for c in chunks] == [9, 9, 5]
    with pytest.raises(ValueError, match="chunk_texts"):
        chunk_batches(_batches(), 0)


def test_a_killed_run_resumes_at_its_last_chunk_and_equals_a_clean_run(tmp_path, capsys):
    batches = _batches()
    encode_in_chunks(Encoder(), batches, REPS, tmp_path / "clean", "p", chunk_texts=6)
    clean_rows, clean = load_chunks(tmp_path / "clean", REPS)

    dying = Encoder(die_after=5)                                      # chunks of 2 batches: 2 committed
    with pytest.raises(KeyboardInterrupt):
        encode_in_chunks(dying, batches, REPS, tmp_path / "w", "p", chunk_texts=6)
    assert sorted(p.name for p in (tmp_path / "w").glob("chunk-*")) == ["chunk-00000", "chunk-00001"]
    again = Encoder()
    encode_in_chunks(again, batches, REPS, tmp_path / "w", "p", chunk_texts=6)
    assert again.calls == len(batches) - 4                            # only the unfinished chunks
    assert "resumed at 12" in capsys.readouterr().err                 # the progress bar starts there
    rows, enc = load_chunks(tmp_path / "w", REPS)
    assert np.array_equal(rows, clean_rows)
    assert np.array_equal(enc["dense_vecs"], clean["dense_vecs"])
    assert enc["lexical_weights"] == clean["lexical_weights"]
    assert all(np.array_equal(a, b) for a, b in zip(enc["colbert_vecs"], clean["colbert_vecs"]))


def test_another_plan_starts_over_and_a_missing_chunk_is_named(tmp_path):
    batches = _batches()
    encode_in_chunks(Encoder(), batches, REPS, tmp_path, "plan-a", chunk_texts=6)
    other = Encoder()
    encode_in_chunks(other, batches, REPS, tmp_path, "plan-b", chunk_texts=6)
    assert other.calls == len(batches)                                # nothing of plan-a was reused
    import shutil
    shutil.rmtree(tmp_path / "chunk-00002")
    with pytest.raises(ValueError, match="chunk 2 of 4 is missing"):
        load_chunks(tmp_path, REPS)


def test_a_dead_writers_half_chunk_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".chunk-00001.{temp_tag().rsplit('-', 1)[0]}-{pid}"
    live = tmp_path / f".chunk-00099.{temp_tag()}"                    # this process: alive
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "dense.npy").write_bytes(b"half")
    encode_in_chunks(Encoder(), _batches(), REPS, tmp_path, "p", chunk_texts=6, progress=False)
    assert not stale.exists() and live.exists()
