"""Small evaluation sets built from real text in ``data_dir()``, standing in for the paper's benchmarks.

None of this text is used for training (that is ``mlqa_dev`` only). Each set mirrors one benchmark's
task, at a far smaller scale, so its scores are NOT comparable to the paper's tables:

* :func:`load_tydi` (MIRACL-style, monolingual): TyDi QA GoldP dev questions of one language against
  all distinct GoldP passages of that language; the question's gold passage is relevant.
* :func:`load_xquad_xling` (MKQA-style, cross-lingual): XQuAD questions in one of 11 non-English
  languages against the 240 English paragraphs; relevant = the source paragraph; answers (English,
  the passages' language) allow MKQA's answer-in-top-k recall.
* :func:`load_xquad_longdoc` (MLDR-style, long documents): the paragraphs of each of the 48 XQuAD
  articles joined into one document; questions and documents in the same language.

XQuAD is fully parallel, so question ids are the same in every language and docids are the English
article titles (``"Super_Bowl_50#0"`` for a paragraph, ``"Super_Bowl_50"`` for an article).

>>> s = load_xquad_xling("de")
>>> len(s.queries), len(s.corpus)
(1190, 240)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..paths import data_dir

TYDI_LANGS = ("ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te")
XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
XQUAD_XLING_LANGS = tuple(lang for lang in XQUAD_LANGS if lang != "en")


@dataclass
class EvalSet:
    """A retrieval evaluation set.

    ``queries {qid: text}``, ``corpus {docid: text}`` (insertion-ordered: row i of a corpus score
    matrix is ``list(corpus)[i]``), ``qrels {qid: {docid: 1}}``, ``answers {qid: [str]}`` matched
    against the corpus texts (or None), ``note``: size and what it stands in for.
    ``answers_native``: for cross-lingual sets, the answers in the question language.
    """
    name: str
    lang: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    answers: dict[str, list[str]] | None
    note: str
    answers_native: dict[str, list[str]] | None = None


def _check(lang: str, known: tuple[str, ...], what: str) -> None:
    if lang not in known:
        raise ValueError(f"unknown {what} language {lang!r}; known: {', '.join(known)}")


@lru_cache(maxsize=32)
def _read_json(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}: expected the real data described in "
                                f"{path.parents[1]}/README.md (set $BGEM3_DATA to its folder)")
    return path.read_text(encoding="utf-8")


def _squad(path: Path) -> list[dict]:
    """The ``data`` list of a SQuAD-style JSON file (parsed anew each call: callers may mutate)."""
    try:
        data = json.loads(_read_json(path))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a SQuAD-style JSON file with a 'data' list ({e})") from e
    if not data:
        raise ValueError(f"{path}: empty 'data'")
    return data


def _answer_texts(qa: dict) -> list[str]:
    return list(dict.fromkeys(a["text"] for a in qa.get("answers", []) if a.get("text", "").strip()))


def load_tydi(lang: str) -> EvalSet:
    """MIRACL-style set: TyDi GoldP dev questions vs all distinct GoldP passages of ``lang``."""
    _check(lang, TYDI_LANGS, "TyDi GoldP")
    articles = _squad(data_dir() / "tydiqa_goldp" / f"tydiqa.goldp.{lang}.dev.json")
    queries, corpus, qrels, by_text = {}, {}, {}, {}
    for art in articles:
        for para in art["paragraphs"]:
            text = para["context"]
            if text not in by_text:
                by_text[text] = f"{lang}-p{len(by_text):04d}"
                corpus[by_text[text]] = text
            for qa in para["qas"]:
                if qa["id"] in queries:
                    raise ValueError(f"TyDi {lang}: duplicate question id {qa['id']!r}")
                queries[qa["id"]] = qa["question"]
                qrels[qa["id"]] = {by_text[text]: 1}
    note = (f"MIRACL-style stand-in: {len(queries)} TyDi QA GoldP dev questions ({lang}) against "
            f"{len(corpus)} passages. MIRACL searches 10^5-10^7 Wikipedia passages per language, so this "
            "corpus is thousands of times smaller and scores are far higher than, and not comparable to, "
            "the paper's MIRACL numbers.")
    return EvalSet("tydi-goldp", lang, queries, corpus, qrels, None, note)


def _xquad(lang: str) -> list[dict]:
    return _squad(data_dir() / "xquad" / f"xquad.{lang}.json")


def _parallel(lang: str) -> tuple[list[dict], list[dict]]:
    """(English articles, ``lang`` articles), checked to have identical structure and question ids."""
    en, other = _xquad("en"), _xquad(lang)

    def shape(arts):
        return [[[qa["id"] for qa in p["qas"]] for p in a["paragraphs"]] for a in arts]

    if shape(en) != shape(other):
        raise ValueError(f"xquad.{lang}.json is not parallel to xquad.en.json "
                         "(articles/paragraphs/ids differ)")
    return en, other


def load_xquad_xling(lang: str) -> EvalSet:
    """MKQA-style set: XQuAD questions in ``lang`` vs the 240 English paragraphs.

    ``answers``: English answer texts (the passages are English); ``answers_native``: ``lang`` ones.
    """
    _check(lang, XQUAD_XLING_LANGS, "cross-lingual XQuAD")
    en, other = _parallel(lang)
    queries, corpus, qrels, answers, native = {}, {}, {}, {}, {}
    for art_en, art in zip(en, other):
        for j, (p_en, p) in enumerate(zip(art_en["paragraphs"], art["paragraphs"])):
            docid = f"{art_en['title']}#{j}"
            corpus[docid] = p_en["context"]
            for qa_en, qa in zip(p_en["qas"], p["qas"]):
                queries[qa["id"]] = qa["question"]
                qrels[qa["id"]] = {docid: 1}
                answers[qa["id"]] = _answer_texts(qa_en)
                native[qa["id"]] = _answer_texts(qa)
    note = (f"MKQA-style stand-in: {len(queries)} XQuAD questions ({lang}) against {len(corpus)} English "
            "paragraphs. MKQA searches 2.68M English NQ passages, so this corpus is ~10,000 times smaller; "
            "scores are not comparable to the paper's MKQA numbers.")
    return EvalSet("xquad-xling", lang, queries, corpus, qrels, answers, note, native)


def load_xquad_longdoc(lang: str) -> EvalSet:
    """MLDR-style set: 48 XQuAD articles of ``lang`` (paragraphs joined by blank lines) as documents."""
    _check(lang, XQUAD_LANGS, "XQuAD")
    en, other = _parallel(lang) if lang != "en" else (_xquad("en"), _xquad("en"))
    queries, corpus, qrels, answers = {}, {}, {}, {}
    for art_en, art in zip(en, other):
        docid = art_en["title"]
        corpus[docid] = "\n\n".join(p["context"] for p in art["paragraphs"])
        for p in art["paragraphs"]:
            for qa in p["qas"]:
                queries[qa["id"]] = qa["question"]
                qrels[qa["id"]] = {docid: 1}
                answers[qa["id"]] = _answer_texts(qa)
    mean_chars = sum(map(len, corpus.values())) // len(corpus)
    note = (f"MLDR-style stand-in: {len(queries)} XQuAD questions ({lang}) against {len(corpus)} articles "
            f"(mean {mean_chars} characters). MLDR searches thousands to 200,000 documents per language, "
            "many thousands of tokens long (up to 8,192), so this set is far smaller and its documents far "
            "shorter; scores are not comparable to the paper's MLDR numbers.")
    return EvalSet("xquad-longdoc", lang, queries, corpus, qrels, answers, note)


def describe(evalset: EvalSet) -> str:
    """One paragraph of sizes plus the set's note."""
    n_judged = sum(len(d) for d in evalset.qrels.values())
    mean_chars = sum(map(len, evalset.corpus.values())) / max(len(evalset.corpus), 1)
    ans = "no answers" if evalset.answers is None else f"answers for {len(evalset.answers)} queries"
    return (f"{evalset.name} [{evalset.lang}]: {len(evalset.queries)} queries, "
            f"{len(evalset.corpus)} documents (mean {mean_chars:.0f} chars), "
            f"{n_judged} relevance judgements, {ans}.\n{evalset.note}")
