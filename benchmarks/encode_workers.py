"""Worker processes for ``benchmarks/encode.py``: one per system, each loads the model once, then
answers JSON commands read from stdin (one per line) with one ``@@ {json}`` line on stdout.

    python benchmarks/encode_workers.py SYSTEM MODEL_DIR      (SYSTEM: a key of SYSTEMS)

Systems (identical weights from MODEL_DIR, identical texts, all three outputs, float32, CPU):
* ``bgem3_lib``      — this library (``BGEM3.encode``); ``kernels: false`` forces the plain-op path.
* ``bgem3_lib-int8`` — the same with ``dtype="int8"``: the encoder's linear layers in int8 (per-channel
  weight scales, per-token activation quantisation, int32 accumulation; ``bgem3_lib.kernels.int8``); on a CPU
  with AMX the products run on AMX tiles and attention in bfloat16 there (float32 accumulation).
* ``flagembedding``  — ``BGEM3FlagModel.encode`` on PyTorch. Its ``encode`` first runs the longest
  batch an extra time to probe the batch size and throws the result away; that probe forward is
  skipped here (``skip_probe``, its output is unused) and its cost reported as ``probe_seconds``
  (= the first real batch, the same input), so timings are FlagEmbedding's without the probe.
* ``mindnlp``        — MindNLP 0.5 (``import mindnlp`` makes ``transformers`` run on MindSpore):
  ``AutoModel`` + the two head ``Linear``s loaded with its torch shim; same sort/pad/batch as ours.
* ``onnxruntime``    — the checkpoint exported from the PyTorch reference to one ONNX graph (encoder + the
  three heads, ``bgem3_lib.analysis.onnx_reference``), run by ONNX Runtime's CPU execution provider with
  ``$OMP_NUM_THREADS`` intra-op threads; padded batches sorted by length, as a user runs it. Exported
  once into ``MODEL_DIR/onnx/`` and reused while newer than the weights.
* ``onnxruntime-int8`` — the same graph after ONNX Runtime's dynamic int8 quantization (per-channel int8
  weights on the MatMul/Gemm projections, activations quantized at run time).

Commands: ``{"op": "encode", "texts": file, "max_length", "batch_size", "sort", "kernels", "repeat"}`` (``repeat``
encodes back to back: ``seconds`` is then the mean per encode, ``seconds_reps`` each one),
``{"op": "matmul", "numpy_only": false, "repeats": 5}`` (GFLOP/s of this framework's float32 1024x1024x4096
matmul, and NumPy's, median of ``repeats`` products; ``numpy_only``: NumPy's alone, the per-round roofline),
``{"op": "sparse_rss", "texts": file, "batch", "max_length", "path"}``, ``{"op": "quit"}``.
Every answer carries ``peak_rss_mb`` (VmHWM, reset before the command) and ``base_rss_mb``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")       # resets VmHWM to the current RSS
    except OSError:
        pass


def numpy_gflops(repeats: int = 5) -> float:
    a, b = np.random.rand(1024, 1024).astype(np.float32), np.random.rand(1024, 4096).astype(np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 1024 * 1024 * 4096 / float(np.median(times)) / 1e9


class Ours:
    dtype = "float32"

    def __init__(self, model_dir: str):
        sys.path.insert(0, str(ROOT))
        from bgem3_lib import BGEM3
        self.model = BGEM3(model_dir, dtype=self.dtype)

    def encode(self, texts, max_length, batch_size, sort=True, kernels=True, sparse_only=False):
        self.model.encoder.use_cpu_kernels = kernels
        out = self.model.encode(texts, batch_size=batch_size, max_length=max_length, return_dense=not sparse_only,
                                return_sparse=True, return_colbert_vecs=not sparse_only, sort_by_length=sort,
                                show_progress=False)
        from bgem3_lib.kernels import cpu
        packed = self.model.encoder.uses_packed_weights()
        products = ("AMX (bf16x3)" if cpu.uses_bf16x3() else "AVX-512 (gemm_f32, weights packed once)" if packed
                    else "AVX-512 (gemm_f32)" if cpu.uses_f32gemm() else "BLAS")
        return {"dense": out["dense_vecs"], "kernels_used": self.model.encoder.cpu_kernels_ready(),
                "linear_products": products}

    def framework_gflops(self) -> float:
        import mindspore as ms
        a = ms.Tensor(np.random.rand(1024, 1024).astype(np.float32))
        b = ms.Tensor(np.random.rand(1024, 4096).astype(np.float32))
        ms.ops.matmul(a, b).asnumpy()
        t = time.perf_counter()
        for _ in range(3):
            ms.ops.matmul(a, b).asnumpy()
        return 3 * 2 * 1024 * 1024 * 4096 / (time.perf_counter() - t) / 1e9


class Flag:
    def __init__(self, model_dir: str):
        from FlagEmbedding import BGEM3FlagModel
        self.model = BGEM3FlagModel(model_dir, use_fp16=False, devices="cpu")
        inner, self.calls, self.skip_probe = self.model.model, [], False

        class Timed:                         # times each forward; skips the batch-size probe's forward
            def __getattr__(_, name):
                return getattr(inner, name)

            def __call__(_, *args, **kw):
                if self.skip_probe:
                    self.skip_probe = False
                    return None              # encode() only checks that the probe did not raise
                t = time.perf_counter()
                out = inner(*args, **kw)
                self.calls.append(time.perf_counter() - t)
                return out
        self.model.model = Timed()
        self.inner = inner

    def encode(self, texts, max_length, batch_size, sort=True, kernels=True, sparse_only=False):
        self.calls.clear()
        self.skip_probe = True
        out = self.model.encode(texts, batch_size=batch_size, max_length=max_length, return_dense=True,
                                return_sparse=True, return_colbert_vecs=True)
        return {"dense": out["dense_vecs"], "probe_seconds": self.calls[0] if self.calls else 0.0}

    def framework_gflops(self) -> float:
        import torch
        a, b = torch.rand(1024, 1024), torch.rand(1024, 4096)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        return 3 * 2 * 1024 * 1024 * 4096 / (time.perf_counter() - t) / 1e9

    def sparse_rss(self, texts, max_length, batch, path):
        """FlagEmbedding's sparse embedding on one [batch, L] input: 'old' = the B x L x V scatter
        (its training-mode branch, the path before its issue #1364), 'new' = B x V scatter_reduce."""
        import torch
        tok = self.model.tokenizer(texts[:batch], truncation=True, max_length=max_length, padding=True,
                                   return_tensors="pt")
        with torch.no_grad():
            hidden = self.inner.model(**tok).last_hidden_state
            _reset_peak()
            self.inner.train(path == "old")
            emb = self.inner._sparse_embedding(hidden, tok["input_ids"], return_embedding=True)
            self.inner.eval()
        return {"shape": list(emb.shape)}


class MindNLP:
    def __init__(self, model_dir: str):
        sys.path.insert(0, str(ROOT))
        from bgem3_lib.analysis.reference_runs import import_mindnlp
        import_mindnlp()                 # must come first: routes transformers/torch to MindSpore
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel
        self.torch = torch
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.heads = {}
        for name in ("colbert_linear", "sparse_linear"):
            state = torch.load(str(Path(model_dir) / f"{name}.pt"), map_location="cpu")
            lin = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
            lin.load_state_dict({k: v.float() for k, v in state.items()})
            self.heads[name] = lin.eval()
        self.tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

    def encode(self, texts, max_length, batch_size, sort=True, kernels=True, sparse_only=False):
        torch = self.torch
        ids = [e.ids for e in self.tok.encode_batch(texts)]
        ids = [x if len(x) <= max_length else x[: max_length - 1] + [x[-1]] for x in ids]
        order = np.argsort([-len(x) for x in ids], kind="stable") if sort else np.arange(len(ids))
        dense = np.zeros((len(ids), self.model.config.hidden_size), np.float32)
        special, out, batch_seconds = {0, 1, 2, 3}, [], []
        for s in range(0, len(ids), batch_size):
            t0 = time.perf_counter()
            idx = order[s:s + batch_size]
            length = max(len(ids[i]) for i in idx)
            batch = np.full((len(idx), length), 1, np.int64)
            mask = np.zeros_like(batch)
            for j, i in enumerate(idx):
                batch[j, : len(ids[i])], mask[j, : len(ids[i])] = ids[i], 1
            with torch.no_grad():
                hidden = self.model(input_ids=torch.tensor(batch), attention_mask=torch.tensor(mask)).last_hidden_state
                weights = torch.relu(self.heads["sparse_linear"](hidden)).squeeze(-1).numpy()
                colbert = self.heads["colbert_linear"](hidden[:, 1:]).numpy()
                cls = hidden[:, 0].numpy()
            dense[idx] = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
            for j, i in enumerate(idx):
                n = len(ids[i])
                lex = {}
                for t, w in zip(ids[i], weights[j, :n].tolist()):
                    if t not in special and w > lex.get(str(t), 0.0):
                        lex[str(t)] = w
                vecs = colbert[j, : n - 1]
                out.append((lex, vecs / np.linalg.norm(vecs, axis=-1, keepdims=True)))
            batch_seconds.append(time.perf_counter() - t0)
        return {"dense": dense, "texts": len(out), "batch_seconds": batch_seconds}

    def framework_gflops(self) -> float:
        torch = self.torch
        a, b = torch.rand(1024, 1024), torch.rand(1024, 4096)
        (a @ b).numpy()
        t = time.perf_counter()
        for _ in range(3):
            (a @ b).numpy()
        return 3 * 2 * 1024 * 1024 * 4096 / (time.perf_counter() - t) / 1e9


class OnnxRuntime:
    int8 = False

    def __init__(self, model_dir: str):
        sys.path.insert(0, str(ROOT))
        from bgem3_lib.analysis.onnx_reference import OnnxEncoder, exported_onnx
        self.model = OnnxEncoder(exported_onnx(model_dir, int8=self.int8), Path(model_dir) / "tokenizer.json")

    def encode(self, texts, max_length, batch_size, sort=True, kernels=True, sparse_only=False):
        out = self.model.encode(texts, max_length=max_length, batch_size=batch_size, sort=sort)
        return {"dense": out["dense_vecs"]}

    def framework_gflops(self) -> float:
        return numpy_gflops()               # ONNX Runtime has no stand-alone matmul to call: NumPy's


class OnnxRuntimeInt8(OnnxRuntime):
    int8 = True


class OursInt8(Ours):
    dtype = "int8"


SYSTEMS = {"bgem3_lib": Ours, "bgem3_lib-int8": OursInt8, "flagembedding": Flag, "mindnlp": MindNLP,
           "onnxruntime": OnnxRuntime, "onnxruntime-int8": OnnxRuntimeInt8}


def serve(system: str, model_dir: str) -> None:
    worker = SYSTEMS[system](model_dir)
    print("@@ " + json.dumps({"ready": system, "rss_mb": _status("VmRSS")}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        base = _status("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        if cmd["op"] == "matmul":
            res = {"numpy_gflops": numpy_gflops(cmd.get("repeats", 5))}
            if not cmd.get("numpy_only"):
                res["framework_gflops"] = worker.framework_gflops()
        elif cmd["op"] == "encode":
            texts, reps = json.loads(Path(cmd["texts"]).read_text()), []
            for _ in range(cmd.get("repeat", 1)):      # back to back; the answer's seconds: their mean
                r0 = time.perf_counter()
                res = worker.encode(texts, cmd["max_length"], cmd["batch_size"], cmd.get("sort", True),
                                    cmd.get("kernels", True), cmd.get("sparse_only", False))
                reps.append(time.perf_counter() - r0)
            if len(reps) > 1:
                res["seconds_reps"] = reps
            if cmd.get("save_dense"):
                np.save(cmd["save_dense"], res["dense"])
            res.pop("dense")
        elif cmd["op"] == "sparse_rss":
            texts = json.loads(Path(cmd["texts"]).read_text())
            if system == "flagembedding":
                res = worker.sparse_rss(texts, cmd["max_length"], cmd["batch"], cmd["path"])
            else:
                res = worker.encode(texts[: cmd["batch"]], cmd["max_length"], cmd["batch"], sparse_only=True)
                res.pop("dense")
        else:
            raise ValueError(f"unknown op {cmd['op']!r}")
        secs = float(np.mean(res["seconds_reps"])) if "seconds_reps" in res else time.perf_counter() - t
        res.update(seconds=secs, peak_rss_mb=_status("VmHWM"), base_rss_mb=base)
        print("@@ " + json.dumps(res), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
