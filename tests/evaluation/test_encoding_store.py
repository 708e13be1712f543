"""Encoding folders: bit-exact round trips, shard re-ordering, corrupt files named."""
from __future__ import annotations

import numpy as np
import pytest

from bgem3_lib.evaluation.encoding_store import (
    arrays_to_lexical,
    encodings_to_npz,
    gather_rows,
    lexical_to_arrays,
    load_encodings,
    save_encodings,
    stored_reps,
)


def _random_encodings(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lexical = [{str(int(t)): float(np.float32(rng.random()))
                for t in rng.permutation(300)[: rng.integers(0, 6)]} for _ in range(n)]
    return {"dense_vecs": rng.standard_normal((n, 4)).astype(np.float32),
            "lexical_weights": lexical,
            "colbert_vecs": [rng.standard_normal((int(rng.integers(1, 5)), 3)).astype(np.float32)
                             for _ in range(n)]}


def _assert_same(a: dict, b: dict) -> None:
    assert a["dense_vecs"].dtype == b["dense_vecs"].dtype and np.array_equal(a["dense_vecs"], b["dense_vecs"])
    assert [list(d.items()) for d in a["lexical_weights"]] == [list(d.items()) for d in b["lexical_weights"]]
    assert len(a["colbert_vecs"]) == len(b["colbert_vecs"])
    assert all(np.array_equal(x, y) for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]))


def test_round_trip_is_bit_exact_and_keeps_key_order(tmp_path):
    enc = _random_encodings(7)
    assert save_encodings(enc, tmp_path) == ["dense", "sparse", "colbert"]
    assert stored_reps(tmp_path) == {"dense", "sparse", "colbert"}
    _assert_same(load_encodings(tmp_path), enc)
    _assert_same(load_encodings(tmp_path, mmap=True), enc)


def test_lexical_arrays_by_hand_and_float64_kept_when_needed():
    indptr, indices, data = lexical_to_arrays([{"9": 1.0, "2": 0.25}, {}, {"7": 0.1}])
    assert indptr.tolist() == [0, 2, 2, 3] and indices.tolist() == [9, 2, 7]
    assert data.dtype == np.float64                 # 0.1 is not a float32 value: stored losslessly
    assert arrays_to_lexical(indptr, indices, data) == [{"9": 1.0, "2": 0.25}, {}, {"7": 0.1}]
    assert lexical_to_arrays([{"3": 0.5}])[2].dtype == np.float32
    with pytest.raises(ValueError, match="NaN"):
        lexical_to_arrays([{"3": float("nan")}])


def test_gather_rows_restores_corpus_order_and_rejects_gaps():
    enc = _random_encodings(5, seed=1)
    rows_a, rows_b = np.array([4, 0, 2]), np.array([1, 3])

    def take(rows):
        return {"dense_vecs": enc["dense_vecs"][rows],
                "lexical_weights": [enc["lexical_weights"][i] for i in rows],
                "colbert_vecs": [enc["colbert_vecs"][i] for i in rows]}
    _assert_same(gather_rows([(rows_a, take(rows_a)), (rows_b, take(rows_b))], 5), enc)
    with pytest.raises(ValueError, match="exactly once"):
        gather_rows([(rows_a, take(rows_a)), (rows_a[:2], take(rows_a[:2]))], 5)


def test_missing_and_corrupt_files_are_named(tmp_path):
    save_encodings({"dense_vecs": np.ones((2, 3), np.float32)}, tmp_path)
    with pytest.raises(FileNotFoundError, match="no stored \\['sparse'\\]"):
        load_encodings(tmp_path, ["dense", "sparse"])
    (tmp_path / "dense.npy").write_bytes((tmp_path / "dense.npy").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_encodings(tmp_path)


def test_npz_holds_all_arrays(tmp_path):
    enc = _random_encodings(3, seed=2)
    path = encodings_to_npz(enc, tmp_path / "out.npz")
    with np.load(path) as z:
        assert set(z.files) == {"dense", "sparse_indptr", "sparse_indices", "sparse_data", "colbert",
                                "colbert_offsets"}
        assert np.array_equal(z["dense"], enc["dense_vecs"])
        lengths = [len(v) for v in enc["colbert_vecs"]]
        assert z["colbert_offsets"].tolist() == [0] + np.cumsum(lengths).tolist()
