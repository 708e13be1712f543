"""bgem3_lib.retrieval.modes: the one mode vocabulary, weight validator and fusion, against hand-worked values."""
import math

import numpy as np
import pytest

from bgem3_lib.retrieval.modes import (
    ALIASES,
    FLAGEMBEDDING_KEYS,
    MODES,
    NEEDS,
    PAPER_WEIGHTS,
    canonical_mode,
    check_weights,
    fuse,
    fuse_all,
    needed_representations,
    paper_weights,
    parse_modes,
)


def test_vocabulary_and_aliases():
    assert MODES == ("dense", "sparse", "colbert", "dense+sparse", "all")
    assert {canonical_mode(a) for a in ALIASES} <= set(MODES)
    assert [canonical_mode(FLAGEMBEDDING_KEYS[m]) for m in MODES] == list(MODES)
    assert set(NEEDS) == set(MODES)
    with pytest.raises(ValueError, match="unknown mode 'hybrid'.*dense, sparse"):
        canonical_mode("hybrid")
    assert parse_modes("all, colbert+sparse+dense ,dense") == ["all", "dense"]
    with pytest.raises(ValueError, match="no mode"):
        parse_modes(" , ")
    assert needed_representations(["dense+sparse", "colbert"]) == ["dense", "sparse", "colbert"]


@pytest.mark.parametrize(("bad", "match"), [
    ((1.0, 0.3), "got 2 values"), ((1.0, -0.3, 1.0), ">= 0"), ((math.nan, 0.2, 0.4), "finite"),
    ((math.inf, 0.2, 0.4), "finite"), ((0, 0, 0), "all zero"), ("1,a,2", "three numbers"), (None, "three numbers"),
    (0.5, "three numbers"),
])
def test_check_weights_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        check_weights(bad)


def test_check_weights_accepts_text_and_sequences():
    assert check_weights("0.2, 0.8,0") == (0.2, 0.8, 0.0)
    assert check_weights(np.array([1, 0, 0])) == (1.0, 0.0, 0.0)


def test_fuse_hand_worked():
    w = (1.0, 0.3, 1.0)
    assert fuse("dense", w, dense=0.5) == 0.5
    assert fuse("dense+sparse", w, dense=0.5, sparse=0.2) == pytest.approx(0.56)
    assert fuse("all", w, dense=0.5, sparse=0.2, colbert=0.4) == pytest.approx(0.96)
    # FlagEmbedding's compute_score: divided by the weights the mode uses
    assert fuse("sparse+dense", w, dense=0.5, sparse=0.2, normalize=True) == pytest.approx(0.56 / 1.3)
    assert fuse("all", w, dense=0.5, sparse=0.2, colbert=0.4, normalize=True) == pytest.approx(0.96 / 2.3)
    out = fuse_all((1, 1, 1), np.array([0.9, 0.1]), np.array([0.0, 0.6]), np.array([0.3, 0.3]))
    np.testing.assert_allclose(out["dense+sparse"], [0.45, 0.35])
    np.testing.assert_allclose(out["all"], [0.4, 1.0 / 3])
    with pytest.raises(ValueError, match="needs the colbert"):
        fuse("all", w, dense=0.5, sparse=0.2)
    with pytest.raises(ValueError, match="zero weight sum"):
        fuse("dense+sparse", (0, 0, 1), dense=0.5, sparse=0.2, normalize=True)


def test_fuse_keeps_float32():
    d = np.array([0.1, 0.2], np.float32)
    assert fuse("all", (1.0, 0.3, 1.0), dense=d, sparse=d, colbert=d).dtype == np.float32


def test_paper_weights_defined_once_and_valid():
    for bench, modes in PAPER_WEIGHTS.items():
        for mode, w in modes.items():
            assert check_weights(w) == w and paper_weights(bench, mode) == w
    assert paper_weights("mldr", "all") == (0.15, 0.5, 0.35)
    assert paper_weights("miracl", "sparse+dense") == (1.0, 0.3, 0.0)
    with pytest.raises(ValueError, match="benchmark"):
        paper_weights("msmarco", "all")
