"""The seed article's experiment in miniature: one set of real weights, three implementations, the
MKQA-style cross-lingual task (XQuAD questions in 11 languages against the 240 English paragraphs),
dense retrieval, MKQA's answer-match Recall@20/@100.

* :func:`write_hf_directory` - a ``BGEM3`` model's encoder (``"m3-small"``: real multilingual-e5-small
  weights) as a Hugging Face directory written from the very arrays ``BGEM3`` loads, plus ``m3_dense.json``
  (pooling, normalisation, prefixes). e5-small keeps BERT's absolute positions, so the directory says
  ``model_type: bert``, as ``intfloat/multilingual-e5-small`` does (BGE-M3: ``xlm-roberta``).
* :func:`encode_dense` - dense vectors of queries and passages by one of :data:`IMPLEMENTATIONS`, each in
  its own process: ``bgem3_lib`` (``BGEM3(model).encode_queries`` / ``encode_corpus``, MindSpore),
  ``transformers`` (``AutoModel`` on PyTorch) and ``mindnlp`` (the same ``AutoModel`` class run by MindNLP
  0.5 on MindSpore). The last two tokenize with ``AutoTokenizer`` and pool and normalise in their own
  tensors (:func:`_torch_dense`, the e5 model card's average pool + ``F.normalize``); nothing of
  ``bgem3_lib`` runs there. A digest of the token ids shows whether all three tokenized alike. Cached in
  ``cache_dir()/reference/real-weights``, keyed by model fingerprint, texts, lengths, batches, package versions.
* :func:`xling_comparison` - per language Recall@20/@100 of every implementation (the project's
  :func:`~bgem3_lib.retrieval.index.top_k` and :func:`~bgem3_lib.retrieval.metrics.answer_hits_at_k`, the
  ks of :data:`~bgem3_lib.evaluation.runner.ANSWER_KS`), their differences from ``transformers`` in
  points, and how far the embeddings are apart (:func:`embedding_differences`).

>>> res = xling_comparison(["de"], n_questions=40)       # doctest: +SKIP
>>> list(res.runs), res.n_passages                       # doctest: +SKIP
(['bgem3_lib', 'transformers', 'mindnlp'], 240)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from .reference_runs import import_mindnlp, sorted_batches
from .subprocess_jobs import cached_job

IMPLEMENTATIONS = ("bgem3_lib", "transformers", "mindnlp")
REFERENCE = "transformers"
CACHE_VERSION = 1
_PACKAGES = ("mindspore", "mindnlp", "torch", "transformers", "tokenizers")
_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                   "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}


@dataclass
class DenseRun:
    """Dense vectors of one implementation: ``queries`` [Nq, H], ``passages`` [Np, H]; ``seconds`` wall time
    of the encode calls of the run that computed them (model loaded, first call included); ``n_tokens``
    tokens encoded; ``ids_digest`` sha256 of every text's token ids (equal digests: identical tokenization)."""
    name: str
    queries: np.ndarray
    passages: np.ndarray
    seconds: float
    n_tokens: int
    ids_digest: str


