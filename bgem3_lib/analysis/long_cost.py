"""Cost of one long document: seconds and peak memory per document as its length grows to 8192 tokens,
``bgem3_lib`` beside FlagEmbedding 1.4.2 on the same checkpoint and the same texts.

Shapes timed (float32, CPU): M3-small-long (12 layers, hidden 384, 12 heads, FFN 1536, 8192 positions) and
the full XLM-R-large shape of BGE-M3 (24 layers, hidden 1024, 16 heads, FFN 4096, 8194 positions). One
document of L tokens is a ``[1, L]`` batch; attention's scores are ``[1, heads, L, L]`` in full (4.3 GB at
8192 and 16 heads), which ``bgem3_lib`` never holds at once (query rows in blocks: 1,024 in the plain
MindSpore cells, 256 in the CPU kernels).

* :func:`texts_of_length` - real text (XQuAD articles of one language, joined) cut so that each text
  tokenizes to exactly ``n_tokens`` tokens, ``<s>`` and ``</s>`` included;
* :func:`measure_long_cost` - for each length, the same texts through every engine, each (engine, length)
  in its own process (so the memory peak belongs to that length), after a warm-up on a short text; the
  engines' outputs must agree (dense and ColBERT within ``tol``) before their timings count;
* :func:`agreement` - the engines' largest output differences, checked;
* :func:`cost_table` - the rows as a table: lengths down, (model, engine) across, plus FlagEmbedding / ours.

FlagEmbedding's ``encode`` runs its longest batch twice (once to probe the batch size); the probe is skipped
(``skip_probe``), so its seconds are the stricter, probe-free ones.

>>> rows = [{"model": "m", "implementation": e, "length": 512, "seconds_per_doc": s}
...         for e, s in (("bgem3_lib", 0.5), ("flagembedding", 1.0))]
>>> cost_table(rows)[("m", "FlagEmbedding / ours")].tolist()
[2.0]
>>> from bgem3_lib.model.tokenization import M3Tokenizer
>>> tok = M3Tokenizer.from_file()
>>> [len(ids) for ids in tok.encode_ids(texts_of_length(tok, 40, count=2), 10 ** 6)]
[40, 40]
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..evaluation.offline_sets import XQUAD_LANGS, load_xquad_longdoc
from ..progress import tqdm
from .reference_runs import max_differences, run_implementation

LENGTHS = (512, 1024, 2048, 4096, 8192)
# engine -> (implementation of reference_runs, bgem3_lib backend)
ENGINES = {"bgem3_lib": ("bgem3_lib", None), "bgem3_lib/mindspore": ("bgem3_lib", "mindspore"),
           "flagembedding": ("flagembedding", None)}
AGREE_TOL = 1e-4
WARMUP_TOKENS = 64
MIB = 2 ** 20


@lru_cache(maxsize=None)
def _language_text(lang: str) -> tuple[str, ...]:
    return tuple(load_xquad_longdoc(lang).corpus.values())


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode_ids([text], 1 << 30, warn=False)[0])


def _cut(tokenizer, text: str, n_tokens: int, what: str) -> str:
    """The prefix of ``text`` that tokenizes to exactly ``n_tokens`` (binary search on characters)."""
    hi = min(len(text), 4 * n_tokens)
    while _count(tokenizer, text[:hi]) < n_tokens:
        if hi == len(text):
            raise ValueError(f"{what} holds only {_count(tokenizer, text)} tokens, fewer than {n_tokens}")
        hi = min(len(text), 2 * hi)
    lo = 1                                        # invariant: text[:hi] has >= n_tokens tokens
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _count(tokenizer, text[:mid]) < n_tokens else (lo, mid)
    for d in range(32):                           # a character can add two tokens: look around the boundary
        for c in (hi - d, hi + d):
            if 0 < c <= len(text) and _count(tokenizer, text[:c]) == n_tokens:
                return text[:c]
    raise ValueError(f"no prefix of {what} tokenizes to exactly {n_tokens} tokens")


def texts_of_length(tokenizer, n_tokens: int, count: int = 1, seed: int = 0,
                    langs: Sequence[str] = XQUAD_LANGS) -> list[str]:
    """``count`` real texts of exactly ``n_tokens`` tokens each under ``tokenizer`` (an object with
    ``encode_ids(texts, max_length, warn)``, e.g. :class:`~bgem3_lib.model.tokenization.M3Tokenizer`), special
    tokens included: text ``i`` is the XQuAD articles of one language (languages in turn from a seeded start),
    from a seeded first article on, joined by blank lines and cut at the right character."""
    n_special = getattr(tokenizer, "n_special", 2)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or n_tokens <= n_special:
        raise ValueError(f"n_tokens must be an integer > {n_special} (the special tokens), got {n_tokens!r}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not langs or any(lang not in XQUAD_LANGS for lang in langs):
        raise ValueError(f"langs must be a non-empty subset of {XQUAD_LANGS}, got {list(langs)}")
    rng = np.random.default_rng(seed)
    start = int(rng.integers(len(langs)))
    out = []
    for i in range(count):
        lang = langs[(start + i) % len(langs)]
        docs = _language_text(lang)
        first = int(rng.integers(len(docs)))
        text = "\n\n".join(docs[first:] + docs[:first])
        out.append(_cut(tokenizer, text, int(n_tokens), f"the XQuAD articles of {lang!r}"))
    return out


def model_tokenizer(model_dir: str | Path):
    """(tokenizer, maximum length in tokens) of a checkpoint directory or a ``bgem3_lib`` model name."""
    from ..model.config import M3Config
    from ..model.loading import resolve
    from ..model.tokenization import M3Tokenizer
    path = Path(model_dir)
    if (path / "config.json").is_file():
        tok = path / "tokenizer.json"
        return (M3Tokenizer.from_file(tok if tok.is_file() else None),
                M3Config.from_json(path / "config.json").max_length)
    loaded = resolve(str(model_dir))
    return M3Tokenizer.from_file(loaded.tokenizer_path), loaded.config.max_length


def _row(engine: str, label: str, length: int, res, docs: int) -> dict:
    return {"model": label, "implementation": engine, "length": length, "docs": docs,
            "seconds_per_doc": res.seconds / docs, "cpu_seconds_per_doc": res.cpu_seconds / docs,
            "tokens_per_s": res.tokens_per_second, "rss_after_load_mib": res.rss_after_load / MIB,
            "rss_before_encode_mib": res.rss_before_encode / MIB, "peak_growth_mib": res.peak_growth / MIB,
            "max_rss_mib": res.max_rss / MIB,
            "reference": None, "max_diff_dense": float("nan"), "max_diff_colbert": float("nan"),
            "max_diff_sparse": float("nan")}


def agreement(results: dict, reference: str, tol: float = AGREE_TOL, what: str = "") -> dict[str, dict]:
    """:func:`~bgem3_lib.analysis.reference_runs.max_differences` of every run in ``results`` (engine ->
    ``RunResult``) against ``results[reference]``; RuntimeError when dense or ColBERT vectors differ by > ``tol``."""
    diffs = {}
    for engine, res in results.items():
        if engine != reference:
            diffs[engine] = d = max_differences(results[reference], res)
            if not max(d["dense"], d["colbert"]) <= tol:
                raise RuntimeError(f"{engine} and {reference} disagree{what}: dense {d['dense']:.3g}, "
                                   f"ColBERT {d['colbert']:.3g} > {tol}")
    return diffs


def measure_long_cost(model_dir: str | Path, lengths: Sequence[int] = LENGTHS,
                      implementations: Sequence[str] = ("bgem3_lib", "flagembedding"),
                      workdir: str | Path | None = None, docs_per_length: int = 1, batch_size: int = 1,
                      label: str | None = None, seed: int = 0, tol: float = AGREE_TOL,
                      timeout: float = 4 * 3600) -> list[dict]:
    """One row per (length, engine): ``model`` (``label``, default the directory's name), ``implementation``,
    ``length``, ``docs``, ``seconds_per_doc``, ``cpu_seconds_per_doc``, ``tokens_per_s``, memory in MiB
    (``rss_after_load_mib``, ``rss_before_encode_mib`` after the warm-up, ``peak_growth_mib`` above it during the
    timed encode, ``max_rss_mib`` the process's peak) and,
    beside ``reference`` (FlagEmbedding if it ran, else the first engine), ``max_diff_dense`` /
    ``max_diff_colbert`` / ``max_diff_sparse``. Engines: keys of :data:`ENGINES`. RuntimeError when an
    engine encodes other token counts than the texts have, or its dense / ColBERT outputs differ by > ``tol``.
    """
    engines = list(implementations)
    if not engines or len(set(engines)) != len(engines) or any(e not in ENGINES for e in engines):
        raise ValueError(f"implementations must be distinct names from {list(ENGINES)}, got {engines}")
    lengths = [int(n) for n in lengths] if all(isinstance(n, (int, np.integer)) for n in lengths) else None
    if not lengths:
        raise ValueError("lengths must be a non-empty sequence of integers")
    tokenizer, max_length = model_tokenizer(model_dir)
    if min(lengths) <= tokenizer.n_special or max(lengths) > max_length:
        raise ValueError(f"lengths must lie in ({tokenizer.n_special}, {max_length}] for {model_dir}, got {lengths}")
    if docs_per_length < 1 or batch_size < 1:
        raise ValueError(f"docs_per_length and batch_size must be >= 1, got {docs_per_length}, {batch_size}")
    label = label or Path(model_dir).name
    reference = "flagembedding" if "flagembedding" in engines else engines[0]
    tmp = tempfile.TemporaryDirectory(prefix="long-cost-") if workdir is None else None
    root = Path(tmp.name if tmp else workdir)
    rows = []
    try:
        bar = tqdm(total=len(lengths) * len(engines), desc=f"long cost ({label})")
        for length in lengths:
            texts = texts_of_length(tokenizer, length, docs_per_length, seed)
            warmup = texts_of_length(tokenizer, min(length, WARMUP_TOKENS), 1, seed + 1)
            results = {}
            for engine in engines:
                bar.set_postfix_str(f"{engine} at {length} tokens")
                name, backend = ENGINES[engine]
                res = run_implementation(name, model_dir, texts, root / str(length) / engine.replace("/", "-"),
                                         max_length=max_length, batch_size=batch_size, timeout=timeout,
                                         warmup=warmup, skip_probe=name == "flagembedding", backend=backend)
                if res.n_tokens != length * len(texts):          # texts are never cut: max_length is the model's
                    raise RuntimeError(f"{engine} encoded {res.n_tokens} tokens, expected {len(texts)} x {length}")
                results[engine] = res
                bar.update()
            diffs = agreement(results, reference, tol, f" at {length} tokens ({label})")
            for engine, res in results.items():
                row = _row(engine, label, length, res, len(texts))
                if engine in diffs:
                    row.update(reference=reference, **{f"max_diff_{k}": diffs[engine][k]
                                                       for k in ("dense", "colbert", "sparse")})
                rows.append(row)
        bar.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def cost_table(rows: Sequence[dict], metric: str = "seconds_per_doc", ratio: bool = True):
    """pandas table of ``metric``: one row per length, one column per (model, engine), and (``ratio``) per model
    with both ``bgem3_lib`` and ``flagembedding`` a column ``FlagEmbedding / ours`` (their ratio)."""
    import pandas as pd
    if not rows or any(metric not in r for r in rows):
        raise ValueError(f"cost_table needs rows that all carry {metric!r}")
    df = pd.DataFrame(list(rows))
    columns = {}
    for model in dict.fromkeys(df["model"]):
        part = df[df["model"] == model]
        for engine in dict.fromkeys(part["implementation"]):
            columns[(model, engine)] = part[part["implementation"] == engine].set_index("length")[metric]
        if ratio and {"bgem3_lib", "flagembedding"} <= set(part["implementation"]):
            columns[(model, "FlagEmbedding / ours")] = columns[(model, "flagembedding")] / columns[(model, "bgem3_lib")]
    table = pd.DataFrame(columns).sort_index()
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["model", "engine"])
    table.index.name = "length"
    return table
