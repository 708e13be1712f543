"""bgem3_lib.analysis.inspect_tokens against hand-worked examples, the library's own scorers and brute force."""
import re

import numpy as np
import pytest

from bgem3_lib.analysis.inspect_tokens import (
    best_window,
    document_frequency,
    flow_layout,
    gold_ranks,
    highlight_figure,
    highlight_html,
    matched_run,
    maxsim,
    maxsim_matrix,
    position_weights,
    shared_tokens,
    storage_bytes,
    text_pieces,
    token_weights,
)
from bgem3_lib.model.heads import sparse_embedding
from bgem3_lib.retrieval.scoring import colbert_score, lexical_matching_score


def _random_lexical(rng, vocab=30, nnz=6):
    ids = rng.choice(vocab, size=rng.integers(1, nnz + 1), replace=False)
    return {str(t): float(w) for t, w in zip(ids, rng.random(len(ids)))}


# ---------------------------------------------------------------- lexical pieces

def test_shared_tokens_sum_to_lexical_score():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q, p = _random_lexical(rng), _random_lexical(rng)
        rows = shared_tokens(q, p)
        assert sum(r[3] for r in rows) == pytest.approx(lexical_matching_score(q, p))
        assert [r[3] for r in rows] == sorted((r[3] for r in rows), reverse=True)
        assert {r[0] for r in rows} == set(q) & set(p)


def test_shared_tokens_by_hand_and_bad_input():
    assert shared_tokens({"1": 2.0, "2": 1.0}, {"2": 3.0, "1": 0.5}) == [("2", 1.0, 3.0, 3.0), ("1", 2.0, 0.5, 1.0)]
    assert shared_tokens({"1": 1.0}, {"3": 1.0}) == []
    with pytest.raises(TypeError, match="qw"):
        shared_tokens([("1", 1.0)], {})


def test_position_weights_spread_the_max_per_id():
    ids = np.array([0, 10, 11, 10, 2])
    raw = np.array([0.0, 0.5, 0.2, 0.9, 0.0], np.float32)
    lex = sparse_embedding(raw, ids, [0, 5], special_ids=(0, 1, 2, 3))[0]
    np.testing.assert_allclose(position_weights(ids, lex), [0, 0.9, 0.2, 0.9, 0])
    with pytest.raises(ValueError, match="1-D integer"):
        position_weights(np.array([[1, 2]]), lex)
    with pytest.raises(TypeError, match="dict"):
        position_weights(ids, [0.1])


def test_document_frequency():
    df = document_frequency([{"1": 0.2, "2": 0.1}, {"1": 0.5}, {}])
    assert df == {"1": 2, "2": 1}
    with pytest.raises(TypeError, match="list"):
        document_frequency({"1": 0.2})


# ---------------------------------------------------------------- ranks

def test_gold_ranks_match_a_sort_with_ties_against_gold():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 4, size=(30, 12)).astype(np.float32)         # many ties
    gold = rng.integers(0, 12, size=30)
    got = gold_ranks(s, gold)
    for row, g, r in zip(s, gold, got):
        order = sorted(range(12), key=lambda j: (-row[j], j == g))   # gold last among equals
        assert order.index(g) + 1 == r
    assert gold_ranks(np.zeros((1, 5)), [0]).tolist() == [5]


