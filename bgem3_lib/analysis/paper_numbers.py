"""Every number of the BGE-M3 paper that the book quotes, in one place, with the label to print under it.

Source: Chen et al., "M3-Embedding: Multi-Linguality, Multi-Functionality, Multi-Granularity Text
Embeddings Through Self-Knowledge Distillation", arXiv:2402.03216v4 (28 June 2024, the ACL 2024
Findings camera-ready; https://arxiv.org/abs/2402.03216v4). Earlier versions differ in places: the
chapters used to quote a MIRACL Dense average of 67.8 (said to be v1's; v1 itself was not read for
this module), where v4 prints 69.2. arXiv also lists a v5 (December 2025); its text was not checked,
and nothing below is taken from it.

The tables (data in :mod:`bgem3_lib.analysis.paper_tables`), keyed for :func:`paper_table`:

==================  =====================================================  ==============================
key                 what                                                   rows
==================  =====================================================  ==============================
``miracl``          Table 1, MIRACL dev nDCG@10, 18 languages + Avg        5 baselines, OpenAI-3 (Avg
                                                                           only), 5 M3 modes
``mkqa``            Table 2, MKQA Recall@100, 25 languages + Avg           6 baselines, 5 M3 modes
``mkqa_recall20``   Table 13 (Appendix C.1), MKQA Recall@20                as Table 2
``mldr``            Table 3, MLDR test nDCG@10, 13 languages + Avg         6 baselines, jina (en only),
                                                                           5 M3 modes, 2 w.o.-long rows
``narrativeqa``     Table 4, NarrativeQA nDCG@10 (one column)              7 baselines, 5 M3 modes
``skd_ablation``    Table 5, with per-language values from Table 14        M3-w.skd / M3-w.o.skd x 3 modes
``stage_ablation``  Table 6, with per-language values from Table 15        the three training pipelines
==================  =====================================================  ==============================

Not recorded: Tables 7-12 (data statistics, batch sizes, BM25 tokenizers, MIRACL Recall@100), which
the book does not quote, and Figure 5, whose values are read off a plot. Every value recorded was
read from two renderings of v4 (the LaTeX source of its tables, a text extraction of its PDF), which
agree; none had to be left out as unreadable.

The protocol constants, each with its section (:data:`CONSTANT_SOURCES`): the self-distillation
teacher's weights and the loss weights (§3.3), the hybrid weights (§4.1 MIRACL, §4.2 MKQA "the same
weights as in MIRACL", §4.3 MLDR) and the candidate depths of §4.1; the MCLS interval (Appendix B.2)
and the maximum input length (§1, Appendix B.1). Weights are ``(w_dense, w_sparse, w_colbert)``, the
order of Eq. 1 and of :mod:`bgem3_lib.retrieval.modes`. The library's own copies of these values live
in the wings that use them (``retrieval.modes``, ``training.losses``, ``retrieval.retriever``); the
tests pin them to this module, which nothing below ``analysis`` may import.

>>> paper_value("miracl", "Dense")
69.2
>>> paper_value("mkqa", "dense", "km"), paper_value("mkqa", "mE5-large", "km")
(68.6, 28.1)
>>> paper_modes("skd_ablation", group="M3-w.o.skd")
{'dense': 68.7, 'sparse': 36.7, 'colbert': 69.3}
>>> caption("miracl")
'BGE-M3 paper (arXiv:2402.03216v4), Table 1: MIRACL dev nDCG@10'
>>> paper_table("mldr").loc["All", ["en", "Avg"]].tolist()
[63.8, 65.0]
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import pandas as pd

from . import paper_tables as _t

PAPER = "arXiv:2402.03216v4"
PAPER_URL = "https://arxiv.org/abs/2402.03216v4"

# The library's mode names (bgem3_lib.retrieval.modes.MODES) -> the paper's row labels.
MODE_ROWS = {"dense": "Dense", "sparse": "Sparse", "colbert": "Multi-vec", "dense+sparse": "Dense+Sparse",
             "all": "All"}


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper: ``rows[system][column]``; ``columns`` are its per-language columns in the
    paper's order (empty for NarrativeQA) and ``headline`` its summary column ("Avg" or "nDCG@10")."""

    key: str
    title: str
    source: str
    metric: str
    columns: tuple[str, ...]
    rows: Mapping[str, Mapping[str, float]]
    headline: str = "Avg"
    max_length: Mapping[str, int] | None = None


