"""bgem3_lib.evaluation.offline_sets on the real TyDi GoldP / XQuAD files: sizes, languages, determinism."""
import json

import pytest

from bgem3_lib.evaluation import offline_sets as osets
from bgem3_lib.paths import data_dir
from bgem3_lib.retrieval.metrics import answer_recall_at_k

TYDI_SIZES = {  # (questions, distinct gold passages) of TyDi QA GoldP v1.1 dev
    "ar": (921, 842), "bn": (113, 105), "en": (440, 429), "fi": (782, 634), "id": (565, 514),
    "ko": (276, 228), "ru": (812, 778), "sw": (499, 357), "te": (669, 601),
}


def test_language_lists():
    assert osets.TYDI_LANGS == tuple(sorted(TYDI_SIZES))
    assert len(osets.XQUAD_LANGS) == 12 and len(osets.XQUAD_XLING_LANGS) == 11
    assert "en" not in osets.XQUAD_XLING_LANGS
    on_disk = sorted(p.name.split(".")[1] for p in (data_dir() / "xquad").glob("xquad.*.json"))
    assert tuple(on_disk) == osets.XQUAD_LANGS


@pytest.mark.parametrize("lang", osets.TYDI_LANGS)
def test_tydi_sizes_and_gold_passages(lang):
    s = osets.load_tydi(lang)
    assert (len(s.queries), len(s.corpus)) == TYDI_SIZES[lang]
    assert len(set(s.corpus.values())) == len(s.corpus)  # identical passages were merged
    assert set(s.qrels) == set(s.queries) and s.answers is None
    raw = json.loads((data_dir() / "tydiqa_goldp" / f"tydiqa.goldp.{lang}.dev.json").read_text("utf-8"))
    gold = {qa["id"]: p["context"] for a in raw["data"] for p in a["paragraphs"] for qa in p["qas"]}
    for qid, docs in s.qrels.items():
        (docid, rel), = docs.items()
        assert rel == 1 and s.corpus[docid] == gold[qid]
    assert "MIRACL" in s.note and str(len(s.corpus)) in s.note


def test_xquad_xling_structure():
    s = osets.load_xquad_xling("zh")
    assert (len(s.queries), len(s.corpus), len(s.qrels)) == (1190, 240, 1190)
    assert list(s.corpus)[:2] == ["Super_Bowl_50#0", "Super_Bowl_50#1"]
    raw = json.loads((data_dir() / "xquad" / "xquad.en.json").read_text("utf-8"))
    assert list(s.corpus.values()) == [p["context"] for a in raw["data"] for p in a["paragraphs"]]
    qid = next(iter(s.queries))
    assert s.answers[qid] == ["308"] and s.answers_native[qid] == ["308"]
    assert all(s.answers[q] and s.answers_native[q] for q in s.queries)
    assert "MKQA" in s.note and "240" in s.note


@pytest.mark.parametrize("lang", osets.XQUAD_XLING_LANGS)
def test_xquad_xling_every_language(lang):
    s = osets.load_xquad_xling(lang)
    assert (len(s.queries), len(s.corpus)) == (1190, 240)
    assert list(s.queries) == list(osets.load_xquad_xling("de").queries)  # parallel ids, same order
    assert len({d for docs in s.qrels.values() for d in docs}) == 240


def test_english_answers_are_in_their_english_gold_paragraph():
    s = osets.load_xquad_xling("th")
    qids = list(s.queries)
    gold = [[s.corpus[next(iter(s.qrels[q]))]] for q in qids]
    recall = answer_recall_at_k(gold, [s.answers[q] for q in qids], 1)
    assert recall > 0.99  # answers are spans of the English paragraph (1 of 1190 cut mid-word)


@pytest.mark.parametrize("lang", osets.XQUAD_LANGS)
def test_xquad_longdoc_sizes(lang):
    s = osets.load_xquad_longdoc(lang)
    assert (len(s.queries), len(s.corpus)) == (1190, 48)
    assert list(s.corpus)[0] == "Super_Bowl_50"
    raw = json.loads((data_dir() / "xquad" / f"xquad.{lang}.json").read_text("utf-8"))
    joined = ["\n\n".join(p["context"] for p in a["paragraphs"]) for a in raw["data"]]
    assert list(s.corpus.values()) == joined
    assert sum(doc.count("\n\n") + 1 for doc in s.corpus.values()) == 240
    assert "MLDR" in s.note and "48" in s.note


def test_longdoc_documents_in_question_language():
    ru, xl = osets.load_xquad_longdoc("ru"), osets.load_xquad_xling("ru")
    assert ru.queries == xl.queries
    assert any("\u0400" <= ch <= "\u04ff" for ch in ru.corpus["Warsaw"])


def test_deterministic():
    a, b = osets.load_tydi("sw"), osets.load_tydi("sw")
    assert a == b and list(a.corpus) == list(b.corpus) and list(a.queries) == list(b.queries)
    a.queries.clear()  # callers may mutate their copy
    assert len(osets.load_tydi("sw").queries) == 499


def test_describe():
    text = osets.describe(osets.load_xquad_longdoc("hi"))
    assert text.startswith("xquad-longdoc [hi]: 1190 queries, 48 documents")
    assert "1190 relevance judgements" in text and "MLDR" in text


@pytest.mark.parametrize("call, lang", [(osets.load_tydi, "de"), (osets.load_xquad_xling, "en"),
                                        (osets.load_xquad_longdoc, "fr")])
def test_unknown_language(call, lang):
    with pytest.raises(ValueError, match="known: "):
        call(lang)


def test_missing_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BGEM3_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tydiqa.goldp.sw.dev.json"):
        osets.load_tydi("sw")