def test_gold_ranks_bad_input():
    with pytest.raises(ValueError, match="gold columns"):
        gold_ranks(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="integer column"):
        gold_ranks(np.zeros((2, 3)), [0.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        gold_ranks(np.array([[np.nan, 1.0]]), [0])


def test_matched_run_drops_zero_scores_only():
    s = np.array([[0.0, 0.3, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    run = matched_run(s, ["a", "b"], ["d0", "d1", "d2", "d3"], k=3)
    assert run == {"a": {"d1": 3.0, "d3": 2.0}, "b": {}}


# ---------------------------------------------------------------- drawing

def test_highlight_html_opacity_and_escaping():
    out = highlight_html(["<s>", "\u2581a<b", "c", "\u2581d", "</s>"], [9.0, 0.5, 0.25, 0.0, 9.0], vmax=0.5,
                         label="x & y", legend=False)
    alphas = [float(a) for a in re.findall(r"rgba\(214,39,40,([0-9.]+)\)", out)]
    assert alphas == [1.0, 0.5, 0.0]                         # specials skipped, weight / vmax
    assert ">a&lt;b</span><span" in out                      # "c" continues the word: no space
    assert "<b>x &amp; y</b>" in out and "&lt;s&gt;" not in out
    assert out.count(" <span") == 2                          # word starts become spaces between spans
    assert "linear-gradient" in highlight_html(["\u2581a"], [1.0])


def test_highlight_html_bad_input():
    with pytest.raises(ValueError, match="2 pieces"):
        highlight_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        highlight_html(["a"], [-1.0])
    with pytest.raises(ValueError, match=">= 0"):
        highlight_html(["a"], [np.nan])


def test_flow_layout_by_hand():
    assert flow_layout([" The", " cat", "s", " sat"], width=8) == [(0, 0, "The"), (0, 3, " cat"), (0, 7, "s"),
                                                                    (1, 0, "sat")]
    assert flow_layout([], 5) == []
    with pytest.raises(ValueError, match="width"):
        flow_layout(["a"], 0)


def test_highlight_figure_colours_follow_weights():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = highlight_figure([("q", ["<s>", "\u2581a", "\u2581b", "</s>"], [0, 1.0, 0.0, 0]),
                            ("p", ["\u2581c"] * 30, np.linspace(0, 2, 30))], vmax=1.0, width=20)
    ax_q, ax_p = fig.axes[:2]
    assert len(ax_q.patches) == 2 and len(ax_p.patches) == 30
    cmap = plt.get_cmap("Reds")
    np.testing.assert_allclose(ax_q.patches[0].get_facecolor(), cmap(1.0))
    np.testing.assert_allclose(ax_q.patches[1].get_facecolor(), cmap(0.0))
    assert max(-p.get_y() for p in ax_p.patches) > 1          # 30 x " c" does not fit one 20-cell line
    plt.close(fig)


# ---------------------------------------------------------------- late interaction and cost

def test_maxsim_equals_colbert_score():
    rng = np.random.default_rng(2)
    for n, m in ((1, 1), (3, 7), (9, 4)):
        q, p = rng.standard_normal((n, 8)), rng.standard_normal((m, 8))
        sim = maxsim_matrix(q, p)
        best, values, score = maxsim(sim)
        assert sim.shape == (n, m)
        np.testing.assert_allclose(values, sim.max(axis=1))
        assert score == pytest.approx(colbert_score(q, p), rel=1e-6)
        assert (sim[np.arange(n), best] == values).all()
    with pytest.raises(ValueError, match="one H"):
        maxsim_matrix(np.ones((2, 3)), np.ones((2, 4)))


def test_best_window_by_hand():
    sim = np.zeros((3, 10))
    sim[0, 2], sim[1, 3], sim[2, 8] = 1.0, 0.5, 2.0          # maxima at columns 2, 3, 8
    assert best_window(sim, 2) == 2                           # two maxima beat one larger one
    assert best_window(sim, 1) == 8                           # one each: the larger maximum wins
    assert best_window(sim, 20) == 0
    with pytest.raises(ValueError, match="width"):
        best_window(sim, 0)


def test_storage_bytes_by_hand():
    enc = {"dense_vecs": np.zeros((2, 384), np.float32), "lexical_weights": [{"1": 0.1, "2": 0.3}, {}],
           "colbert_vecs": [np.zeros((5, 384)), np.zeros((1, 384))]}
    out = storage_bytes(enc, value_bytes=2, id_bytes=4)
    assert out["dense"].tolist() == [768, 768]
    assert out["sparse"].tolist() == [12, 0]
    assert out["colbert"].tolist() == [5 * 384 * 2, 384 * 2]
    assert set(storage_bytes({"dense_vecs": np.zeros((1, 4))})) == {"dense"}
    with pytest.raises(ValueError, match="no dense_vecs"):
        storage_bytes({"colbert_vecs": None})


# ---------------------------------------------------------------- with a (tiny random) model

@pytest.fixture(scope="module")
def tiny():
    from tiny_m3 import tiny_model_dir

    from bgem3_lib.model.bgem3 import BGEM3
    return BGEM3(str(tiny_model_dir()))


def test_token_weights_reduce_to_the_models_lexical_weights(tiny):
    texts = ["the cat and the dog and the cat", "Привет мир", "x"]
    raw = token_weights(tiny, texts, max_length=32)
    lex = tiny.encode(texts, max_length=32, return_sparse=True, return_dense=False)["lexical_weights"]
    for text, w, expected in zip(texts, raw, lex):
        ids, pieces = text_pieces(tiny.tokenizer, text, 32)
        assert w.shape == ids.shape and len(pieces) == len(ids) and pieces[0] == "<s>" and pieces[-1] == "</s>"
        assert (w >= 0).all()
        got = sparse_embedding(w, ids, [0, len(ids)], tiny.special_ids)[0]
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[k] for k in got], [expected[k] for k in got], rtol=1e-5, atol=1e-6)
        pos = position_weights(ids, expected)
        for t in set(ids.tolist()) - set(tiny.special_ids):     # each position shows its id's max
            assert pos[ids == t].max() == pytest.approx(w[ids == t].max(), abs=1e-6)


def test_token_weights_bad_input(tiny):
    with pytest.raises(ValueError, match="empty"):
        token_weights(tiny, ["ok", "  "])
    with pytest.raises(ValueError, match="non-empty string"):
        text_pieces(tiny.tokenizer, "", 8)

    class Dense:
        heads, source = None, "dense-only"
    with pytest.raises(ValueError, match="no sparse head"):
        token_weights(Dense(), ["a"])