def _rows(table: Mapping, langs: tuple[str, ...]) -> Mapping[str, Mapping[str, float]]:
    """``{system: (avg, values)}`` (values in ``langs`` order, None = "-") -> ``{system: {col: value}}``."""
    out = {}
    for system, (avg, values) in table.items():
        row = {lang: v for lang, v in zip(langs, values or ()) if v is not None}
        if avg is not None:
            row["Avg"] = avg
        out[system] = MappingProxyType(row)
    return MappingProxyType(out)


def _transpose(by_lang: Mapping[str, tuple], systems: tuple[str, ...]) -> Mapping[str, Mapping[str, float]]:
    """The paper's MKQA layout (a row per language, a column per system) -> ``{system: {lang: value}}``."""
    return MappingProxyType({s: MappingProxyType({lang: vals[i] for lang, vals in by_lang.items()})
                             for i, s in enumerate(systems)})


def _table(key, title, table_no, metric, columns, rows, **kw) -> PaperTable:
    return PaperTable(key, title, f"{PAPER}, {table_no}", metric, columns, rows, **kw)


TABLES: Mapping[str, PaperTable] = MappingProxyType({t.key: t for t in (
    _table("miracl", "MIRACL dev", "Table 1", "nDCG@10", _t.MIRACL_LANGS,
           _rows(_t.MIRACL_NDCG10, _t.MIRACL_LANGS)),
    _table("mkqa", "MKQA cross-lingual", "Table 2", "Recall@100", _t.MKQA_LANGS,
           _transpose(_t.MKQA_RECALL100_BY_LANG, _t.MKQA_SYSTEMS)),
    _table("mkqa_recall20", "MKQA cross-lingual", "Table 13 (Appendix C.1)", "Recall@20", _t.MKQA_LANGS,
           _transpose(_t.MKQA_RECALL20_BY_LANG, _t.MKQA_SYSTEMS)),
    _table("mldr", "MLDR test", "Table 3", "nDCG@10", _t.MLDR_LANGS, _rows(_t.MLDR_NDCG10, _t.MLDR_LANGS),
           max_length=MappingProxyType(_t.MLDR_MAX_LENGTH)),
    _table("narrativeqa", "NarrativeQA", "Table 4", "nDCG@10", (),
           MappingProxyType({s: MappingProxyType({"nDCG@10": v}) for s, v in _t.NARRATIVEQA_NDCG10.items()}),
           headline="nDCG@10", max_length=MappingProxyType(_t.NARRATIVEQA_MAX_LENGTH)),
    _table("skd_ablation", "self-knowledge distillation ablation, MIRACL dev", "Table 5 (per language: Table 14)",
           "nDCG@10", _t.MIRACL_LANGS, _rows(_t.SKD_ABLATION_NDCG10, _t.MIRACL_LANGS)),
    _table("stage_ablation", "training-stage ablation (Dense), MIRACL dev", "Table 6 (per language: Table 15)",
           "nDCG@10", _t.MIRACL_LANGS, _rows(_t.STAGE_ABLATION_NDCG10, _t.MIRACL_LANGS)),
)})


def get_table(key: str) -> PaperTable:
    """The :class:`PaperTable` of ``key``; KeyError naming the known keys."""
    if key not in TABLES:
        raise KeyError(f"no paper table {key!r}; known: {', '.join(TABLES)}")
    return TABLES[key]


def caption(key: str) -> str:
    """The label to print under numbers quoted from table ``key``."""
    t = get_table(key)
    return f"BGE-M3 paper ({PAPER}), {t.source.split(', ', 1)[1]}: {t.title} {t.metric}"


def paper_table(key: str) -> pd.DataFrame:
    """Table ``key`` as a DataFrame: a row per system (the paper's order), its language columns then the
    headline column; NaN where the paper prints "-". ``attrs`` hold ``source``, ``caption``, ``metric``."""
    t = get_table(key)
    df = pd.DataFrame.from_dict({s: dict(r) for s, r in t.rows.items()}, orient="index")
    df = df.reindex(columns=[*t.columns, t.headline]).astype(float)
    df.attrs.update(source=t.source, caption=caption(key), metric=t.metric)
    if t.max_length is not None:
        df.attrs["max_length"] = dict(t.max_length)
    return df


def paper_value(key: str, system: str, column: str | None = None) -> float:
    """One printed value: ``system`` is a row label of the paper (``"mE5-large"``, ``"Multi-vec"``) or a
    library mode name (``"colbert"``); ``column`` a language or, by default, the headline column."""
    t = get_table(key)
    row = t.rows.get(system) or t.rows.get(MODE_ROWS.get(system, ""))
    if row is None:
        raise KeyError(f"no row {system!r} in {t.source}; rows: {', '.join(t.rows)}")
    column = t.headline if column is None else column
    if column not in row:
        raise KeyError(f"{t.source} prints no value for {system!r} in column {column!r}")
    return row[column]


