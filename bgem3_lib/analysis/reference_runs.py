"""One M3 checkpoint, three implementations: ``bgem3_lib`` (MindSpore), FlagEmbedding (PyTorch) and
MindNLP 0.5 (transformers on MindSpore), each run in its own Python process.

Separate processes are required, not just tidy: importing ``mindnlp`` replaces ``torch`` by its
MindSpore shim for the whole process, and PyTorch and MindSpore each bring their own thread pools.
The parent process never imports torch or mindnlp; texts go in and outputs come back as JSON/NPZ
files in a work directory (the subprocess call: :mod:`~bgem3_lib.analysis.subprocess_jobs`).

* :func:`write_random_checkpoint` - a random-weight checkpoint in the exact ``BAAI/bge-m3`` file
  layout, written by torch (:mod:`bgem3_lib.analysis.torch_reference`) in a subprocess;
* :func:`run_implementation` - encode texts with one implementation (dense, sparse, ColBERT) after
  a warm-up call (on the first four texts, or on ``warmup`` texts); returns a :class:`RunResult` with the
  outputs, the timed encode and its memory: resident memory after loading the model, the peak growth of
  resident memory during the timed encode (sampled by a thread) and the process's absolute peak;
* :func:`max_differences` - largest absolute difference of two runs per representation.

The MindNLP run uses MindNLP for everything up to the head projections (tokenizer, XLM-RoBERTa
encoder, ``colbert_linear`` / ``sparse_linear`` as shim-torch ``Linear`` layers) and the NumPy
post-processing of :mod:`bgem3_lib.model.heads` (CLS pick, per-token max, padding removal,
normalisation), which the equivalence test checks against FlagEmbedding.

>>> ckpt = write_random_checkpoint("/tmp/m3-rand", layers=2, hidden=64, heads=4, ffn=128)  # doctest: +SKIP
>>> ref = run_implementation("flagembedding", ckpt, ["hello", "bonjour"], "/tmp/w")        # doctest: +SKIP
>>> ref.dense.shape, ref.n_tokens                                                          # doctest: +SKIP
((2, 64), 7)
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .subprocess_jobs import _run

IMPLEMENTATIONS = ("bgem3_lib", "flagembedding", "mindnlp")


@dataclass
class RunResult:
    """Outputs of one implementation for N texts and the timing of its encode call.

    ``dense`` [N, H]; ``lexical`` N dicts {token_id_str: weight}; ``colbert`` N arrays [n_i - 1, H];
    ``seconds`` wall time and ``cpu_seconds`` process CPU time of the timed encode (after a warm-up
    call, model already loaded); ``n_tokens`` tokens encoded (special tokens included).
    Memory in bytes (0 when not recorded): ``rss_after_load`` resident memory once the model is loaded
    (weights a library maps from the file count only once touched); ``rss_before_encode`` after the warm-up;
    ``peak_growth`` peak resident memory during the timed encode minus ``rss_before_encode``;
    ``max_rss`` the process's peak resident memory over its whole life (``ru_maxrss``).
    """
    name: str
    dense: np.ndarray
    lexical: list[dict[str, float]]
    colbert: list[np.ndarray]
    seconds: float
    cpu_seconds: float
    n_tokens: int
    rss_after_load: int = 0
    rss_before_encode: int = 0
    peak_growth: int = 0
    max_rss: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds


def write_random_checkpoint(out_dir: str | Path, layers: int, hidden: int, heads: int, ffn: int,
                            max_pos: int = 514, seed: int = 0, timeout: float = 1800) -> Path:
    """Write a random BGE-M3-layout checkpoint (torch, in a subprocess) unless ``out_dir`` has one of this
    shape (one of another shape, e.g. fewer positions, is replaced)."""
    out = Path(out_dir)
    want = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "intermediate_size": ffn, "max_position_embeddings": max_pos}
    if all((out / f).is_file() for f in ("pytorch_model.bin", "sparse_linear.pt", "config.json")):
        have = json.loads((out / "config.json").read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return out
    from ..weights.assets import asset_path
    from .torch_reference import run_reference
    run_reference("write_bge_m3_checkpoint", timeout=int(timeout), out_dir=str(out),
                  tokenizer_json=str(asset_path("tokenizer.json")), layers=layers, hidden=hidden, heads=heads,
                  ffn=ffn, max_pos=max_pos, seed=seed)
    return out


def run_implementation(name: str, model_dir: str | Path, texts: list[str], workdir: str | Path,
                       max_length: int = 512, batch_size: int = 16, timeout: float = 3600,
                       warmup: list[str] | None = None, skip_probe: bool = False,
                       backend: str | None = None) -> RunResult:
    """Encode ``texts`` with implementation ``name`` (one of :data:`IMPLEMENTATIONS`) in a subprocess.

    ``model_dir``: a checkpoint directory; for ``bgem3_lib`` also a model name of the library (e.g.
    ``"m3-small-long"``). ``warmup``: the texts of the untimed warm-up call (default: the first four
    texts; short texts keep the timed call's memory peak its own). ``skip_probe``: FlagEmbedding's
    ``encode`` first runs its longest batch once more to probe the batch size and throws the result away;
    True skips that forward, so ``seconds`` is FlagEmbedding's time without it. ``backend``: the
    ``bgem3_lib`` backend (``"kernels"`` / ``"mindspore"``; None: the library's choice).
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    for what, values in (("texts", texts), ("warmup", texts if warmup is None else warmup)):
        if not values or not all(isinstance(t, str) and t for t in values):
            raise ValueError(f"{what} must be a non-empty list of non-empty strings")
    if backend is not None and name != "bgem3_lib":
        raise ValueError(f"backend={backend!r} applies to bgem3_lib only, not to {name}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not (name == "bgem3_lib" and _library_name(model_dir)):
        raise FileNotFoundError(f"no checkpoint in {model_dir} (config.json missing)")
    out = Path(workdir) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    options = {"warmup": texts[:4] if warmup is None else list(warmup), "skip_probe": bool(skip_probe),
               "backend": backend}
    (out / "options.json").write_text(json.dumps(options, ensure_ascii=False), encoding="utf-8")
    _run(["-m", "bgem3_lib.analysis.reference_runs", name, str(model_dir), str(out), str(max_length), str(batch_size)],
         f"the {name} run", timeout)
    return load_result(name, out)


def _library_name(model_dir: Path) -> bool:
    """True when ``model_dir`` is a model name ``bgem3_lib`` resolves itself (``m3-small``, ``m3-small-long``...)."""
    from ..model.loading import LONG_MODELS
    return str(model_dir) in {"m3-small", *LONG_MODELS}


def load_result(name: str, out: Path) -> RunResult:
    timing = json.loads((out / "timing.json").read_text())
    colbert = np.load(out / "colbert.npz")
    memory = {k: timing.get(k, 0) for k in ("rss_after_load", "rss_before_encode", "peak_growth", "max_rss")}
    return RunResult(name, np.load(out / "dense.npy"), json.loads((out / "lexical.json").read_text()),
                     [colbert[f"arr_{i}"] for i in range(len(colbert.files))], timing["seconds"],
                     timing["cpu_seconds"], timing["n_tokens"], **memory)


def max_differences(a: RunResult, b: RunResult) -> dict[str, float]:
    """Max |a - b| of ``dense`` vectors, ``sparse`` weights (over the union of tokens, a missing token
    counting as weight 0), ``colbert`` vectors and the dense score matrix ``dense_scores`` (texts x texts).

    >>> r = RunResult("x", np.eye(2), [{"5": 1.0}, {}], [np.ones((1, 2))] * 2, 1.0, 1.0, 4)
    >>> max_differences(r, RunResult("y", np.eye(2), [{"5": 0.5}, {"7": 0.25}], [np.ones((1, 2))] * 2,
    ...                                1.0, 1.0, 4))["sparse"]
    0.5
    """
    if a.dense.shape != b.dense.shape or len(a.lexical) != len(b.lexical) or len(a.colbert) != len(b.colbert):
        raise ValueError(f"runs {a.name} and {b.name} encode different inputs: dense {a.dense.shape} vs "
                         f"{b.dense.shape}, {len(a.lexical)} vs {len(b.lexical)} texts")
    sparse = 0.0
    for x, y in zip(a.lexical, b.lexical):
        for t in set(x) | set(y):
            sparse = max(sparse, abs(x.get(t, 0.0) - y.get(t, 0.0)))
    colbert = 0.0
    for i, (x, y) in enumerate(zip(a.colbert, b.colbert)):
        if x.shape != y.shape:
            raise ValueError(f"text {i}: ColBERT shapes differ ({a.name} {x.shape}, {b.name} {y.shape})")
        colbert = max(colbert, float(np.abs(x - y).max()))
    return {"dense": float(np.abs(a.dense - b.dense).max()), "sparse": sparse, "colbert": colbert,
            "dense_scores": float(np.abs(a.dense @ a.dense.T - b.dense @ b.dense.T).max())}


# ----------------------------------------------------------------------------- subprocess side

def _encode_bgem3_lib(model_dir: Path, texts: list[str], max_length: int, batch_size: int,
                      backend: str | None = None, **_):
    from bgem3_lib import BGEM3
    model = BGEM3(str(model_dir), backend=backend)
    n_tokens = sum(len(x) for x in model.tokenizer.encode_ids(texts, max_length, warn=False))

    def encode(batch):
        out = model.encode(batch, batch_size=batch_size, max_length=max_length, return_dense=True,
                           return_sparse=True, return_colbert_vecs=True, show_progress=False)
        return out["dense_vecs"], out["lexical_weights"], out["colbert_vecs"]
    return encode, n_tokens


def _encode_flagembedding(model_dir: Path, texts: list[str], max_length: int, batch_size: int,
                          skip_probe: bool = False, **_):
    import torch
    from FlagEmbedding import BGEM3FlagModel
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = BGEM3FlagModel(str(model_dir), use_fp16=False, devices="cpu")
    if skip_probe:
        model.model = _SkipFirstCall(model.model)
    ids = model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    n_tokens = sum(len(x) for x in ids)

    def encode(batch):
        if skip_probe:
            model.model.skip = True
        out = model.encode(batch, batch_size=batch_size, max_length=max_length, return_dense=True,
                           return_sparse=True, return_colbert_vecs=True)
        return np.asarray(out["dense_vecs"]), out["lexical_weights"], out["colbert_vecs"]
    return encode, n_tokens


class _SkipFirstCall:
    """FlagEmbedding's model with its next call skipped while ``skip`` is set: ``encode`` calls the model on
    its longest batch once to probe the batch size, only checking that the call does not raise."""

    def __init__(self, inner):
        self.inner, self.skip = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        if self.skip:
            self.skip = False
            return None
        return self.inner(*args, **kwargs)


def import_mindnlp() -> None:
    """``import mindnlp`` (from then on ``torch`` in this process is MindNLP's MindSpore shim), with ONNX Runtime
    hidden: MindNLP 0.5 runs ``from diffusers import *``, and diffusers 0.35, seeing ``onnxruntime`` installed,
    exports ONNX pipelines it no longer has (AttributeError). The process never uses ONNX Runtime."""
    if "onnxruntime" not in sys.modules or sys.modules["onnxruntime"] is None:
        sys.modules["onnxruntime"] = None          # importlib.util.find_spec now answers "not installed"
    import mindnlp  # noqa: F401


def _encode_mindnlp(model_dir: Path, texts: list[str], max_length: int, batch_size: int, **_):
    import_mindnlp()
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bgem3_lib.model.heads import colbert_embedding, dense_embedding, pack_padded, sparse_embedding
    if "mindtorch" not in getattr(torch, "__file__", ""):
        raise RuntimeError(f"mindnlp did not take over torch (torch is {torch.__file__})")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    hidden = model.config.hidden_size
    colbert_linear, sparse_linear = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 1)
    for layer, f in ((colbert_linear, "colbert_linear.pt"), (sparse_linear, "sparse_linear.pt")):
        layer.load_state_dict({k: v.float() for k, v in torch.load(str(model_dir / f)).items()})
    special = [tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    n_tokens = sum(len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"])

    def encode(batch):
        dense, lexical, colbert = [None] * len(batch), [None] * len(batch), [None] * len(batch)
        for idx, enc in sorted_batches(tokenizer, batch, max_length, batch_size):
            with torch.no_grad():
                h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                weights = torch.relu(sparse_linear(h)).squeeze(-1).numpy()
                col = colbert_linear(h).numpy()
            ids, mask = enc["input_ids"].numpy(), enc["attention_mask"].numpy()
            states, offsets = pack_padded(h.numpy(), mask)
            d = dense_embedding(states, offsets, "cls")
            lw = sparse_embedding(pack_padded(weights, mask)[0], pack_padded(ids, mask)[0], offsets, special)
            cv = colbert_embedding(pack_padded(col, mask)[0], offsets)
            for j, i in enumerate(idx):
                dense[i], lexical[i], colbert[i] = d[j], lw[j], cv[j]
        return np.stack(dense), lexical, colbert
    return encode, n_tokens


def sorted_batches(tokenizer, texts: list[str], max_length: int, batch_size: int):
    """Padded batches as a user runs them, the longest texts together: yields (indices into ``texts``,
    the tokenizer's ``pt`` batch). Runs in the subprocesses (transformers' tokenizer, torch or its shim)."""
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort([-n for n in lengths], kind="stable")
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        yield idx, tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                             return_tensors="pt")


def _main(argv: list[str]) -> None:
    name, model_dir, out, max_length, batch_size = argv
    model_dir, out, max_length, batch_size = Path(model_dir), Path(out), int(max_length), int(batch_size)
    import resource

    from bgem3_lib.analysis.batching_stats import peak_rss_growth, rss_bytes
    texts = json.loads((out / "texts.json").read_text(encoding="utf-8"))
    options_file = out / "options.json"
    options = json.loads(options_file.read_text(encoding="utf-8")) if options_file.is_file() else {}
    warmup = options.pop("warmup", texts[:4])
    setup = {"bgem3_lib": _encode_bgem3_lib, "flagembedding": _encode_flagembedding,
             "mindnlp": _encode_mindnlp}[name]
    encode, n_tokens = setup(model_dir, texts, max_length, batch_size, **options)
    rss_after_load = rss_bytes()
    encode(warmup)                                      # warm-up: first-call setup, allocations
    rss_before_encode = rss_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    (dense, lexical, colbert), grown = peak_rss_growth(lambda: encode(texts), interval=1e-3)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux reports KiB
    np.save(out / "dense.npy", np.asarray(dense, dtype=np.float32))
    (out / "lexical.json").write_text(json.dumps([{str(k): float(v) for k, v in d.items()} for d in lexical]))
    np.savez(out / "colbert.npz", *[np.asarray(c, dtype=np.float32) for c in colbert])
    (out / "timing.json").write_text(json.dumps({"seconds": wall, "cpu_seconds": cpu, "n_tokens": n_tokens,
                                                 "rss_after_load": rss_after_load, "peak_growth": int(grown),
                                                 "rss_before_encode": rss_before_encode, "max_rss": max_rss}))


if __name__ == "__main__":
    _main(sys.argv[1:])
