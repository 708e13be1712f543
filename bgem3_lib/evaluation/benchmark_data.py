"""Readers for the real benchmark files the runner evaluates: MIRACL topics/qrels, MKQA, and corpora.

Topic and qrel files are read as shipped by anserini-tools (``data_dir()``; see its README):

* topics ``qid<TAB>query``: ``miracl/topics.miracl-v1.0-<lang>-dev.tsv``;
* qrels ``qid Q0 docid rel`` (any whitespace; BEIR writes ``0`` for ``Q0``).

The passage corpora (millions of passages) are not shipped; a user with network access puts them
under ``$BGEM3_HOME/corpora/`` (``cache_dir()``), and a missing one raises FileNotFoundError saying
what to download and where:

* MIRACL: the ``miracl/miracl-corpus`` dataset, files of ``miracl-corpus-v1.0-<lang>/``
  (``docs-*.jsonl.gz``, rows ``{"docid", "title", "text"}``) in ``corpora/miracl/<lang>/``;
* BEIR-NQ (the MKQA corpus): BEIR's ``nq`` ``corpus.jsonl`` (rows ``{"_id", "title", "text"}``)
  in ``corpora/beir_nq/``;
* MKQA: ``mkqa.jsonl.gz`` of apple/ml-mkqa in ``corpora/mkqa/``.

A passage's text is ``f"{title} {text}".strip()``, as the paper's evaluation encodes it.

MKQA languages: the file has 26 (``en`` + 25). The paper's cross-lingual table reports the 25
non-English ones (:data:`MKQA_LANGS`): the corpus (NQ Wikipedia) is English, so English queries
would not be cross-lingual; ``en`` stays loadable as the reference.

>>> len(load_miracl_topics("sw"))
482
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from ..paths import cache_dir, data_dir
from ..progress import tqdm

MIRACL_LANGS = ("ar", "bn", "de", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw",
                "te", "th", "yo", "zh")
MKQA_LANGS = ("ar", "da", "de", "es", "fi", "fr", "he", "hu", "it", "ja", "km", "ko", "ms", "nl", "no",
              "pl", "pt", "ru", "sv", "th", "tr", "vi", "zh_cn", "zh_hk", "zh_tw")
MKQA_ALL_LANGS = ("en",) + MKQA_LANGS


def check_lang(lang: str, known: Iterable[str], what: str) -> str:
    """Return ``lang`` if known, else ValueError listing the known codes."""
    known = tuple(known)
    if lang not in known:
        raise ValueError(f"unknown {what} language {lang!r}; known: {', '.join(known)}")
    return lang


def _open_text(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without newline) of a text or .gz file; corrupt gzip -> ValueError."""
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                yield n, line.rstrip("\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def read_topics(path: Path) -> dict[str, str]:
    """``qid<TAB>query`` lines -> ``{qid: query}`` in file order."""
    topics: dict[str, str] = {}
    for n, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2 or not parts[0] or not parts[1].strip():
            raise ValueError(f"{path}:{n}: expected 'qid<TAB>query', got {line[:80]!r}")
        if parts[0] in topics:
            raise ValueError(f"{path}:{n}: duplicate qid {parts[0]!r}")
        topics[parts[0]] = parts[1]
    if not topics:
        raise ValueError(f"{path}: no topics")
    return topics


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """``qid Q0 docid rel`` lines -> ``{qid: {docid: rel}}``."""
    qrels: dict[str, dict[str, int]] = {}
    for n, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected 'qid Q0 docid rel', got {line[:80]!r}")
        qid, _, docid, rel = parts
        if docid in qrels.setdefault(qid, {}):
            raise ValueError(f"{path}:{n}: duplicate judgement for ({qid}, {docid})")
        qrels[qid][docid] = int(rel)
    if not qrels:
        raise ValueError(f"{path}: no judgements")
    return qrels


def _root(data: Path | None) -> Path:
    return Path(data) if data is not None else data_dir()


def load_miracl_topics(lang: str, data: Path | None = None) -> dict[str, str]:
    """MIRACL v1.0 dev topics of one of :data:`MIRACL_LANGS`."""
    check_lang(lang, MIRACL_LANGS, "MIRACL")
    return read_topics(_root(data) / "miracl" / f"topics.miracl-v1.0-{lang}-dev.tsv")


def load_miracl_qrels(lang: str, data: Path | None = None) -> dict[str, dict[str, int]]:
    """MIRACL v1.0 dev qrels (rel 0/1) of one of :data:`MIRACL_LANGS`."""
    check_lang(lang, MIRACL_LANGS, "MIRACL")
    return read_qrels(_root(data) / "miracl" / f"qrels.miracl-v1.0-{lang}-dev.tsv")


# ---------------------------------------------------------------- corpora (user-supplied)

def passage_text(title: str, text: str) -> str:
    """``"Title body"`` as encoded by the evaluation; ``passage_text("", "x") == "x"``."""
    return f"{title or ''} {text or ''}".strip()


def _jsonl_files(folder: Path, missing_msg: str) -> list[Path]:
    files = sorted(p for p in Path(folder).glob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise FileNotFoundError(missing_msg)
    return files


def iter_jsonl_corpus(files: Iterable[Path], id_field: str = "docid") -> Iterator[tuple[str, str]]:
    """Yield ``(docid, passage_text)`` from JSONL shards (plain or .gz) of ``{id_field, title, text}``."""
    for path in files:
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield str(row[id_field]), passage_text(row.get("title", ""), row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with '{id_field}' and 'text' "
                                 f"({type(e).__name__}: {e})") from e


def miracl_corpus_dir(lang: str) -> Path:
    """``$BGEM3_HOME/corpora/miracl/<lang>/``."""
    return cache_dir() / "corpora" / "miracl" / check_lang(lang, MIRACL_LANGS, "MIRACL")


def _load_corpus(files: list[Path], id_field: str, desc: str) -> dict[str, str]:
    corpus: dict[str, str] = {}
    for docid, text in tqdm(iter_jsonl_corpus(files, id_field), desc=desc, unit=" passages"):
        if docid in corpus:
            raise ValueError(f"{desc}: duplicate docid {docid!r}")
        corpus[docid] = text
    return corpus


def load_miracl_corpus(lang: str, folder: Path | None = None) -> dict[str, str]:
    """``{docid: passage_text}`` of the MIRACL corpus of ``lang`` (default :func:`miracl_corpus_dir`)."""
    check_lang(lang, MIRACL_LANGS, "MIRACL")
    folder = Path(folder) if folder is not None else miracl_corpus_dir(lang)
    msg = (f"MIRACL corpus for {lang!r} not found: download the `miracl/miracl-corpus` dataset, folder "
           f"miracl-corpus-v1.0-{lang}/ (docs-*.jsonl.gz, rows {{docid, title, text}}), and put its "
           f"files in {folder} (root set by $BGEM3_HOME)")
    return _load_corpus(_jsonl_files(folder, msg), "docid", f"MIRACL {lang} corpus")


def beir_nq_corpus_dir() -> Path:
    """``$BGEM3_HOME/corpora/beir_nq/``."""
    return cache_dir() / "corpora" / "beir_nq"


def load_beir_nq_corpus(folder: Path | None = None) -> dict[str, str]:
    """``{docid: passage_text}`` of BEIR NQ (2.68M passages; the corpus of MKQA)."""
    folder = Path(folder) if folder is not None else beir_nq_corpus_dir()
    msg = (f"BEIR-NQ corpus not found: download BEIR's `nq` dataset (nq.zip or BeIR/nq, corpus split) "
           f"and put its corpus.jsonl (rows {{_id, title, text}}) in {folder} (root set by $BGEM3_HOME)")
    return _load_corpus(_jsonl_files(folder, msg), "_id", "BEIR-NQ corpus")


def validate_qrels(qrels: Mapping[str, Mapping[str, int]], corpus_ids: Iterable[str]) -> None:
    """ValueError if ``qrels`` judge documents that ``corpus_ids`` lacks (wrong corpus or language)."""
    ids = corpus_ids if isinstance(corpus_ids, (set, frozenset, dict)) else set(corpus_ids)
    missing = [(q, d) for q, docs in qrels.items() for d in docs if d not in ids]
    if missing:
        n_q = len({q for q, _ in missing})
        raise ValueError(f"{len(missing)} judged documents (in {n_q} queries) are not in the corpus of "
                         f"{len(ids)} documents, e.g. {missing[:3]}: wrong corpus, language or version?")


# ---------------------------------------------------------------- MKQA

class MKQAQueries(NamedTuple):
    """One MKQA language: ``queries {qid: text}``, ``answers {qid: [answer, alias, ...]}``
    (``[]`` for unanswerable / long-answer queries)."""
    queries: dict[str, str]
    answers: dict[str, list[str]]


def mkqa_path() -> Path:
    """Where the full file is expected: ``$BGEM3_HOME/corpora/mkqa/mkqa.jsonl.gz``."""
    return cache_dir() / "corpora" / "mkqa" / "mkqa.jsonl.gz"


def mkqa_sample_path(data: Path | None = None) -> Path:
    """The shipped 6-query format fixture (apple/ml-mkqa tests), not the benchmark."""
    return _root(data) / "mkqa" / "test_mkqa.jsonl.gz"


def load_mkqa(lang: str, path: Path | None = None, answer_lang: str = "en",
              answerable_only: bool = False) -> MKQAQueries:
    """Queries in ``lang`` with answers (text + aliases) in ``answer_lang`` (default English, the
    language of the NQ passages they are matched against)."""
    check_lang(lang, MKQA_ALL_LANGS, "MKQA")
    check_lang(answer_lang, MKQA_ALL_LANGS, "MKQA answer")
    if path is None:
        path = mkqa_path()
        if not path.is_file() and not path.with_suffix("").is_file():
            raise FileNotFoundError(f"MKQA not found: download mkqa.jsonl.gz (apple/ml-mkqa) to {path} "
                                    f"(root set by $BGEM3_HOME); {mkqa_sample_path()} is only a "
                                    "6-query format sample")
        path = path if path.is_file() else path.with_suffix("")
    queries: dict[str, str] = {}
    answers: dict[str, list[str]] = {}
    for n, line in _lines(Path(path)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, query, alts = str(row["example_id"]), row["queries"][lang], row["answers"][answer_lang]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected an MKQA row with example_id, queries[{lang!r}] and "
                             f"answers[{answer_lang!r}] ({type(e).__name__}: {e})") from e
        strings = [s for a in alts for s in [a.get("text"), *(a.get("aliases") or [])] if s]
        if answerable_only and not strings:
            continue
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"{path}:{n}: empty {lang} query for example {qid}")
        queries[qid] = query
        answers[qid] = list(dict.fromkeys(strings))
    if not queries:
        raise ValueError(f"{path}: no MKQA queries")
    return MKQAQueries(queries, answers)
