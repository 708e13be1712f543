"""Tests for bgem3_lib.training.data on the real MLQA dev files (read in place)."""
from __future__ import annotations

import functools
import json

import pytest

from bgem3_lib.paths import data_dir
from bgem3_lib.training.data import (
    MLQA_LANGS,
    TrainExample,
    build_examples,
    load_mlqa,
    mlqa_dir,
    mlqa_pairs,
    split_of,
    unique_texts,
)

PAIRS = [("de", "de"), ("en", "de"), ("en", "en")]


@functools.lru_cache(maxsize=None)
def rows():
    return load_mlqa(pairs=PAIRS)


@functools.lru_cache(maxsize=None)
def articles() -> dict:
    """(lang, paragraph) -> article title, read straight from the JSON files (independent of datasets)."""
    out = {}
    for c, q in PAIRS:
        doc = json.loads((data_dir() / "mlqa_dev" / f"dev-context-{c}-question-{q}.json").read_text())
        for art in doc["data"]:
            for par in art["paragraphs"]:
                out[c, par["context"]] = art["title"]
    return out


def test_rows_match_the_json_files():
    r = rows()
    assert set(zip(r["context_lang"], r["question_lang"])) == set(PAIRS)
    n = {}
    for c, q in PAIRS:
        doc = json.loads((data_dir() / "mlqa_dev" / f"dev-context-{c}-question-{q}.json").read_text())
        n[c, q] = sum(len(p["qas"]) for a in doc["data"] for p in a["paragraphs"])
    got = {}
    for c, q in zip(r["context_lang"], r["question_lang"]):
        got[c, q] = got.get((c, q), 0) + 1
    assert got == n


def test_examples_are_well_formed_and_negatives_come_from_the_same_article():
    ex = build_examples(rows(), n_negatives=3, seed=0, split="train")
    assert len(ex) > 1000
    same_article = 0
    for e in ex:
        assert e.query.startswith("query: ") and e.positive.startswith("passage: ")
        assert len(e.negatives) == 3 and e.positive not in e.negatives and len(set(e.negatives)) == 3
        title = articles()[e.context_lang, e.positive[9:]]
        same_article += sum(articles()[e.context_lang, n[9:]] == title for n in e.negatives)
    assert same_article > 0.2 * 3 * len(ex)          # hard negatives where the article allows
    kinds = {(e.query_lang == e.context_lang) for e in ex}
    assert kinds == {True, False}                     # monolingual and cross-lingual pairs


def test_seeded_and_deterministic():
    a = build_examples(rows(), 3, seed=0)
    b = build_examples(rows(), 3, seed=0)
    c = build_examples(rows(), 3, seed=1)
    assert a == b
    assert [e.negatives for e in a] != [e.negatives for e in c]
    assert [e.qid for e in a] == [e.qid for e in c]
    sub = build_examples(rows(), 3, seed=0, max_examples=50)
    assert len(sub) == 50 and set(sub) <= set(a)


def test_heldout_split_shares_no_article_paragraph_or_question():
    tr = build_examples(rows(), 2, seed=0, split="train")
    ho = build_examples(rows(), 2, seed=0, split="heldout")
    assert 0.03 < len(ho) / (len(tr) + len(ho)) < 0.25
    assert not {e.qid for e in tr} & {e.qid for e in ho}
    texts_tr = {t for e in tr for t in (e.positive, *e.negatives)}
    assert not texts_tr & {t for e in ho for t in (e.positive, *e.negatives)}
    assert split_of("NTSC") == split_of("NTSC") and split_of("x", 0) == "train"


def test_unique_texts_and_pairs():
    e = TrainExample("query: a", "passage: b", ("passage: c",), "1", "en", "en")
    f = TrainExample("query: d", "passage: c", ("passage: b",), "2", "de", "en")
    texts, groups = unique_texts([e, f])
    assert texts == ["query: a", "passage: b", "passage: c", "query: d"]
    assert groups == [(0, 1, 2), (3, 2, 1)]
    assert len(mlqa_pairs("all")) == 49 and len(mlqa_pairs("mono")) == 7 and len(mlqa_pairs("xling")) == 42
    assert set(MLQA_LANGS) == {"ar", "de", "en", "es", "hi", "vi", "zh"}


def test_evaluation_sets_and_bad_input_are_refused(tmp_path):
    with pytest.raises(ValueError, match="evaluation set"):
        mlqa_dir(data_dir() / "xquad")
    with pytest.raises(ValueError, match="evaluation set"):
        mlqa_dir(data_dir() / "tydiqa_goldp")
    with pytest.raises(FileNotFoundError):
        mlqa_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown MLQA"):
        load_mlqa(pairs=[("en", "fr")])
    with pytest.raises(ValueError, match="kind"):
        mlqa_pairs("both")
    with pytest.raises(ValueError, match="split"):
        build_examples(rows(), 3, split="test")
    with pytest.raises(ValueError, match="n_negatives"):
        build_examples(rows(), -1)
