"""The engines of :mod:`~bgem3_lib.analysis.int8_quality`: one model (M3-small: the real multilingual-e5-small
encoder + our trained heads) encoded in float32 and int8 by two libraries, each run in its own process.

* ``bgem3_lib-float32`` / ``bgem3_lib-int8``: ``BGEM3(model, dtype=...)`` (MindSpore; int8 = ``kernels.int8``).
* ``ort-float32`` / ``ort-int8``: ONNX Runtime on the same weights, exported from the PyTorch reference by
  :mod:`~bgem3_lib.analysis.onnx_reference`, and its dynamic int8 quantization. :func:`m3_layout` writes the model
  in the BAAI/bge-m3 layout the exporter reads; :func:`onnx_models` exports it. The exporter's graph pools CLS (as
  BGE-M3 does); a mean-pooled model (e5) goes through the same ``onnx_reference._export`` with a mean-pooled dense
  output (:func:`_mean_graph`).

:func:`encode_all` gives every engine the model's prefixes (``"query: "`` / ``"passage: "`` for M3-small, as
``BGEM3.encode_queries`` / ``encode_corpus`` add them), one max_length (default the model's: 512) and one batch size,
and times the encode after a warm-up. Results are cached in ``cache_dir()/reference/int8-quality``.

>>> enc = encode_all("bgem3_lib-int8", ["Wer schrieb Faust?"], ["Goethe schrieb Faust."])   # doctest: +SKIP
>>> enc.out["dense_vecs"].shape, enc.n_queries                                             # doctest: +SKIP
((2, 384), 1)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..kernels.cpu import sources_digest
from .subprocess_jobs import _run, cached_job

ENGINES = ("bgem3_lib-float32", "bgem3_lib-int8", "ort-float32", "ort-int8")
CACHE_VERSION = 1
_MODULE = "bgem3_lib.analysis.int8_engines"      # what the subprocesses run


@dataclass
class Encodings:
    """One engine's encodings of ``n_queries`` queries then the passages, in ``out`` under FlagEmbedding's keys:
    ``dense_vecs`` [N, H], ``lexical_weights`` N dicts, ``colbert_vecs`` N arrays [n_i - 1, D]. ``seconds``: wall
    time of the timed encode (model loaded and warmed up), ``n_tokens``: the tokens it encoded.

    >>> e = Encodings("x", {"dense_vecs": np.eye(3), "lexical_weights": [{}, {"5": 1.0}, {}],
    ...                     "colbert_vecs": [np.ones((1, 3))] * 3}, n_queries=1)
    >>> e.part(passages=True)["dense_vecs"].shape, e.part(passages=False)["lexical_weights"]
    ((2, 3), [{}])
    """
    engine: str
    out: dict
    n_queries: int
    seconds: float = float("nan")
    n_tokens: int = 0

    def part(self, passages: bool) -> dict:
        rows = slice(self.n_queries, None) if passages else slice(0, self.n_queries)
        return {k: v[rows] for k, v in self.out.items()}


def _digest(lm) -> str:
    """sha256 of a resolved model's config, prefixes and every weight byte (encoder and heads)."""
    h = hashlib.sha256(json.dumps([lm.config.to_dict(), list(lm.instructions)], sort_keys=True).encode())
    for k, v in sorted({**lm.encoder_state, **(lm.heads_state or {})}.items()):
        h.update(f"{k}{np.shape(v)}{np.asarray(v).dtype}".encode())
        h.update(memoryview(np.ascontiguousarray(v)).cast("B"))
    return h.hexdigest()


def m3_layout(model: str = "m3-small") -> Path:
    """``model`` as a BAAI/bge-m3-layout directory: itself when it is one, else (written once)
    ``cache_dir()/reference/<name>-m3layout-<digest>/``: links to ``write_hf_directory(model)``'s files (config,
    ``model.safetensors``, tokenizer, ``m3_dense.json``) and the heads as float32 ``.pt`` files, written by torch."""
    from ..model.loading import resolve
    from ..paths import cache_dir
    from .onnx_reference import HEAD_FILES
    from .real_weight_runs import write_hf_directory
    if all((Path(str(model)) / f).is_file() for f in HEAD_FILES):
        return Path(str(model))
    lm = resolve(model)
    if lm.heads_state is None:
        raise ValueError(f"{model!r} has no sparse/ColBERT heads: nothing to export in the BAAI layout")
    out = cache_dir() / "reference" / f"{Path(str(model)).name}-m3layout-{_digest(lm)[:16]}"
    if not (out / "sparse_linear.pt").is_file():                 # written last: marks a complete directory
        hf = write_hf_directory(model)
        out.mkdir(parents=True, exist_ok=True)
        for f in hf.iterdir():
            if not (out / f.name).exists():
                (out / f.name).symlink_to(f.resolve())
        np.savez(out / "heads.npz", **{k: np.asarray(v, np.float32) for k, v in lm.heads_state.items()})
        _run(["-m", _MODULE, "heads", str(out)], "writing the heads as .pt files", 900)
    return out


