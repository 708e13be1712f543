"""The pure parts of the M3-small recipe (the full run takes minutes and is not run here): the token-budget
selection of article groups on small synthetic rows (hand-worked budgets and brute-force properties), the
head initialisation against a NumPy ridge regression and a hand count of document frequencies, and the
default output folders under a temporary BGEM3_HOME."""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from bgem3_lib.training.recipe import M3SmallRecipe, _select_rows, default_out, init_heads, select_examples


def is_heldout(title: str) -> bool:
    """The held-out rule re-derived: 10 % of titles by the SHA-1 of the English title."""
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % 100 < 10


def titles(split: str, n: int, prefix: str = "Article") -> list[str]:
    want = split == "heldout"
    return list(itertools.islice((t for t in (f"{prefix} {i}" for i in itertools.count()) if is_heldout(t) == want),
                                 n))


# ---------------------------------------------------------------- _select_rows


def _rows(groups: dict) -> dict:
    """{title: [context per row]} -> columns; a context listed twice is two questions on one paragraph."""
    return {"en_title": [t for t, cs in groups.items() for _ in cs],
            "context": [c for cs in groups.values() for c in cs]}


def test_shared_paragraphs_count_once_and_too_big_groups_are_skipped():
    a, b, c = titles("train", 3)
    (h,) = titles("heldout", 1)
    rows = _rows({a: ["x", "y", "x"], b: ["x", "z"], c: ["w"], h: ["v"]})
    lengths = {"x": 5, "y": 3, "z": 3, "w": 100, "v": 1}
    for seed in range(10):
        # A costs x + y = 8, B only adds z = 3 (x is shared): 11 fits although 8 + 8 = 16 would not;
        # C (100) never fits whatever its place in the order, and does not stop the search.
        idx, used = _select_rows(rows, "train", 11, lengths, seed)
        assert (idx, used) == ([0, 1, 2, 3, 4], 11), seed
    for seed in range(4):                      # 10: whichever of A, B comes first (8), the other adds 3
        assert _select_rows(rows, "train", 10, lengths, seed) in (([0, 1, 2], 8), ([3, 4], 8))
    assert _select_rows(rows, "train", 2, lengths, 0) == ([], 0)
    assert _select_rows(rows, "heldout", 1, lengths, 0) == ([6], 1)
    assert _select_rows(rows, "heldout", 0, lengths, 0) == ([], 0)
    assert _select_rows(rows, "train", 10**6, lengths, 0) == ([0, 1, 2, 3, 4, 5], 111)


def test_budget_properties_on_random_disjoint_groups():
    rng = np.random.default_rng(0)
    names = titles("train", 30) + titles("heldout", 4)
    groups = {t: [f"{t}/p{j}" for j in range(rng.integers(1, 4))] for t in names}
    rows = _rows(groups)
    lengths = {c: int(rng.integers(5, 60)) for cs in groups.values() for c in cs}
    cost = {t: sum(lengths[c] for c in cs) for t, cs in groups.items()}
    train = [t for t in names if not is_heldout(t)]
    for seed, budget in [(0, 300), (1, 300), (2, 57), (3, 1000)]:
        idx, used = _select_rows(rows, "train", budget, lengths, seed)
        assert idx == sorted(idx) and used <= budget
        chosen = {rows["en_title"][i] for i in idx}
        assert chosen <= set(train)
        assert idx == [i for i, t in enumerate(rows["en_title"]) if t in chosen]     # whole groups only
        assert used == sum(cost[t] for t in chosen)
        # greedy: every group left out would not have fitted next to the ones taken
        assert all(used + cost[t] > budget for t in train if t not in chosen), (seed, budget)
        assert _select_rows(rows, "train", budget, lengths, seed) == (idx, used)   # seeded, repeatable


def test_order_of_groups_depends_on_the_seed():
    names = titles("train", 6)
    rows = _rows({t: [t + "/p"] for t in names})
    lengths = {t + "/p": 10 for t in names}
    picks = [_select_rows(rows, "train", 10, lengths, seed) for seed in range(12)]
    assert all(used == 10 and len(idx) == 1 for idx, used in picks)
    assert len({idx[0] for idx, _ in picks}) >= 3          # a seeded shuffle, not the sorted title order


# ---------------------------------------------------------------- select_examples


