"""Training examples for unified fine-tuning, built from MLQA dev (``data_dir()/mlqa_dev``) only.

MLQA v1 dev holds 49 SQuAD-style files ``dev-context-{c}-question-{q}.json``: questions in language
``q`` about Wikipedia paragraphs in language ``c`` (ar de en es hi vi zh). One training example is

* the query: the question, with the model's query prefix (``"query: "`` for e5),
* the positive: the paragraph the question was asked about (``"passage: "`` prefix),
* ``n_negatives`` hard negatives: other paragraphs of the *same article* in language ``c``; when the
  article has too few, random paragraphs of language ``c`` fill the group (seeded).

``c == q`` gives monolingual pairs, ``c != q`` cross-lingual ones. XQuAD and TyDi QA (the evaluation
sets) are never read here: :func:`load_mlqa` refuses any folder that is not an MLQA dev folder.

A held-out split for choosing hyper-parameters is made by article: MLQA questions are parallel (one
question id in up to 7 languages), so every row is grouped by the *English* title of its question id
and a fixed hash of that title puts the whole group in ``"train"`` or ``"heldout"`` — no paragraph or
question of a held-out article is seen in training, in any language.

Everything is a deterministic function of the files and ``seed``.

>>> rows = load_mlqa(pairs=[("en", "de")])                                    # doctest: +SKIP
>>> ex = build_examples(rows, n_negatives=3, seed=0)                         # doctest: +SKIP
>>> ex[0].query[:7], ex[0].positive[:9], len(ex[0].negatives)                # doctest: +SKIP
('query: ', 'passage: ', 3)
"""
from __future__ import annotations

import hashlib
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..paths import cache_dir, data_dir

MLQA_LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")
E5_PREFIXES = ("query: ", "passage: ")
_FORBIDDEN = ("xquad", "tydi")


@dataclass(frozen=True)
class TrainExample:
    """One (query, positive, hard negatives) group; texts already carry the model's prefixes."""
    query: str
    positive: str
    negatives: tuple[str, ...]
    qid: str
    query_lang: str
    context_lang: str


def mlqa_pairs(kind: str = "all", langs=MLQA_LANGS) -> list[tuple[str, str]]:
    """(context_lang, question_lang) pairs: ``"mono"`` (c == q), ``"xling"`` (c != q) or ``"all"``.

    >>> mlqa_pairs("mono", ("de", "en"))
    [('de', 'de'), ('en', 'en')]
    """
    if kind not in ("all", "mono", "xling"):
        raise ValueError(f"kind must be 'all', 'mono' or 'xling', got {kind!r}")
    unknown = [lang for lang in langs if lang not in MLQA_LANGS]
    if unknown:
        raise ValueError(f"unknown MLQA language(s) {unknown}; known: {', '.join(MLQA_LANGS)}")
    return [(c, q) for c in langs for q in langs
            if kind == "all" or (kind == "mono") == (c == q)]


def mlqa_dir(root: str | Path | None = None) -> Path:
    """The MLQA dev folder; refuses evaluation-set folders (XQuAD, TyDi QA)."""
    path = Path(root) if root is not None else data_dir() / "mlqa_dev"
    if any(bad in part.lower() for part in path.parts for bad in _FORBIDDEN):
        raise ValueError(f"{path} looks like an evaluation set; training text comes from mlqa_dev only")
    if not path.is_dir():
        raise FileNotFoundError(f"MLQA dev folder not found: {path} (set BGEM3_DATA to the shared data folder)")
    return path


def load_mlqa(pairs=None, root: str | Path | None = None):
    """MLQA dev rows as a ``datasets.Dataset`` with columns qid, question, context, title,
    context_lang, question_lang, en_title (the group key of the held-out split).

    ``pairs``: (context_lang, question_lang) tuples to load (default: all 49).
    """
    import datasets

    folder = mlqa_dir(root)
    pairs = list(pairs) if pairs is not None else mlqa_pairs("all")
    if not pairs:
        raise ValueError("pairs is empty: nothing to load")
    for c, q in pairs:
        if c not in MLQA_LANGS or q not in MLQA_LANGS:
            raise ValueError(f"unknown MLQA pair ({c!r}, {q!r}); languages: {', '.join(MLQA_LANGS)}")
    wanted = sorted(set(pairs) | {("en", "en")})          # en-en names every question's English article
    files = {f"{c}_{q}": str(folder / f"dev-context-{c}-question-{q}.json") for c, q in wanted}
    for f in files.values():
        if not Path(f).is_file():
            raise FileNotFoundError(f"MLQA file missing: {f}")
    datasets.disable_progress_bars()
    raw = datasets.load_dataset("json", data_files=files, field="data",
                                cache_dir=str(cache_dir() / "hf_datasets"))
    en_title = {qa["id"]: art["title"] for art in raw["en_en"] for par in art["paragraphs"] for qa in par["qas"]}
    rows = []
    for c, q in sorted(set(pairs)):
        for art in raw[f"{c}_{q}"]:
            for par in art["paragraphs"]:
                for qa in par["qas"]:
                    rows.append({"qid": qa["id"], "question": qa["question"], "context": par["context"],
                                 "title": art["title"], "context_lang": c, "question_lang": q,
                                 "en_title": en_title.get(qa["id"], f"{c}:{art['title']}")})
    return datasets.Dataset.from_list(rows)