def onnx_models(layout: Path) -> tuple[Path, Path]:
    """(fp32, int8) ONNX files of a BAAI-layout directory, exported once: ``exported_onnx`` for a CLS-pooled
    model; a mean-pooled one (``m3_dense.json``) by ``onnx_reference``'s export and quantization, in ``onnx-mean/``."""
    from ..paths import file_lock, temp_tag
    from .onnx_reference import checkpoint_files, exported_onnx, is_fresh, quantize_onnx
    head = layout / "m3_dense.json"
    if not head.is_file() or json.loads(head.read_text())["pooling"] == "cls":
        return exported_onnx(layout), exported_onnx(layout, int8=True)
    fp32, q8 = layout / "onnx-mean" / "model.onnx", layout / "onnx-mean" / "model_int8.onnx"
    with file_lock(fp32.parent / ".export.lock", f"the ONNX export of {layout}"):
        if not is_fresh(fp32, checkpoint_files(layout)):
            _run(["-m", _MODULE, "export", str(layout), str(fp32)], "the mean-pooled ONNX export", 3600)
        if not is_fresh(q8, [fp32]):
            tmp = q8.parent / f".{q8.name}.{temp_tag()}.onnx"
            quantize_onnx(fp32, tmp)
            os.replace(tmp, q8)
    return fp32, q8


def encode_all(engine: str, queries: list[str], passages: list[str], model: str = "m3-small",
               max_length: int | None = None, batch_size: int = 64, cache: bool = True,
               timeout: float = 7200) -> Encodings:
    """Dense, lexical and ColBERT outputs of ``queries`` then ``passages`` (raw texts: each engine adds the model's
    prefixes) by ``engine``, in its own process; ``max_length`` None: the model's. Cached unless ``cache=False``
    (key: the weights, engine, texts, settings, MindSpore and ONNX Runtime versions, the ONNX file's time,
    our kernels' sources and the CPU's flags)."""
    from ..model.loading import resolve
    from ..model.tokenization import check_texts
    from ..paths import cache_dir
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if isinstance(queries, str) or isinstance(passages, str):
        raise ValueError("queries and passages must be lists of texts, not a single string")
    queries, passages = check_texts(queries), check_texts(passages)
    lm = resolve(model)
    job = {"engine": engine, "model": str(model), "queries": queries, "passages": passages,
           "prefixes": list(lm.instructions), "max_length": int(max_length or lm.config.max_length),
           "batch_size": int(batch_size), "tokenizer": str(lm.tokenizer_path)}
    if engine.startswith("ort"):
        job["onnx"] = str(onnx_models(m3_layout(model))[engine == "ort-int8"])
    versions = {p: metadata.version(p) for p in ("mindspore", "onnxruntime")}
    ident = [CACHE_VERSION, _digest(lm), versions, {k: v for k, v in job.items() if k not in ("onnx", "tokenizer")},
             job.get("onnx") and os.stat(job["onnx"]).st_mtime, engine.startswith("bgem3_lib") and sources_digest()]
    data, info = cached_job(cache_dir() / "reference" / "int8-quality", engine, ident, job, [_MODULE, "encode"],
                            f"the {engine} run", timeout, cache)
    colbert = np.split(data["colbert"], np.cumsum(data["colbert_len"])[:-1])
    out = {"dense_vecs": data["dense"], "lexical_weights": info.pop("lexical"), "colbert_vecs": colbert}
    return Encodings(engine, out, len(queries), info["seconds"], info["n_tokens"])


# ----------------------------------------------------------------------------- subprocess side

