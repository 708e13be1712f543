"""The fused ColBERT kernel (kernels/maxsim.py) against float64 NumPy and against colbert_rerank's NumPy form."""
import numpy as np
import pytest

from bgem3_lib.kernels import maxsim
from bgem3_lib.retrieval import index

pytestmark = pytest.mark.skipif(not maxsim.available(), reason="the fused ColBERT kernel needs AVX-512 and g++")


def reference(q_vecs, doc_vecs, cand):
    """s_mul in float64, pair by pair."""
    out = np.full(cand.shape, -np.inf)
    for i, row in enumerate(cand):
        for t, j in enumerate(row):
            if j >= 0:
                out[i, t] = (q_vecs[i].astype(np.float64) @ doc_vecs[j].T.astype(np.float64)).max(axis=1).mean()
    return out


def case(h, q_lengths, d_lengths, k, seed=0):
    rng = np.random.default_rng(seed)
    qs = [rng.standard_normal((n, h)).astype(np.float32) for n in q_lengths]
    ds = [rng.standard_normal((m, h)).astype(np.float32) for m in d_lengths]
    cand = rng.integers(-1, len(ds), (len(qs), k))
    cand[0, :2] = [0, 0]                                  # a candidate named twice
    return qs, ds, cand


@pytest.mark.parametrize("h", [16, 48, 384])
def test_matches_float64_at_every_blocking_edge(h):
    # query chunks of 16 and 32 lanes (1, 15-17, 31-33, 70 tokens), document rows in blocks of 12, 4 and 1
    qs, ds, cand = case(h, (1, 15, 16, 17, 31, 32, 33, 70), (1, 3, 4, 5, 11, 12, 13, 16, 24, 25, 29), 9)
    got = maxsim.maxsim_scores(qs, ds, cand)
    want = reference(qs, ds, cand)
    assert got.dtype == np.float32 and got.shape == cand.shape
    assert np.array_equal(np.isneginf(got), cand < 0)
    # float32 sums of h products of unit normals: measured errors up to ~1e-5 at h = 384
    np.testing.assert_allclose(got[cand >= 0], want[cand >= 0], rtol=0, atol=h * 1.25e-7)


def test_colbert_rerank_takes_the_kernel_and_agrees_with_its_numpy_form(monkeypatch):
    qs, ds, cand = case(32, (3, 9, 20, 1, 40), [int(m) for m in np.random.default_rng(1).integers(1, 40, 60)], 12)
    fused = index.colbert_rerank(qs, ds, cand)
    calls = []
    monkeypatch.setattr(maxsim, "maxsim_scores", lambda *a: calls.append(a) or fused)
    index.colbert_rerank(qs, ds, cand)
    assert len(calls) == 1                                # the kernel serves colbert_rerank here
    monkeypatch.setattr(maxsim, "supports", lambda width: False)
    numpy_form = index.colbert_rerank(qs, ds, cand)
    assert len(calls) == 1
    np.testing.assert_allclose(fused, numpy_form, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused_with_the_numpy_form_messages():
    qs, ds, cand = case(16, (2, 3), (4, 5, 6), 3)
    bad = [d.copy() for d in ds]
    bad[1][2, 3] = np.nan
    with pytest.raises(ValueError, match="doc_vecs: contains NaN"):
        index.colbert_rerank(qs, bad, np.array([[1], [0]]))
    index.colbert_rerank(qs, bad, np.array([[0], [2]]))   # a document nobody asks for is not read
    with pytest.raises(ValueError, match="q_vecs: contains NaN"):
        index.colbert_rerank([qs[0], np.full((1, 16), np.inf, np.float32)], ds, np.array([[0], [1]]))
    with pytest.raises(ValueError, match="hidden sizes differ"):
        index.colbert_rerank([np.ones((1, 32), np.float32), qs[1]], ds, np.array([[0], [1]]))
    with pytest.raises(ValueError, match=r"doc_vecs\[0\]"):
        index.colbert_rerank(qs, [np.zeros((0, 16), np.float32), *ds[1:]], np.array([[0], [1]]))


def test_maxsim_scores_checks_its_own_boundary():
    qs, ds, cand = case(16, (2, 3), (4, 5), 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        maxsim.maxsim_scores([q[:, :8] for q in qs], [d[:, :8] for d in ds], cand)
    with pytest.raises(ValueError, match=r"\[Nq, K\]"):
        maxsim.maxsim_scores(qs, ds, cand[:1])
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        maxsim.maxsim_scores(qs, ds, np.array([[0], [2]]))
    with pytest.raises(ValueError, match="non-empty"):
        maxsim.maxsim_scores([qs[0], qs[1][:0]], ds, np.array([[0], [1]]))
    with pytest.raises(ValueError, match=r"doc_vecs\[1\]"):
        maxsim.maxsim_scores(qs, [ds[0], ds[1][:, :0]], np.array([[0], [1]]))
    assert maxsim.maxsim_scores([], ds, np.zeros((0, 3), np.int64)).shape == (0, 3)