def split_of(en_title: str, heldout_percent: int = 10) -> str:
    """``"heldout"`` for a fixed ``heldout_percent`` % of article groups (by a hash of the title).

    >>> split_of("NTSC", 0), split_of("NTSC", 100)
    ('train', 'heldout')
    """
    if not 0 <= heldout_percent <= 100:
        raise ValueError(f"heldout_percent must lie in [0, 100], got {heldout_percent}")
    bucket = int(hashlib.sha1(en_title.encode("utf-8")).hexdigest(), 16) % 100
    return "heldout" if bucket < heldout_percent else "train"


def _example_rng(seed: int, key: str) -> np.random.Generator:
    """A generator that depends only on (seed, key): examples do not depend on each other's order."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def build_examples(rows, n_negatives: int = 3, seed: int = 0, split: str | None = "train",
                   heldout_percent: int = 10, prefixes: tuple[str, str] = E5_PREFIXES,
                   max_examples: int | None = None) -> list[TrainExample]:
    """Rows of :func:`load_mlqa` -> examples (sorted by context lang, question lang, qid).

    ``split``: ``"train"``, ``"heldout"`` or None (all rows). Negatives come from the same split only;
    a row whose context language has fewer than ``n_negatives + 1`` paragraphs there is dropped.
    ``max_examples``: keep a seeded random subset of that size (in the same sorted order).
    """
    if n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {n_negatives}")
    if split not in ("train", "heldout", None):
        raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
    if len(prefixes) != 2 or not all(isinstance(p, str) for p in prefixes):
        raise TypeError(f"prefixes must be (query_prefix, passage_prefix) strings, got {prefixes!r}")
    cols = {k: rows[k] for k in ("qid", "question", "context", "title", "context_lang", "question_lang",
                                 "en_title")}
    keep = [i for i in range(len(cols["qid"]))
            if split is None or split_of(cols["en_title"][i], heldout_percent) == split]
    article = defaultdict(set)        # (lang, title) -> paragraphs
    by_lang = defaultdict(set)        # lang -> paragraphs
    for i in keep:
        c, ctx = cols["context_lang"][i], cols["context"][i]
        if ctx.strip() and cols["question"][i].strip():
            article[c, cols["title"][i]].add(ctx)
            by_lang[c].add(ctx)
    by_lang = {c: sorted(v) for c, v in by_lang.items()}
    seen, out = set(), []
    order = sorted(keep, key=lambda i: (cols["context_lang"][i], cols["question_lang"][i], cols["qid"][i]))
    for i in order:
        c, q, qid, ctx = cols["context_lang"][i], cols["question_lang"][i], cols["qid"][i], cols["context"][i]
        if (c, q, qid) in seen or not ctx.strip() or not cols["question"][i].strip():
            continue
        seen.add((c, q, qid))
        rng = _example_rng(seed, f"{qid}|{c}|{q}")
        same = sorted(article[c, cols["title"][i]] - {ctx})
        negs = [same[j] for j in rng.permutation(len(same))[:n_negatives]]
        pool = by_lang[c]
        while len(negs) < n_negatives and len(pool) > len(negs) + 1:
            cand = pool[int(rng.integers(len(pool)))]
            if cand != ctx and cand not in negs:
                negs.append(cand)
        if len(negs) < n_negatives:       # the language has too few paragraphs in this selection
            continue
        qp, pp = prefixes
        out.append(TrainExample(qp + cols["question"][i], pp + ctx, tuple(pp + n for n in negs), qid, q, c))
    if max_examples is not None and max_examples < len(out):
        pick = np.sort(np.random.default_rng([int(seed), 1]).choice(len(out), max_examples, replace=False))
        out = [out[j] for j in pick]
    return out


def unique_texts(examples: list[TrainExample]) -> tuple[list[str], list[tuple[int, ...]]]:
    """Deduplicated texts and, per example, the indices ``(query, positive, *negatives)`` into them.

    >>> e = TrainExample("query: a", "passage: b", ("passage: c",), "1", "en", "en")
    >>> unique_texts([e, e])
    (['query: a', 'passage: b', 'passage: c'], [(0, 1, 2), (0, 1, 2)])
    """
    index: dict[str, int] = {}
    groups = []
    for ex in examples:
        group = []
        for t in (ex.query, ex.positive, *ex.negatives):
            group.append(index.setdefault(t, len(index)))
        groups.append(tuple(group))
    return list(index), groups