def write_hf_directory(model: str = "m3-small", root: str | Path | None = None) -> Path:
    """``root/<name>-<fingerprint[:16]>/``: the model's encoder as a ``transformers`` directory (written once)."""
    from ..model.bgem3 import BGEM3
    from ..model.fingerprint import model_fingerprint
    from ..model.loading import resolve
    from ..paths import atomic_write, cache_dir
    from ..weights.checkpoint_io import save_state_dict
    lm = resolve(model)
    fp = model_fingerprint(BGEM3(model, loaded=lm), heads=False)
    cfg = lm.config
    out = Path(root or cache_dir() / "reference") / f"{Path(str(model)).name}-hf-{fp[:16]}"
    if (out / "m3_dense.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    arch = {"bert": ("bert", "BertModel"), "xlm-roberta": ("xlm-roberta", "XLMRobertaModel")}[cfg.model_type]
    (out / "config.json").write_text(json.dumps({
        "architectures": [arch[1]], "model_type": arch[0], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": cfg.hidden_act, "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "tokenizer_class": "XLMRobertaTokenizer",
        "torch_dtype": "float32"}, indent=1))
    save_state_dict({k: np.ascontiguousarray(v, np.float32) for k, v in lm.encoder_state.items()},
                    out / "model.safetensors")
    shutil.copyfile(lm.tokenizer_path, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": cfg.max_length, **_SPECIAL_TOKENS}))
    (out / "special_tokens_map.json").write_text(json.dumps(_SPECIAL_TOKENS))
    with atomic_write(out / "m3_dense.json") as tmp:     # last: its presence marks a complete directory
        tmp.write_text(json.dumps({"model": str(model), "fingerprint": fp, "pooling": cfg.pooling,
                                   "normalize": True, "prefixes": list(lm.instructions)}))
    return out


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _versions() -> dict[str, str]:
    return {p: _version(p) for p in _PACKAGES}


def encode_dense(name: str, hf_dir: str | Path, queries: list[str], passages: list[str], max_length: int = 512,
                 batch_size: int = 32, query_batch_size: int = 128, cache: bool = True,
                 timeout: float = 7200) -> DenseRun:
    """Dense vectors of ``queries`` and ``passages`` (prefixes added as the model's dense head expects)
    by implementation ``name``, in a subprocess; cached unless ``cache=False``. Passages go in batches of
    ``batch_size``, the short queries in batches of ``query_batch_size`` (fewer calls: MindNLP's per-call
    overhead dominates on short texts)."""
    from ..paths import cache_dir
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    if not queries or not passages or not all(isinstance(t, str) and t.strip() for t in [*queries, *passages]):
        raise ValueError("queries and passages must be non-empty lists of non-empty strings")
    hf_dir = Path(hf_dir)
    head = json.loads((hf_dir / "m3_dense.json").read_text())
    job = {"model": head["model"], "hf_dir": str(hf_dir), "query": list(queries), "passage": list(passages),
           "max_length": int(max_length), "batch_size": {"query": int(query_batch_size), "passage": int(batch_size)}}
    ident = [CACHE_VERSION, name, head, _versions(), job["query"], job["passage"], max_length, job["batch_size"]]
    data, info = cached_job(cache_dir() / "reference" / "real-weights", name, ident, job, [__name__, name],
                            f"the {name} dense run", timeout, cache)
    return DenseRun(name, data["query"], data["passage"], info["seconds"], info["n_tokens"], info["ids_digest"])


def embedding_differences(runs: dict[str, DenseRun], reference: str = REFERENCE) -> pd.DataFrame:
    """Per implementation vs ``reference``: max |Δ| of any vector component, mean and min cosine (queries
    and passages together).

    >>> a = DenseRun("a", np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), 1.0, 4, "x")
    >>> b = DenseRun("b", np.array([[0.8, 0.6]]), np.array([[0.0, 1.0]]), 1.0, 4, "x")
    >>> embedding_differences({"a": a, "b": b}, reference="b").round(2).to_dict("index")
    {'a vs b': {'max |Δ|': 0.6, 'mean cosine': 0.9, 'min cosine': 0.8}}
    """
    ref = np.vstack([runs[reference].queries, runs[reference].passages]).astype(np.float64)
    rows = {}
    for name, run in runs.items():
        if name == reference:
            continue
        x = np.vstack([run.queries, run.passages]).astype(np.float64)
        if x.shape != ref.shape:
            raise ValueError(f"{name} and {reference} encoded different inputs: {x.shape} vs {ref.shape}")
        cos = (x * ref).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1))
        rows[f"{name} vs {reference}"] = {"max |Δ|": float(np.abs(x - ref).max()), "mean cosine": float(cos.mean()),
                                          "min cosine": float(cos.min())}
    return pd.DataFrame(rows).T


