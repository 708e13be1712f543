"""bgem3_lib.evaluation.benchmark_data on the real benchmark files in data_dir() and tiny corpus fixtures."""
import gzip
import json

import pytest

from bgem3_lib.evaluation import benchmark_data as bd


def test_miracl_dev_counts_match_readme():
    # README: 18 languages, 13,495 topics. Its "119,924 judgements" is the number of distinct judged
    # passages summed over languages; the qrel files hold 130,408 (query, passage) judgements.
    n_topics = n_judgements = n_passages = 0
    for lang in bd.MIRACL_LANGS:
        topics, qrels = bd.load_miracl_topics(lang), bd.load_miracl_qrels(lang)
        assert set(qrels) == set(topics)
        assert all(r in (0, 1) for docs in qrels.values() for r in docs.values())
        n_topics += len(topics)
        n_judgements += sum(len(d) for d in qrels.values())
        n_passages += len({d for docs in qrels.values() for d in docs})
    assert len(bd.MIRACL_LANGS) == 18
    assert (n_topics, n_judgements, n_passages) == (13_495, 130_408, 119_924)


def test_miracl_first_rows():
    topics, qrels = bd.load_miracl_topics("ar"), bd.load_miracl_qrels("ar")
    assert len(topics) == 2896
    assert next(iter(topics)) == "0" and topics["0"].startswith("هل عدم")
    assert qrels["0"]["151236#1"] == 1 and qrels["0"]["151236#0"] == 0


def test_mkqa_sample_6_queries_26_languages():
    path = bd.mkqa_sample_path()
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    assert len(rows) == 6
    file_langs = set(rows[0]["queries"])
    assert all(set(r["queries"]) == set(r["answers"]) == file_langs for r in rows)
    assert len(file_langs) == 26 and file_langs - set(bd.MKQA_LANGS) == {"en"}
    assert len(bd.MKQA_LANGS) == 25
    for lang in bd.MKQA_ALL_LANGS:
        assert len(bd.load_mkqa(lang, path).queries) == 6


def test_mkqa_answers_and_aliases():
    path = bd.mkqa_sample_path()
    ja = bd.load_mkqa("ja", path)
    assert ja.queries["36228854473990432"] == "help me help youはいつ発表されましたか"
    assert ja.answers["36228854473990432"][:3] == ["2017", "2017-05-18", "18/05/2017"]  # en answers
    assert ja.answers["7721692200040168186"] == []  # long_answer: no answer string
    ru = bd.load_mkqa("ru", path, answer_lang="ru")
    assert "2017 май 18" in ru.answers["36228854473990432"]
    gladiator = "7631360939705650347"
    assert bd.load_mkqa("de", path).answers[gladiator] == ["Ridley Scott", "Sir Ridley Scott"]
    answerable = bd.load_mkqa("de", path, answerable_only=True)
    assert len(answerable.queries) == 3 and all(answerable.answers.values())


def test_mkqa_missing_full_file_message(monkeypatch, tmp_path):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mkqa.jsonl.gz.*apple/ml-mkqa"):
        bd.load_mkqa("fr")


@pytest.mark.parametrize("call", [
    lambda: bd.load_miracl_topics("xx"), lambda: bd.load_miracl_qrels("el"),
    lambda: bd.load_mkqa("en_us", bd.mkqa_sample_path()), lambda: bd.miracl_corpus_dir("el"),
])
def test_unknown_language_lists_known(call):
    with pytest.raises(ValueError, match="unknown .*language.*known: "):
        call()


# ---------------------------------------------------------------- corpora (tiny fixtures)

def _write_shard(path, rows, gz=True):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_miracl_corpus_sharded(monkeypatch, tmp_path):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path))
    folder = tmp_path / "corpora" / "miracl" / "sw"
    folder.mkdir(parents=True)
    _write_shard(folder / "docs-0.jsonl.gz", [{"docid": "1#0", "title": "Nairobi", "text": "Ni mji."}])
    _write_shard(folder / "docs-1.jsonl", [{"docid": "2#0", "title": "", "text": "Bahari."}], gz=False)
    (folder / "README.txt").write_text("ignored")
    corpus = bd.load_miracl_corpus("sw")
    assert corpus == {"1#0": "Nairobi Ni mji.", "2#0": "Bahari."}
    bd.validate_qrels({"q": {"1#0": 1, "2#0": 0}}, corpus)
    with pytest.raises(ValueError, match="1 judged documents .*not in the corpus"):
        bd.validate_qrels({"q": {"1#0": 1}, "r": {"9#9": 1}}, corpus.keys())


def test_missing_corpora_say_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("BGEM3_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"miracl/miracl-corpus.*v1.0-te.*corpora/miracl/te"):
        bd.load_miracl_corpus("te")
    with pytest.raises(FileNotFoundError, match=r"BEIR.*corpus.jsonl.*corpora/beir_nq"):
        bd.load_beir_nq_corpus()


def test_beir_corpus_and_bad_files(tmp_path):
    _write_shard(tmp_path / "corpus.jsonl", [{"_id": "doc0", "title": "T", "text": "body"}], gz=False)
    assert bd.load_beir_nq_corpus(tmp_path) == {"doc0": "T body"}
    (tmp_path / "corpus.jsonl").write_text('{"_id": "doc0", "title": "T"}\n')
    with pytest.raises(ValueError, match="corpus.jsonl:1: expected a JSON object"):
        bd.load_beir_nq_corpus(tmp_path)
    good = gzip.compress(b'{"docid": "a", "title": "", "text": "x"}\n' * 50)
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        list(bd.iter_jsonl_corpus([tmp_path / "cut.jsonl.gz"]))


def test_malformed_topics_and_qrels(tmp_path):
    (tmp_path / "t.tsv").write_text("1\tok\n2 no tab\n")
    with pytest.raises(ValueError, match=r"t.tsv:2: expected 'qid<TAB>query'"):
        bd.read_topics(tmp_path / "t.tsv")
    (tmp_path / "q.txt").write_text("1 Q0 a 1\n1 Q0 a 1\n")
    with pytest.raises(ValueError, match="duplicate judgement"):
        bd.read_qrels(tmp_path / "q.txt")
    (tmp_path / "q2.txt").write_text("1 Q0 a yes\n")
    with pytest.raises(ValueError, match="q2.txt:1"):
        bd.read_qrels(tmp_path / "q2.txt")
    with pytest.raises(FileNotFoundError, match="missing file"):
        bd.read_topics(tmp_path / "absent.tsv")