def paper_modes(key: str, column: str | None = None, group: str | None = None) -> dict[str, float]:
    """``{mode: value}`` for the M3 modes table ``key`` reports, in the library's mode order; ``group``
    picks a block of an ablation table (``"M3-w.skd"`` / ``"M3-w.o.skd"`` in ``skd_ablation``)."""
    t = get_table(key)
    prefix = f"{group} " if group else ""
    return {mode: paper_value(key, prefix + label, column) for mode, label in MODE_ROWS.items()
            if prefix + label in t.rows}


# ---------------------------------------------------------------- protocol constants
# §3.3: the teacher s_inter = w1*s_dense + w2*s_lex + w3*s_mul, and the loss weights lambda of Eqs. 4 and 6.
TEACHER_WEIGHTS = (1.0, 0.3, 1.0)
LOSS_LAMBDAS = (1.0, 0.1, 1.0)
# Hybrid weights of Eq. 1 per benchmark and hybrid mode (colbert weight 0 where the mode ignores it).
MIRACL_HYBRID_WEIGHTS = MappingProxyType({"dense+sparse": (1.0, 0.3, 0.0), "all": (1.0, 0.3, 1.0)})   # §4.1
MKQA_HYBRID_WEIGHTS = MIRACL_HYBRID_WEIGHTS                                                            # §4.2
MLDR_WEIGHTS = MappingProxyType({"dense+sparse": (0.2, 0.8, 0.0), "all": (0.15, 0.5, 0.35)})           # §4.3
HYBRID_WEIGHTS = MappingProxyType({"miracl": MIRACL_HYBRID_WEIGHTS, "mkqa": MKQA_HYBRID_WEIGHTS,
                                   "mldr": MLDR_WEIGHTS})
# §4.1: how deep each mode searches. dense / sparse: top-1000 from the index (Faiss / Lucene); colbert and
# all: re-rank the Dense top-200; dense+sparse: re-rank the union of the Dense and the Sparse top-1000.
CANDIDATE_DEPTHS = MappingProxyType({"dense": 1000, "sparse": 1000, "colbert": 200, "dense+sparse": 1000,
                                     "all": 200})
HYBRID_CANDIDATES = MappingProxyType({"colbert": "dense", "dense+sparse": "dense ∪ sparse", "all": "dense"})
MCLS_EVERY = 256          # Appendix B.2: one [CLS] inserted per 256 tokens
MAX_LENGTH = 8192         # §1 / Appendix B.1: inputs of up to 8,192 tokens

CONSTANT_SOURCES = MappingProxyType({
    "TEACHER_WEIGHTS": f"{PAPER}, §3.3", "LOSS_LAMBDAS": f"{PAPER}, §3.3",
    "MIRACL_HYBRID_WEIGHTS": f"{PAPER}, §4.1", "MKQA_HYBRID_WEIGHTS": f"{PAPER}, §4.2",
    "MLDR_WEIGHTS": f"{PAPER}, §4.3", "CANDIDATE_DEPTHS": f"{PAPER}, §4.1", "HYBRID_CANDIDATES": f"{PAPER}, §4.1",
    "MCLS_EVERY": f"{PAPER}, Appendix B.2", "MAX_LENGTH": f"{PAPER}, §1 and Appendix B.1",
})


def constant_caption(*names: str) -> str:
    """The label for protocol constants, their sections in the order given.

    >>> constant_caption("TEACHER_WEIGHTS")
    'BGE-M3 paper (arXiv:2402.03216v4), §3.3'
    >>> constant_caption("MIRACL_HYBRID_WEIGHTS", "MKQA_HYBRID_WEIGHTS", "MLDR_WEIGHTS")
    'BGE-M3 paper (arXiv:2402.03216v4), §4.1, §4.2, §4.3'
    """
    unknown = [n for n in names if n not in CONSTANT_SOURCES]
    if unknown or not names:
        raise KeyError(f"no paper constant {unknown or '(none given)'}; known: {', '.join(CONSTANT_SOURCES)}")
    sections = dict.fromkeys(CONSTANT_SOURCES[n].split(", ", 1)[1] for n in names)
    return f"BGE-M3 paper ({PAPER}), {', '.join(sections)}"