def answer_hits(query_vecs: np.ndarray, passage_vecs: np.ndarray, passages: list[str], answers: list[list[str]],
                ks=None) -> dict[int, np.ndarray]:
    """{k: [Nq] bool}: does one of query i's top-k passages by dense score (inner product) contain one of its
    answers? The project's ``top_k`` and MKQA answer match; ``ks`` defaults to the runner's ``ANSWER_KS``.

    >>> hits = answer_hits(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [1.0, 0.0]]),
    ...                    ["Paris is in France", "Berlin is big"], [["Berlin"], ["Rome"]], ks=(1, 2))
    >>> {k: v.tolist() for k, v in hits.items()}
    {1: [True, False], 2: [True, False]}
    """
    from ..evaluation.runner import ANSWER_KS
    from ..retrieval.index import top_k
    from ..retrieval.metrics import answer_hits_at_k
    ks = tuple(ANSWER_KS if ks is None else ks)
    idx, _ = top_k(np.asarray(query_vecs) @ np.asarray(passage_vecs).T, min(max(ks), len(passages)))
    ranked = [[passages[j] for j in row] for row in idx]
    return {k: answer_hits_at_k(ranked, answers, k) for k in ks}


@dataclass
class XlingResult:
    """``table``: one row per language (and ``avg``, the macro mean): questions, ``R@k <impl>`` and
    ``Δ R@k <impl>`` (impl - transformers, in recall points); ``flips``: per language and k, questions whose
    hit differs from ``transformers``; ``embeddings``: :func:`embedding_differences`; ``runs``: the vectors."""
    table: pd.DataFrame
    flips: pd.DataFrame
    embeddings: pd.DataFrame
    runs: dict[str, DenseRun]
    n_passages: int
    seconds: float


def xling_comparison(langs=None, n_questions: int | None = None, n_passages: int | None = None,
                     model: str = "m3-small", implementations=IMPLEMENTATIONS, max_length: int = 512,
                     batch_size: int = 32, cache: bool = True, seed: int = 0) -> XlingResult:
    """Encode the English paragraphs (all 240, or a seeded ``n_passages`` holding the chosen questions' own
    paragraphs) and the questions of ``langs`` (all 11 when None; a seeded sample of ``n_questions`` each,
    the same question ids in every language, all when None) with every implementation; score each language."""
    from ..evaluation.offline_sets import XQUAD_XLING_LANGS, load_xquad_xling
    from ..evaluation.runner import ANSWER_KS
    from ..evaluation.subsets import subset_evalset
    from ..retrieval.metrics import answer_tokens
    start = time.perf_counter()
    if REFERENCE not in implementations:
        raise ValueError(f"implementations must include the reference {REFERENCE!r}")
    sets = [subset_evalset(load_xquad_xling(lang), n_queries=n_questions, n_docs=n_passages, seed=seed)
            for lang in (XQUAD_XLING_LANGS if langs is None else langs)]
    passages = list(sets[0].corpus.values())
    if any(list(s.corpus.values()) != passages for s in sets):
        raise ValueError("the languages' English corpora differ")
    qids = [[q for q in s.queries if any(answer_tokens(a) for a in s.answers.get(q, []))] for s in sets]
    queries = [s.queries[q] for s, ids in zip(sets, qids) for q in ids]
    hf_dir = write_hf_directory(model)
    runs = {impl: encode_dense(impl, hf_dir, queries, passages, max_length, batch_size, cache=cache)
            for impl in implementations}
    digests = {r.ids_digest for r in runs.values()}
    if len(digests) != 1:
        raise RuntimeError("the implementations tokenized differently (token-id digests "
                           f"{ {n: r.ids_digest[:12] for n, r in runs.items()} })")
    rows, flips, offset = {}, {}, 0
    for s, ids in zip(sets, qids):
        answers = [s.answers[q] for q in ids]
        hits = {impl: answer_hits(r.queries[offset:offset + len(ids)], r.passages, passages, answers)
                for impl, r in runs.items()}
        offset += len(ids)
        row = {"questions": len(ids)}
        for k in ANSWER_KS:
            row.update({f"R@{k} {impl}": float(h[k].mean()) for impl, h in hits.items()})
            row.update({f"Δ R@{k} {impl}": 100 * float(hits[impl][k].mean() - hits[REFERENCE][k].mean())
                        for impl in runs if impl != REFERENCE})
            flips[s.lang, k] = {impl: int((hits[impl][k] != hits[REFERENCE][k]).sum()) for impl in runs
                                if impl != REFERENCE}
        rows[s.lang] = row
    table = pd.DataFrame(rows).T
    if len(table) > 1:
        table.loc["avg"] = pd.Series(table.mean().to_dict() | {"questions": table["questions"].sum()})
    table["questions"] = table["questions"].astype(int)
    return XlingResult(table, pd.DataFrame(flips).T.rename_axis(["lang", "k"]), embedding_differences(runs), runs,
                       len(passages), time.perf_counter() - start)


