"""ONNX Runtime as a peer engine: a BGE-M3-layout checkpoint exported from the PyTorch reference to one ONNX
graph (fp32, and ONNX Runtime's dynamic int8 quantization of it), run on the CPU execution provider.

* :func:`export_onnx` - in a fresh process with torch (never MindSpore or MindNLP): transformers' XLM-RoBERTa
  (eager attention) and FlagEmbedding 1.4.2's heads, traced by the TorchScript exporter: ``input_ids``,
  ``attention_mask`` int64 [B, L] (B, L dynamic) -> ``dense`` [B, H] (CLS state, L2-normalised), ``sparse``
  [B, L] (relu(sparse_linear(hidden))), ``colbert`` [B, L-1, D] (colbert_linear(hidden[:, 1:]) times the
  mask, L2-normalised per vector). The file is kept only once ONNX Runtime matched torch on a second input
  shape; a graph over 2 GB (the full-size model) keeps its weights in ``<name>.data`` beside it.
* :func:`quantize_onnx` - ONNX Runtime's dynamic int8 quantization of that graph (settings in its docstring).
* :class:`OnnxEncoder` - ``encode`` as a user runs an ONNX model: tokenize, truncate as FlagEmbedding does,
  sort by length, pad each batch to its longest, run the session; FlagEmbedding's output dict.
* :func:`exported_onnx` - the benchmark's cache: export (and quantize) once per checkpoint.

>>> enc = OnnxEncoder(exported_onnx("/path/to/bge-m3"), "/path/to/bge-m3/tokenizer.json")   # doctest: +SKIP
>>> enc.encode(["BGE M3 is an embedding model"])["dense_vecs"].shape                       # doctest: +SKIP
(1, 1024)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..model.tokenization import M3Tokenizer, check_texts
from ..paths import cache_dir, file_lock, temp_tag

INPUTS, OUTPUTS = ("input_ids", "attention_mask"), ("dense", "sparse", "colbert")
SPECIAL_IDS = (0, 1, 2, 3)          # XLM-R's <s>, <pad>, </s>, <unk>: FlagEmbedding drops them from lexical weights
HEAD_FILES = ("config.json", "colbert_linear.pt", "sparse_linear.pt")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes of weights past which the graph keeps them in a .data file
_MODULE, ROOT = "bgem3_lib.analysis.onnx_reference", Path(__file__).resolve().parents[2]
_DYNAMIC_AXES = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                 "dense": {0: "batch"}, "sparse": {0: "batch", 1: "length"}, "colbert": {0: "batch", 1: "length-1"}}


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The files of a BGE-M3-layout checkpoint an export reads; FileNotFoundError naming what is missing."""
    model_dir = Path(model_dir)
    missing = [f for f in HEAD_FILES + ("tokenizer.json",) if not (model_dir / f).is_file()]
    weights = [model_dir / f for f in WEIGHT_FILES if (model_dir / f).is_file()]
    if missing or not weights:
        need = missing + ([] if weights else [" or ".join(WEIGHT_FILES)])
        raise FileNotFoundError(f"{model_dir} is not a BGE-M3-layout checkpoint: missing {', '.join(need)}")
    return [model_dir / f for f in HEAD_FILES] + weights[:1]