class WordTokenizer:
    """Stand-in tokenizer: a text is <s> + one token per word + </s>, cut at max_length; records calls."""

    def __init__(self):
        self.calls = []

    def encode_ids(self, texts, max_length, warn=True):
        self.calls.append((list(texts), max_length, warn))
        return [[0] * min(len(t.split()) + 2, max_length) for t in texts]


def _mlqa_like(n_train: int = 8, n_heldout: int = 3, paragraphs: int = 4):
    import datasets

    rng = np.random.default_rng(1)
    rows = []
    for t in titles("train", n_train) + titles("heldout", n_heldout):
        for j in range(paragraphs):
            ctx = f"{t} paragraph {j} " + " ".join(["word"] * int(rng.integers(1, 30)))
            for k in range(2):
                rows.append({"qid": f"{t}-{j}-{k}", "question": f"question {k} on {t} {j}?", "context": ctx,
                             "title": t, "context_lang": "en", "question_lang": "en", "en_title": t})
    return datasets.Dataset.from_list(rows)


def _length(text: str, r: M3SmallRecipe) -> int:
    return min(len(text.split()) + 2, r.passage_max_len)


def test_select_examples_respects_splits_budgets_and_caps():
    rows = _mlqa_like()
    r = M3SmallRecipe(passage_tokens=150, heldout_tokens=60, max_train_queries=10, heldout_queries=5,
                      n_negatives=2, passage_max_len=20, seed=3)
    tok = WordTokenizer()
    train, held = select_examples(rows, tok, r)
    (texts, max_len, warn), = tok.calls
    assert max_len == 20 and warn is False
    assert sorted(texts) == sorted({"passage: " + c for c in rows["context"]})
    for examples, budget, cap, heldout in ((train, 150, 10, False), (held, 60, 5, True)):
        assert 0 < len(examples) <= cap
        title_of = dict(zip(rows["qid"], rows["en_title"]))
        assert all(is_heldout(title_of[e.qid]) == heldout for e in examples)
        passages = {p for e in examples for p in (e.positive, *e.negatives)}
        assert all(p.startswith("passage: ") for p in passages) and all(len(e.negatives) == 2 for e in examples)
        assert sum(_length(p, r) for p in passages) <= budget
        assert all(e.query.startswith("query: ") for e in examples)
    again = select_examples(rows, WordTokenizer(), r)
    assert again == (train, held)


def test_select_examples_with_room_for_everything():
    rows = _mlqa_like(n_train=4, n_heldout=2)
    r = M3SmallRecipe(passage_tokens=10**6, heldout_tokens=10**6, max_train_queries=10**6,
                      heldout_queries=10**6, n_negatives=3, passage_max_len=20)
    train, held = select_examples(rows, WordTokenizer(), r)
    assert len(train) == 4 * 4 * 2 and len(held) == 2 * 4 * 2           # every question of each split
    for e in train + held:                                              # negatives: the article's 3 others
        assert len({e.positive, *e.negatives}) == 4
        assert all(n.split(" paragraph ")[0] == e.positive.split(" paragraph ")[0] for n in e.negatives)


# ---------------------------------------------------------------- init_heads


def _corpus(seed: int = 0, H: int = 6):
    rng = np.random.default_rng(seed)
    ids = [np.r_[0, rng.integers(3, 15, rng.integers(2, 12)), 2] for _ in range(12)]
    ids[4][2] = 3                                          # an <unk> inside: special, never a training row
    states = [rng.normal(size=(len(t), H)) + np.linspace(1, 2, H) for t in ids]   # non-zero mean
    return ids, states