# ----------------------------------------------------------------------------- subprocess side

def _torch_dense(torch, tokenizer, model, texts: list[str], head: dict, max_length: int, batch_size: int):
    """Dense vectors with torch ops only (PyTorch, or MindNLP's shim): tokenizer -> encoder -> pooling ->
    L2 normalisation, longest texts batched together."""
    out = [None] * len(texts)
    for idx, enc in sorted_batches(tokenizer, texts, max_length, batch_size):
        with torch.no_grad():
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            if head["pooling"] == "mean":                 # e5's average_pool
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vecs = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
            else:
                vecs = hidden[:, 0]
            if head["normalize"]:
                vecs = torch.nn.functional.normalize(vecs, p=2, dim=-1)
        for j, i in enumerate(idx):
            out[i] = vecs[j].numpy()
    return np.stack(out)


def _main(name: str, job_file: str, arrays: str, meta: str) -> None:
    from ..paths import atomic_write
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    ml, bs = job["max_length"], job["batch_size"]
    head = json.loads((Path(job["hf_dir"]) / "m3_dense.json").read_text())
    texts = {kind: [p + t for t in job[kind]] for kind, p in zip(("query", "passage"), head["prefixes"])}
    if name == "bgem3_lib":
        from ..model.bgem3 import BGEM3
        from ..model.fingerprint import model_fingerprint
        m = BGEM3(job["model"], device="CPU", dtype="float32")
        if model_fingerprint(m, heads=False) != head["fingerprint"]:
            raise RuntimeError(f"{job['model']} no longer holds the weights {job['hf_dir']} was written from")
        ids = [m.tokenizer.encode_ids(texts[k], ml, warn=False) for k in texts]
        wall = time.perf_counter()
        vecs = {"query": m.encode_queries(job["query"], batch_size=bs["query"], max_length=ml, show_progress=False),
                "passage": m.encode_corpus(job["passage"], batch_size=bs["passage"], max_length=ml,
                                           show_progress=False)}
        vecs = {k: v["dense_vecs"] for k, v in vecs.items()}
    else:
        if name == "mindnlp":
            import_mindnlp()          # first: from here on `torch` is MindNLP's MindSpore shim
            import torch
            from mindnlp.transformers import AutoModel, AutoTokenizer
            if "mindtorch" not in getattr(torch, "__file__", ""):
                raise RuntimeError(f"mindnlp did not take over torch (torch is {torch.__file__})")
        else:
            import torch
            from transformers import AutoModel, AutoTokenizer
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        tok = AutoTokenizer.from_pretrained(job["hf_dir"])
        model = AutoModel.from_pretrained(job["hf_dir"], torch_dtype=torch.float32).eval()
        ids = [tok(texts[k], truncation=True, max_length=ml)["input_ids"] for k in texts]
        wall = time.perf_counter()
        vecs = {k: _torch_dense(torch, tok, model, texts[k], head, ml, bs[k]) for k in texts}
    wall = time.perf_counter() - wall
    with atomic_write(arrays, suffix=".npz") as tmp:
        np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in vecs.items()})
    digest = hashlib.sha256(json.dumps([[list(map(int, x)) for x in part] for part in ids]).encode()).hexdigest()
    with atomic_write(meta) as tmp:
        tmp.write_text(json.dumps({"seconds": wall, "n_tokens": sum(len(x) for part in ids for x in part),
                                   "ids_digest": digest, "implementation": name, "versions": _versions()}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