def _run_module(what: str, args: list[str], timeout: float) -> None:
    """``python -m`` this module with ``args`` in a fresh process (torch, or ONNX's model protos, never enter the
    caller's memory); RuntimeError with the end of its stderr on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-m", _MODULE, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def export_onnx(model_dir: str | Path, out_path: str | Path, opset: int = 17, timeout: float = 3600) -> Path:
    """Export the checkpoint in ``model_dir`` to ``out_path`` (in a torch subprocess); returns ``out_path``."""
    checkpoint_files(model_dir)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    _run_module(f"ONNX export of {model_dir}", ["export", model_dir, out_path, int(opset)], timeout)
    return Path(out_path)


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, timeout: float = 3600) -> Path:
    """``fp32_path`` -> ``int8_path`` by ``quantize_dynamic`` (in a subprocess): ``weight_type=QInt8``,
    ``per_channel=True``, ``reduce_range=False``, ``op_types_to_quantize=["MatMul", "Gemm"]``, ``MatMulConstBOnly``
    (the projections and FFN only; attention's activation x activation products stay float32). Activations go
    uint8 per tensor at run time; embeddings, LayerNorm, softmax stay float32. One file: XLM-R large's is 1.4 GB."""
    if not Path(fp32_path).is_file():
        raise FileNotFoundError(f"no ONNX model at {fp32_path}")
    Path(int8_path).parent.mkdir(parents=True, exist_ok=True)
    _run_module(f"int8 quantization of {fp32_path}", ["quantize", fp32_path, int8_path], timeout)
    return Path(int8_path)


def is_fresh(target: Path, sources: list[Path]) -> bool:
    """True when ``target`` exists and is newer than every source.

    >>> is_fresh(Path("/nonexistent.onnx"), [])
    False
    """
    return target.is_file() and all(target.stat().st_mtime > s.stat().st_mtime for s in sources)


def exported_onnx(model_dir: str | Path, int8: bool = False, out_dir: str | Path | None = None) -> Path:
    """``model.onnx`` (or ``model_int8.onnx``) of a checkpoint, exported once: in ``out_dir``, by default
    ``model_dir/onnx`` (``cache_dir()/bench/onnx/<name>`` when that folder is read-only); reused when newer
    than the checkpoint's files (the int8 file: newer than the fp32 one). One exporter at a time."""
    model_dir = Path(model_dir)
    sources = checkpoint_files(model_dir)
    if out_dir is None:
        out_dir = model_dir / "onnx"
        if not os.access(model_dir, os.W_OK):
            out_dir = cache_dir() / "bench" / "onnx" / model_dir.resolve().name
    out_dir = Path(out_dir)
    fp32, q8 = out_dir / "model.onnx", out_dir / "model_int8.onnx"
    with file_lock(out_dir / ".export.lock", f"the ONNX export of {model_dir}"):
        if not is_fresh(fp32, sources):
            export_onnx(model_dir, fp32)
        if int8 and not is_fresh(q8, [fp32]):
            tmp = out_dir / f".{q8.name}.{temp_tag()}.onnx"
            quantize_onnx(fp32, tmp)
            os.replace(tmp, q8)
    return q8 if int8 else fp32


def lexical_weights(weights: np.ndarray, ids, special_ids=SPECIAL_IDS) -> dict[str, float]:
    """One text's token weights [n] and ids [n] -> {token_id_str: max weight}, special tokens and weights
    <= 0 dropped, keys in first-occurrence order (FlagEmbedding's ``_process_token_weights``).

    >>> lexical_weights(np.array([0.3, 0.5, 0.0, 0.9, 0.2], np.float32), [0, 10, 11, 10, 2])
    {'10': 0.8999999761581421}
    """
    out: dict[str, float] = {}
    for t, w in zip(np.asarray(ids).tolist(), np.asarray(weights).tolist()):
        if t not in special_ids and w > out.get(str(t), 0.0):
            out[str(t)] = w
    return out


def batch_order(lengths: list[int], batch_size: int, sort: bool = True) -> list[np.ndarray]:
    """Indices of each batch: longest texts first (stable) when ``sort``, else in input order.

    >>> [b.tolist() for b in batch_order([2, 9, 5], 2)]
    [[1, 2], [0]]
    """
    order = np.argsort([-n for n in lengths], kind="stable") if sort else np.arange(len(lengths))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def pad_batch(ids: list[list[int]], pad_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a batch -> ``input_ids``, ``attention_mask`` int64 [B, L], L the longest text."""
    length = max(len(x) for x in ids)
    input_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), length), dtype=np.int64)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)], mask[i, :len(x)] = x, 1
    return input_ids, mask


class OnnxEncoder:
    """An exported M3 graph in an ONNX Runtime CPU session: ``intra_op_num_threads`` = ``threads`` (default
    ``$OMP_NUM_THREADS``, else 2), ``inter_op_num_threads`` = 1, graph optimisation level ALL."""

    def __init__(self, onnx_path: str | Path, tokenizer_json: str | Path, threads: int | None = None):
        import onnxruntime as ort
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"no ONNX model at {onnx_path}")
        threads = int(os.environ.get("OMP_NUM_THREADS", "2")) if threads is None else threads
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.tokenizer = M3Tokenizer.from_file(tokenizer_json)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (list(INPUTS), list(OUTPUTS)):
            raise ValueError(f"{onnx_path} is not an M3 export: inputs/outputs {names}, expected {(INPUTS, OUTPUTS)}")
        self.max_tokens = int(self.session.get_modelmeta().custom_metadata_map.get("max_tokens", 0)) or None

    def encode(self, texts, max_length: int = 512, batch_size: int = 256, sort: bool = True) -> dict:
        """FlagEmbedding's ``encode`` outputs: ``dense_vecs`` [N, H] float32, ``lexical_weights`` N dicts
        {token_id_str: weight}, ``colbert_vecs`` N arrays [n_i - 1, D] (n_i the text's tokens)."""
        texts = check_texts(texts)
        for name, v in (("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_tokens and max_length > self.max_tokens:
            raise ValueError(f"max_length={max_length} exceeds the model's {self.max_tokens} positions")
        ids = self.tokenizer.encode_ids(texts, max_length, warn=False)
        dense, lexical, colbert = [None] * len(ids), [None] * len(ids), [None] * len(ids)
        for idx in batch_order([len(x) for x in ids], batch_size, sort):
            input_ids, mask = pad_batch([ids[i] for i in idx])
            d, s, c = self.session.run(list(OUTPUTS), {"input_ids": input_ids, "attention_mask": mask})
            for j, i in enumerate(idx):
                n = len(ids[i])
                dense[i], lexical[i], colbert[i] = d[j], lexical_weights(s[j, :n], ids[i]), c[j, :n - 1].copy()
        return {"dense_vecs": np.stack(dense).astype(np.float32), "lexical_weights": lexical, "colbert_vecs": colbert}


# ----------------------------------------------------------------------------- torch subprocess side

def _m3_graph(model_dir: Path):
    """transformers' encoder (eager attention) and FlagEmbedding's heads as one torch module."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    def linear(name: str):
        state = torch.load(str(model_dir / f"{name}.pt"), map_location="cpu", weights_only=True)
        layer = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        layer.load_state_dict({k: v.float() for k, v in state.items()})
        return layer

    class M3Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
            self.colbert_linear, self.sparse_linear = linear("colbert_linear"), linear("sparse_linear")

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
            colbert = self.colbert_linear(hidden[:, 1:]) * attention_mask[:, 1:, None].to(hidden.dtype)
            return F.normalize(hidden[:, 0], dim=-1), sparse, F.normalize(colbert, dim=-1)

    return M3Graph().float().eval()


def _example(batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ``<s> ... </s>`` ids, the last row padded to half the length: int64 [batch, length] twice."""
    rng = np.random.default_rng(seed)
    ids = [[0] + rng.integers(5, 1000, n - 2).tolist() + [2] for n in [length] * (batch - 1) + [length // 2]]
    return pad_batch(ids)


def _export(model_dir: str, out_path: str, opset: str) -> None:
    import onnx
    import onnxruntime as ort
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model_dir, out = Path(model_dir), Path(out_path)
    graph = _m3_graph(model_dir)
    tmp = out.parent / f".{out.name}.{temp_tag()}"
    tmp.mkdir()
    try:
        with torch.no_grad():
            torch.onnx.export(graph, tuple(torch.from_numpy(a) for a in _example(2, 8, 0)), str(tmp / out.name),
                              dynamo=False, opset_version=int(opset), input_names=list(INPUTS),
                              output_names=list(OUTPUTS), dynamic_axes=_DYNAMIC_AXES)
        proto = onnx.load(str(tmp / out.name))
        config = json.loads((model_dir / "config.json").read_text())
        meta = {"max_tokens": config["max_position_embeddings"] - config.get("pad_token_id", 1) - 1,
                "source": str(model_dir.resolve()), "exporter": f"torch {torch.__version__} TorchScript"}
        onnx.helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
        big = sum(f.stat().st_size for f in tmp.iterdir()) > EXTERNAL_DATA_ABOVE
        onnx.save_model(proto, str(tmp / out.name), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=f"{out.name}.data")
        del proto
        session = ort.InferenceSession(str(tmp / out.name), providers=["CPUExecutionProvider"])
        ids, mask = _example(3, 11, 1)          # another shape: B and L must be dynamic
        with torch.no_grad():
            want = [t.numpy() for t in graph(torch.from_numpy(ids), torch.from_numpy(mask))]
        got = session.run(list(OUTPUTS), {"input_ids": ids, "attention_mask": mask})
        diffs = {k: float(np.abs(a - b).max()) for k, a, b in zip(OUTPUTS, want, got)}
        if max(diffs.values()) > 1e-4:
            raise RuntimeError(f"ONNX Runtime disagrees with torch on a [3, 11] batch: {diffs}")
        out.unlink(missing_ok=True)
        if big:
            os.replace(tmp / f"{out.name}.data", out.parent / f"{out.name}.data")
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quantize(fp32_path: str, int8_path: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                     op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})


if __name__ == "__main__":
    if not (sys.argv[1:2] == ["export"] and len(sys.argv) == 5 or sys.argv[1:2] == ["quantize"] and len(sys.argv) == 4):
        sys.exit(f"usage: python -m {_MODULE} export MODEL_DIR OUT.onnx OPSET | quantize FP32.onnx INT8.onnx")
    (_export if sys.argv[1] == "export" else _quantize)(*sys.argv[2:])