@pytest.mark.parametrize("colbert_dim, ridge", [(None, 1.0), (4, 0.5)])
def test_init_heads_against_numpy_ridge(colbert_dim, ridge):
    from bgem3_lib.model.heads import M3Heads

    H, special, scale = 6, (0, 2, 1, 3), 0.3
    ids, states = _corpus(0, H)
    passages = [1, 2, 4, 5, 7, 8, 9, 11]                   # a subset: 0, 3, 6, 10 stand for queries
    heads = M3Heads(H, colbert_dim)
    info = init_heads(heads, lambda i: states[i], ids, passages, special, scale, ridge=ridge)

    # reference: hand-counted document frequencies over the passages only, idf / max idf * scale
    n = len(passages)
    df = {t: sum(t in set(ids[i].tolist()) for i in passages) for t in range(3, 15)}
    X = np.concatenate([states[i][~np.isin(ids[i], special)] for i in passages])
    y = np.concatenate([[scale * np.log((n + 1) / (df[int(t)] + 1)) / np.log(n + 1)
                         for t in ids[i] if t not in special] for i in passages])
    assert info["tokens"] == len(y) == sum(int((~np.isin(ids[i], special)).sum()) for i in passages)
    # ridge on centred states with an intercept column, every coefficient penalised: solved as the
    # least-squares problem [Xc 1; sqrt(ridge) I] s ~ [y; 0]
    mean = X.mean(0)
    design = np.c_[X - mean, np.ones(len(X))]
    s, *_ = np.linalg.lstsq(np.r_[design, np.sqrt(ridge) * np.eye(H + 1)], np.r_[y, np.zeros(H + 1)], rcond=None)
    w_ref, b_ref = s[:-1], s[-1] - mean @ s[:-1]
    np.testing.assert_allclose(heads.sparse_linear.weight.asnumpy(), w_ref[None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(heads.sparse_linear.bias.asnumpy(), [b_ref], rtol=1e-5, atol=1e-6)
    assert info["idf_fit_corr"] == pytest.approx(np.corrcoef(X @ w_ref + b_ref, y)[0, 1], rel=1e-6)

    D = colbert_dim or H
    np.testing.assert_array_equal(heads.colbert_linear.weight.asnumpy(), np.eye(D, H))
    np.testing.assert_allclose(heads.colbert_linear.bias.asnumpy(), -mean[:D], rtol=1e-6)
    # the ColBERT projection of the training tokens is centred
    proj = X @ heads.colbert_linear.weight.asnumpy().T.astype(np.float64) + heads.colbert_linear.bias.asnumpy()
    np.testing.assert_allclose(proj.mean(0), 0, atol=1e-6)


def test_init_heads_small_ridge_is_least_squares_on_idf():
    from bgem3_lib.model.heads import M3Heads

    H = 5
    ids, _ = _corpus(2, H)
    passages = list(range(12))
    rng = np.random.default_rng(5)
    n = len(passages)
    df = {t: sum(t in set(x.tolist()) for x in ids) for t in range(3, 15)}
    idf = {t: 0.3 * np.log((n + 1) / (d + 1)) / np.log(n + 1) for t, d in df.items()}
    # states that carry a token's idf linearly (plus noise): the fit should recover it closely
    direction = rng.normal(size=H)
    states = [np.array([idf.get(int(t), 0.0) * direction / (direction @ direction) + 1e-3 * rng.normal(size=H)
                        + 1.0 for t in x]) for x in ids]
    heads = M3Heads(H)
    info = init_heads(heads, lambda i: states[i], ids, passages, (0, 1, 2, 3), 0.3, ridge=1e-9)
    X = np.concatenate([s[~np.isin(x, (0, 1, 2, 3))] for s, x in zip(states, ids)])
    y = np.concatenate([[idf[int(t)] for t in x if t > 3] for x in ids])
    sol, *_ = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)        # plain OLS with intercept
    pred = X @ heads.sparse_linear.weight.asnumpy()[0].astype(np.float64) + heads.sparse_linear.bias.asnumpy()[0]
    np.testing.assert_allclose(pred, np.c_[X, np.ones(len(X))] @ sol, atol=1e-4)
    assert info["idf_fit_corr"] > 0.95 and y.max() < 0.3 and y.min() >= 0


# ---------------------------------------------------------------- default_out


def test_default_out_under_bgem3_home(tmp_path, monkeypatch):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path))
    assert default_out(True) == tmp_path / "models" / "m3-small"
    assert default_out(False) == tmp_path / "models" / "m3-small-nosd"
    assert not (tmp_path / "models").exists()                  # only a path: nothing is created


def test_recipe_defaults_are_serialisable():
    import json
    from dataclasses import asdict

    r = M3SmallRecipe()
    assert json.loads(json.dumps(asdict(r)))["boundaries"] == [32, 64, 96, 128, 160]
    assert r.passage_max_len == max(r.boundaries) and r.warmup_steps < r.steps