def _mean_graph(m3_graph):
    """``onnx_reference._m3_graph`` with its dense output mean-pooled over the attended tokens (e5's pooling)."""
    def build(model_dir):
        import torch
        import torch.nn.functional as F
        inner = m3_graph(model_dir)

        class MeanPooled(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                m = self.inner
                hidden = m.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask[..., None].to(hidden.dtype)
                colbert = m.colbert_linear(hidden[:, 1:]) * mask[:, 1:]
                dense = (hidden * mask).sum(1) / mask.sum(1)
                sparse = torch.relu(m.sparse_linear(hidden)).squeeze(-1)
                return F.normalize(dense, dim=-1), sparse, F.normalize(colbert, dim=-1)
        return MeanPooled().eval()
    return build


def _encode_job(job_file: str, arrays: str, meta: str) -> None:
    from ..paths import atomic_write
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    (qp, pp), kw = job["prefixes"], {"max_length": job["max_length"], "batch_size": job["batch_size"]}
    if job["engine"].startswith("bgem3_lib"):
        from ..model.bgem3 import BGEM3
        m = BGEM3(job["model"], device="CPU", dtype=job["engine"].split("-")[1])
        if [m.query_instruction, m.passage_instruction] != job["prefixes"]:
            raise RuntimeError(f"{job['model']}'s prefixes are not {job['prefixes']}")
        kw.update(return_sparse=True, return_colbert_vecs=True, show_progress=False)
        fns, tokenizer = (lambda t: m.encode_queries(t, **kw), lambda t: m.encode_corpus(t, **kw)), m.tokenizer
    else:
        from .onnx_reference import OnnxEncoder
        enc = OnnxEncoder(job["onnx"], job["tokenizer"])
        enc.max_tokens = job["max_length"]        # its metadata counts XLM-R's offset positions: 510 for BERT's 512
        fns = (lambda t: enc.encode([qp + x for x in t], **kw), lambda t: enc.encode([pp + x for x in t], **kw))
        tokenizer = enc.tokenizer
    n_tokens = sum(len(x) for p, ts in ((qp, job["queries"]), (pp, job["passages"]))
                   for x in tokenizer.encode_ids([p + t for t in ts], job["max_length"], warn=False))
    fns[1](job["passages"][:8])                                       # warm-up, untimed
    wall, cpu = time.perf_counter(), time.process_time()
    outs = [fns[0](job["queries"]), fns[1](job["passages"])]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    colbert = [np.asarray(c, np.float32) for o in outs for c in o["colbert_vecs"]]
    with atomic_write(arrays, suffix=".npz") as tmp:
        np.savez(tmp, dense=np.vstack([o["dense_vecs"] for o in outs]).astype(np.float32),
                 colbert=np.concatenate(colbert), colbert_len=np.array([len(c) for c in colbert]))
    with atomic_write(meta) as tmp:
        tmp.write_text(json.dumps({"seconds": wall, "cpu_seconds": cpu, "n_tokens": n_tokens,
                                   "date": time.strftime("%Y-%m-%d %H:%M"), "engine": job["engine"],
                                   "lexical": [{str(k): float(v) for k, v in d.items()}
                                               for o in outs for d in o["lexical_weights"]]}))


def _write_heads(out: str) -> None:
    import torch
    out, heads = Path(out), np.load(Path(out) / "heads.npz")
    for name in ("colbert_linear", "sparse_linear"):                  # sparse last: marks the directory complete
        torch.save({p: torch.from_numpy(heads[f"{name}.{p}"]) for p in ("weight", "bias")}, out / f".{name}.tmp")
        os.replace(out / f".{name}.tmp", out / f"{name}.pt")
    (out / "heads.npz").unlink()


if __name__ == "__main__":
    if sys.argv[1:2] == ["encode"] and len(sys.argv) == 5:
        _encode_job(*sys.argv[2:])
    elif sys.argv[1:2] == ["heads"] and len(sys.argv) == 3:
        _write_heads(sys.argv[2])
    elif sys.argv[1:2] == ["export"] and len(sys.argv) == 4:
        from . import onnx_reference
        onnx_reference._m3_graph = _mean_graph(onnx_reference._m3_graph)
        onnx_reference._export(sys.argv[2], sys.argv[3], "17")
    else:
        sys.exit(f"usage: python -m {_MODULE} encode JOB.json OUT.npz OUT.json | heads DIR | export DIR OUT.onnx")
